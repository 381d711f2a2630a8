"""Per-layer sizes of a model, and the ``structure`` entry of its pruning record.

The entry lives in ``config.json["pruning_config"]["structure"]``::

    {"mlp_neurons": [kept per layer], "attention_heads": [...], "kv_heads": [...],
     "dense": {"mlp_neurons": [...], "attention_heads": [...], "kv_heads": [...]},
     "parameters_before": N, "parameters_after": M}

``dense`` are the sizes the config describes (before any structured pruning) and the
parameter counts are of the whole model, tied weights counted once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import UnsupportedArchitectureError
from ..report import count_parameters
from ..walker.layout import DecoderLayout
from .geometry import LayerSizes, layer_sizes

SIZE_KEYS = ("mlp_neurons", "attention_heads", "kv_heads")


@dataclass
class ModelShape:
    """Per-layer sizes and the parameter count of a model at one moment. ``layers`` is ``None``
    for a model whose MLP and attention the walker cannot tell apart (mixtures of experts,
    hybrid layers), which structured methods cannot shrink."""

    layers: list[LayerSizes] | None
    parameters: int

    def lists(self) -> dict[str, list[int] | None]:
        if self.layers is None:
            return {key: None for key in SIZE_KEYS}
        return {key: [getattr(sizes, key) for sizes in self.layers] for key in SIZE_KEYS}


def model_shape(model: nn.Module) -> ModelShape:
    """Measure every decoder layer's MLP width and head counts from the weights."""
    layout = DecoderLayout(model)
    try:
        layers: list[LayerSizes] | None = [layer_sizes(layout, i) for i in range(len(layout))]
    except UnsupportedArchitectureError:
        layers = None
    return ModelShape(layers, count_parameters(model))


def structure_record(model: nn.Module, before: ModelShape, previous: dict | None) -> dict[str, Any] | None:
    """The ``structure`` entry after a pruning run, or ``None`` if no layer was ever shrunk.

    ``before`` is the shape measured just before the run; ``previous`` the record of earlier
    runs, whose dense sizes and parameter count are carried over.
    """
    earlier = (previous or {}).get("structure") or None
    now = model_shape(model)
    if earlier is None and now.layers == before.layers:
        return None
    record: dict[str, Any] = dict(now.lists())
    record["dense"] = earlier["dense"] if earlier else before.lists()
    record["parameters_before"] = int(earlier["parameters_before"]) if earlier else before.parameters
    record["parameters_after"] = now.parameters
    return record


@dataclass
class StructureReport:
    """What structured pruning left: sizes per layer against the dense ones, and parameters."""

    shape: ModelShape
    dense: dict[str, list[int]]
    parameters_before: int

    @property
    def parameters_after(self) -> int:
        return self.shape.parameters

    def __str__(self) -> str:
        lines = [f"{'layer':>5}  {'neurons':>13}  {'heads':>9}  {'kv heads':>9}"]
        for i, sizes in enumerate(self.shape.layers):
            lines.append(
                f"{i:>5}  {sizes.mlp_neurons:>6}/{self.dense['mlp_neurons'][i]:<6}  "
                f"{sizes.attention_heads:>4}/{self.dense['attention_heads'][i]:<4}  "
                f"{sizes.kv_heads:>4}/{self.dense['kv_heads'][i]:<4}"
            )
        ratio = self.parameters_after / self.parameters_before if self.parameters_before else 1.0
        lines.append(f"parameters: {self.parameters_after} of {self.parameters_before} ({ratio:.4f})")
        return "\n".join(lines)


def structure_report(model: nn.Module) -> StructureReport:
    """Sizes of ``model`` now, against the dense sizes its pruning record (if any) names."""
    shape = model_shape(model)
    record = (getattr(model.config, "pruning_config", None) or {}).get("structure")
    if record:
        return StructureReport(shape, record["dense"], int(record["parameters_before"]))
    return StructureReport(shape, shape.lists(), shape.parameters)
