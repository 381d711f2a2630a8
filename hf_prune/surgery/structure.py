"""Per-layer sizes of a model, and the ``structure`` entry of its pruning record.

The entry lives in ``config.json["pruning_config"]["structure"]``::

    {"mlp_neurons": [kept per layer], "attention_heads": [...], "kv_heads": [...],
     "dense": {"mlp_neurons": [...], "attention_heads": [...], "kv_heads": [...]},
     "kept_layers": [...],
     "parameters_before": N, "parameters_after": M}

Mixture-of-experts models, whose MLP is a bank of routed experts, have ``null`` per-layer
``mlp_neurons``/``attention_heads``/``kv_heads`` and add ``"expert_neurons"``: the neurons kept
in each routed expert of each layer (every expert of a layer keeps as many; ``null`` for a
layer without experts), with its dense counterpart under ``dense``.

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
from .expert_neurons import expert_neuron_sizes
from .geometry import LayerSizes, layer_sizes

SIZE_KEYS = ("mlp_neurons", "attention_heads", "kv_heads")
#: the per-layer neurons of each routed expert, in records of mixture-of-experts models
EXPERT_KEY = "expert_neurons"


@dataclass
class ModelShape:
    """Per-layer sizes and the parameter count of a model at one moment. ``layers`` is ``None``
    for a model whose MLP and attention the walker cannot tell apart (mixtures of experts,
    hybrid layers), which structured methods cannot shrink."""

    layers: list[LayerSizes] | None
    parameters: int
    #: neurons per routed expert in each layer (``None`` where a layer has no experts); ``None``
    #: for a model without expert banks
    expert_neurons: list[int | None] | None = None
    #: the decoder layers, whether or not their sizes could be measured
    num_layers: int = 0

    def lists(self) -> dict[str, list[int] | None]:
        """The per-layer size lists of the record (``expert_neurons`` only for mixture-of-experts models)."""
        lists: dict[str, Any] = ({key: None for key in SIZE_KEYS} if self.layers is None
                                 else {key: [getattr(sizes, key) for sizes in self.layers] for key in SIZE_KEYS})
        if self.expert_neurons is not None:
            lists[EXPERT_KEY] = list(self.expert_neurons)
        return lists


def model_shape(model: nn.Module) -> ModelShape:
    """Measure every decoder layer's MLP width and head counts from the weights."""
    layout = DecoderLayout(model)
    try:
        layers: list[LayerSizes] | None = [layer_sizes(layout, i) for i in range(len(layout))]
    except UnsupportedArchitectureError:
        layers = None
    return ModelShape(layers, count_parameters(model), expert_neuron_sizes(layout), len(layout))


def structure_record(model: nn.Module, before: ModelShape, previous: dict | None,
                     kept_layers: list[int] | None = None) -> dict[str, Any] | None:
    """The ``structure`` entry after a pruning run, or ``None`` if no layer was ever shrunk or removed.

    ``before`` is the shape measured just before the run; ``previous`` the record of earlier
    runs, whose dense sizes and parameter count are carried over; ``kept_layers`` the layers
    (indices before the run) this run left, when it removed some.
    """
    earlier = (previous or {}).get("structure") or None
    now = model_shape(model)
    if (earlier is None and kept_layers is None and now.layers == before.layers
            and now.expert_neurons == before.expert_neurons):
        return None
    record: dict[str, Any] = dict(now.lists())
    record["dense"] = dict(earlier["dense"]) if earlier else before.lists()
    if EXPERT_KEY in record and EXPERT_KEY not in record["dense"]:  # experts first shrunk in this run
        record["dense"][EXPERT_KEY] = before.lists().get(EXPERT_KEY)
    dense_index = (earlier or {}).get("kept_layers")
    if kept_layers is not None:
        base = dense_index if dense_index is not None else list(range(before.num_layers))
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
        if self.shape.layers is None:  # mixtures of experts and hybrids: no per-layer MLP width or heads
            lines = self._expert_lines()
        else:
            lines = self._layer_lines()
        if self.kept_layers is not None:
            lines.append(f"decoder layers: {self.shape.num_layers} of {len(self._dense_layers())}")
        ratio = self.parameters_after / self.parameters_before if self.parameters_before else 1.0
        lines.append(f"parameters: {self.parameters_after} of {self.parameters_before} ({ratio:.4f})")
        return "\n".join(lines)

    def _dense_layers(self) -> list:
        return next((v for v in (self.dense.get(k) for k in (*SIZE_KEYS, EXPERT_KEY)) if v is not None), [])

    def _dense_index(self, i: int) -> int:
        return self.kept_layers[i] if self.kept_layers is not None else i

    def _suffix(self, i: int) -> str:
        return f"  (dense layer {self._dense_index(i)})" if self.kept_layers is not None else ""

    def _expert_lines(self) -> list[str]:
        kept, dense = self.shape.expert_neurons, self.dense.get(EXPERT_KEY)
        if kept is None or dense is None:
            return [f"{self.shape.num_layers} decoder layers (per-layer sizes not measured for this architecture)"]
        lines = [f"{'layer':>5}  {'expert neurons':>15}"]
        for i, size in enumerate(kept):
            dense_size = dense[self._dense_index(i)]
            text = "-" if size is None else f"{size:>6}/{dense_size:<6}"
            lines.append(f"{i:>5}  {text:>15}" + self._suffix(i))
        return lines

    def _layer_lines(self) -> list[str]:
        lines = [f"{'layer':>5}  {'neurons':>13}  {'heads':>9}  {'kv heads':>9}"]
        for i, sizes in enumerate(self.shape.layers or []):
            d = self._dense_index(i)
            lines.append(
                f"{i:>5}  {sizes.mlp_neurons:>6}/{self.dense['mlp_neurons'][d]:<6}  "
                f"{sizes.attention_heads:>4}/{self.dense['attention_heads'][d]:<4}  "
                f"{sizes.kv_heads:>4}/{self.dense['kv_heads'][d]:<4}" + self._suffix(i)
            )
        return lines


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
    keys = (*SIZE_KEYS, EXPERT_KEY)
    kept = {k: v for k, v in report.shape.lists().items() if k in keys and v is not None}
    dense = {k: list(v) for k, v in report.dense.items() if k in keys and v is not None}
    return StructureSummary(kept, dense, report.parameters_before, report.parameters_after, report.kept_layers)
