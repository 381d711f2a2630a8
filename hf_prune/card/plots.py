"""The per-layer PNG shown in a pruned model's card: sparsity, or kept neurons and heads.

Drawn with matplotlib's object API on the Agg canvas, so no GUI backend is needed and the
caller's pyplot backend is left alone.
"""

from __future__ import annotations

from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def save_layer_plot(
    path: str | Path,
    measured: list[float],
    target: list[float] | None = None,
    kept_neurons: list[float] | None = None,
    kept_heads: list[float] | None = None,
) -> Path | None:
    """Write a bar chart per decoder layer to ``path``; ``None`` if matplotlib is missing.

    Args:
        path: the PNG to write.
        measured: measured sparsity of each layer's pruned Linear weights (0..1).
        target: the sparsity each layer was asked for (drawn as markers), if known.
        kept_neurons: share of MLP neurons kept per layer (structured pruning); when given,
            the chart shows kept neurons (and ``kept_heads``) instead of sparsity.
        kept_heads: share of attention heads kept per layer.
    """
    if not matplotlib_available():
        logger.warning("matplotlib is not installed: the model card is written without its per-layer plot "
                       "(pip install matplotlib)")
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = list(range(len(kept_neurons if kept_neurons is not None else measured)))
    figure = Figure(figsize=(max(5.0, 0.28 * len(layers) + 2.0), 3.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    if kept_neurons is not None:
        width = 0.4 if kept_heads is not None else 0.8
        offset = width / 2 if kept_heads is not None else 0.0
        axes.bar([i - offset for i in layers], [100 * k for k in kept_neurons], width=width,
                 color="#3b75af", label="MLP neurons kept")
        if kept_heads is not None:
            axes.bar([i + offset for i in layers], [100 * k for k in kept_heads], width=width,
                     color="#ef8636", label="attention heads kept")
        axes.set_ylabel("kept (%)")
        axes.set_title("Kept MLP neurons per decoder layer" + (" and heads" if kept_heads is not None else ""))
    else:
        axes.bar(layers, [100 * s for s in measured], width=0.8, color="#3b75af", label="measured sparsity")
        if target is not None and len(target) == len(layers):
            axes.plot(layers, [100 * t for t in target], linestyle="none", marker="_", markersize=12,
                      markeredgewidth=2, color="#c03d3e", label="target")
        axes.set_ylabel("sparsity (%)")
        axes.set_title("Sparsity of the pruned Linear weights per decoder layer")
    axes.set_ylim(0, 118)
    axes.set_yticks([0, 20, 40, 60, 80, 100])
    axes.set_xlabel("decoder layer")
    if layers:
        step = max(1, len(layers) // 16)
        axes.set_xticks(layers[::step])
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="upper right", ncols=2, fontsize="small")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png", metadata={"Software": None})
    return path
