"""Per-layer sizes of a model, and the ``structure`` entry of its pruning record.

The entry lives in ``config.json["pruning_config"]["structure"]``::

    {"mlp_neurons": [kept per layer], "attention_heads": [...], "kv_heads": [...],
     "dense": {"mlp_neurons": [...], "attention_heads": [...], "kv_heads": [...]},
     "kept_layers": [...],
     "parameters_before": N, "parameters_after": M}

``dense`` are the sizes the config describes (before any structured pruning) and the
parameter counts are of the whole model, tied weights counted once. ``kept_layers`` is
there once decoder layers were removed: the dense model's index of each remaining layer
(the per-layer lists follow the remaining layers; ``dense`` lists every dense layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import UnsupportedArchitectureError
from ..report import StructureSummary, count_parameters
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


def structure_record(model: nn.Module, before: ModelShape, previous: dict | None,
                     kept_layers: list[int] | None = None) -> dict[str, Any] | None:
    """The ``structure`` entry after a pruning run, or ``None`` if no layer was ever shrunk or removed.

    ``before`` is the shape measured just before the run; ``previous`` the record of earlier
    runs, whose dense sizes and parameter count are carried over; ``kept_layers`` the layers
    (indices before the run) this run left, when it removed some.
    """
    earlier = (previous or {}).get("structure") or None
    now = model_shape(model)
    if earlier is None and kept_layers is None and now.layers == before.layers:
        return None
    record: dict[str, Any] = dict(now.lists())
    record["dense"] = earlier["dense"] if earlier else before.lists()
    dense_index = (earlier or {}).get("kept_layers")
    if kept_layers is not None:
        base = dense_index if dense_index is not None else list(range(len(before.layers)))
        dense_index = [base[i] for i in kept_layers]
    if dense_index is not None:
        record["kept_layers"] = dense_index
    record["parameters_before"] = int(earlier["parameters_before"]) if earlier else before.parameters
    record["parameters_after"] = now.parameters
    return record


@dataclass
class StructureReport:
    """What structured pruning left: sizes per layer against the dense ones, and parameters."""

    shape: ModelShape
    dense: dict[str, list[int]]
    parameters_before: int
    kept_layers: list[int] | None = None

    @property
    def parameters_after(self) -> int:
        return self.shape.parameters

    def __str__(self) -> str:
        lines = [f"{'layer':>5}  {'neurons':>13}  {'heads':>9}  {'kv heads':>9}"]
        for i, sizes in enumerate(self.shape.layers):
            d = self.kept_layers[i] if self.kept_layers is not None else i
            lines.append(
                f"{i:>5}  {sizes.mlp_neurons:>6}/{self.dense['mlp_neurons'][d]:<6}  "
                f"{sizes.attention_heads:>4}/{self.dense['attention_heads'][d]:<4}  "
                f"{sizes.kv_heads:>4}/{self.dense['kv_heads'][d]:<4}"
                + (f"  (dense layer {d})" if self.kept_layers is not None else "")
            )
        if self.kept_layers is not None:
            lines.append(f"decoder layers: {len(self.shape.layers)} of {len(self.dense['mlp_neurons'])}")
        ratio = self.parameters_after / self.parameters_before if self.parameters_before else 1.0
        lines.append(f"parameters: {self.parameters_after} of {self.parameters_before} ({ratio:.4f})")
        return "\n".join(lines)


def structure_report(model: nn.Module) -> StructureReport:
    """Sizes of ``model`` now, against the dense sizes its pruning record (if any) names."""
    shape = model_shape(model)
    record = (getattr(model.config, "pruning_config", None) or {}).get("structure")
    if record:
        return StructureReport(shape, record["dense"], int(record["parameters_before"]), record.get("kept_layers"))
    return StructureReport(shape, shape.lists(), shape.parameters)


def structure_summary(model: nn.Module) -> StructureSummary | None:
    """What structured pruning removed from ``model``, measured now against its record's dense sizes.

    ``None`` when the pruning record holds no ``structure`` entry (no neuron or head was ever removed).
    """
    record = (getattr(model.config, "pruning_config", None) or {}).get("structure")
    if not record:
        return None
    report = structure_report(model)
    return StructureSummary(report.shape.lists(), {k: list(v) for k, v in report.dense.items() if k in SIZE_KEYS},
                            report.parameters_before, report.parameters_after)
