"""What pruning did to a model: zeros in its decoder operators, and neurons, heads and layers removed.

Sparsity is read from the weights themselves. A structured run removes whole MLP neurons,
attention heads (or every unit of a layer) and leaves no zeros behind, so its report says
what was removed and the parameter count before and after; a model pruned both ways (a
structured run, then an N:M or unstructured one) shows both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .engine.offload import read_parameter
from .walker.layout import DecoderLayout, decoder_operators, unwrap_model


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count:,}"


def _share(removed: int, total: int) -> str:
    return f"{100 * removed / total:.1f}%" if total else "0%"


@dataclass
class StructureSummary:
    """Units structured pruning removed, against the dense sizes the pruning record names.

    ``kept`` and ``dense`` map ``"mlp_neurons"``, ``"attention_heads"`` and ``"kv_heads"`` to
    per-layer counts (``dense`` may list more layers than ``kept`` when whole layers were
    dropped). A layer is counted as removed when it was dropped or keeps no neuron and no head.
    Parameter counts are of the whole model, tied weights counted once.
    """

    kept: dict[str, list[int]]
    dense: dict[str, list[int]]
    parameters_before: int
    parameters_after: int
    #: the dense index of each layer in ``kept``, once whole layers were dropped (the record's ``kept_layers``)
    kept_layers: list[int] | None = None

    def totals(self, key: str) -> tuple[int, int]:
        """``(kept, dense)`` summed over layers for ``key`` (e.g. ``"mlp_neurons"``)."""
        return (sum(v or 0 for v in self.kept.get(key) or []), sum(v or 0 for v in self.dense.get(key) or []))

    def _living(self) -> list[int]:
        """Positions in ``kept`` of the layers that still compute something."""
        neurons, heads = self.kept.get("mlp_neurons"), self.kept.get("attention_heads")
        if neurons is None or heads is None:  # mixtures of experts: no per-layer MLP width
            return list(range(len(next((v for v in self.kept.values() if v is not None), []))))
        return [i for i, (n, h) in enumerate(zip(neurons, heads)) if n or h]

    @property
    def layers(self) -> tuple[int, int]:
        """``(layers that still compute something, dense layer count)``."""
        dense = self.dense.get("mlp_neurons") or self.dense.get("expert_neurons") or []
        return len(self._living()), len(dense)

    def _totals_within(self, key: str, living: list[int]) -> tuple[int, int]:
        """``(kept, dense)`` of ``key`` summed over the layers at ``living``, each against its own dense size."""
        kept, dense = self.kept.get(key) or [], self.dense.get(key) or []
        index = self.kept_layers if self.kept_layers is not None else range(len(kept))
        pairs = [(kept[i] or 0, dense[index[i]] or 0) for i in living if i < len(kept) and index[i] < len(dense)]
        return sum(k for k, _ in pairs), sum(d for _, d in pairs)

    def describe(self) -> str:
        """One line: what was removed and the parameter count before -> after.

        Once whole layers are gone they are named first, and the neurons and heads removed are
        counted in the layers left (a dropped layer's heads are not "attention heads removed").
        """
        alive, layers = self.layers
        living = self._living()
        parts, within = [], []
        if alive != layers:
            parts.append(f"removed {layers - alive} of {layers} layers")
        kept, total = self._totals_within("mlp_neurons", living)
        if kept != total or (not parts and "expert_neurons" not in self.dense):
            within.append(f"{_share(total - kept, total)} of MLP neurons ({total - kept} of {total})")
        kept, total = self._totals_within("expert_neurons", living)  # mixtures of experts: per routed expert
        if total and (kept != total or not parts):
            within.append(f"{_share(total - kept, total)} of each routed expert's neurons "
                          f"({kept} of {total} kept, summed over layers)")
        for key, label in (("attention_heads", "attention heads"), ("kv_heads", "KV heads")):
            kept, total = self._totals_within(key, living)
            if kept != total:
                within.append(f"{total - kept} of {total} {label}")
        if within and parts:
            parts.append(f"and in the {alive} left " + ", ".join(within))
        elif within:
            parts.append("removed " + ", ".join(within))
        ratio = self.parameters_after / self.parameters_before if self.parameters_before else 1.0
        return (", ".join(parts) + f"; parameters {_millions(self.parameters_before)} -> "
                f"{_millions(self.parameters_after)} ({ratio:.3f}x)")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in self.kept:
            kept, total = self.totals(key)
            out[key] = {"kept": kept, "dense": total}
        alive, layers = self.layers
        out["layers"] = {"kept": alive, "dense": layers}
        out["parameters_before"] = self.parameters_before
        out["parameters_after"] = self.parameters_after
        return out


@dataclass
class PruningReport:
    """Share of exact zeros per operator, per layer and overall (decoder operators only).

    After structured pruning, ``structure`` says which units were removed and the parameter
    counts; ``zeroed`` says whether any pruning run set weights to zero (an unstructured or N:M
    method). A purely structured run leaves ``zeroed`` False and its report shows no sparsity
    figure (the few zeros the dense weights already had would read as a no-op).
    """

    per_module: dict[str, float]
    per_layer: list[float]
    overall: float
    zeros: int
    total: int
    structure: StructureSummary | None = field(default=None)
    zeroed: bool = True
    #: after expert pruning: ``{"experts_before", "experts_after", "parameters_before", "parameters_after"}``
    experts: dict[str, int] | None = field(default=None)
    #: after hidden-size pruning: ``{"hidden_before", "hidden_after", "parameters_before", "parameters_after"}``
    channels: dict[str, int] | None = field(default=None)

    def _describe_channels(self) -> str:
        c = self.channels or {}
        text = f"hidden size {c.get('hidden_after')}/{c.get('hidden_before')}"
        if c.get("parameters_before"):
            text += (f", parameters {c['parameters_after']}/{c['parameters_before']} "
                     f"({c['parameters_after'] / c['parameters_before']:.4f})")
        return text

    @property
    def removed_nothing(self) -> bool:
        """No run removed neurons, heads, layers, experts or channels."""
        return self.structure is None and self.experts is None and self.channels is None

    def _describe_experts(self) -> str:
        e = self.experts or {}
        text = f"routed experts {e.get('experts_after')}/{e.get('experts_before')} per MoE layer"
        if e.get("parameters_before"):
            text += (f", parameters {e['parameters_after']}/{e['parameters_before']} "
                     f"({e['parameters_after'] / e['parameters_before']:.4f})")
        return text

    def summary(self) -> str:
        """One line: what was removed, the sparsity of the remaining weights, or both."""
        parts = []
        if self.structure is not None:
            parts.append(self.structure.describe())
        if self.experts is not None:
            parts.append(self._describe_experts())
        if self.channels is not None:
            parts.append(self._describe_channels())
        if self.zeroed or self.removed_nothing:
            label = ("of the remaining decoder Linear weights" if not self.removed_nothing
                     else "of decoder Linear weights")
            parts.append(f"sparsity {self.overall:.4f} {label}")
        return "; ".join(parts)

    def __str__(self) -> str:
        show_sparsity = self.zeroed or self.removed_nothing
        structure = self.structure
        header = f"{'layer':>5}"
        if structure is not None:
            header += f"  {'MLP neurons':>13}  {'heads':>9}"
        if show_sparsity:
            header += f"  {'sparsity':>8}"
        lines = [header]
        per_layer = self.per_layer if structure is not None or show_sparsity else []  # no column to show
        if not per_layer:
            lines = []
        for i, sparsity in enumerate(per_layer):
            line = f"{i:>5}"
            if structure is not None:
                line += f"  {_kept_of(structure, 'mlp_neurons', i):>13}  {_kept_of(structure, 'attention_heads', i):>9}"
            if show_sparsity:
                line += f"  {sparsity:>8.4f}"
            lines.append(line)
        if structure is not None:
            lines.append(f"structured pruning {structure.describe()}")
        if self.experts is not None:
            lines.append(f"expert pruning: {self._describe_experts()}")
        if self.channels is not None:
            lines.append(f"hidden-size pruning: {self._describe_channels()}")
        if show_sparsity:
            label = "remaining decoder Linear weights" if structure is not None else "decoder Linear weights"
            lines.append(f"overall sparsity of {label}: {self.overall:.4f} ({self.zeros}/{self.total})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "overall": round(self.overall, 6),
            "per_layer": [round(s, 6) for s in self.per_layer],
            "modules": {name: round(s, 6) for name, s in self.per_module.items()},
        }


def _kept_of(structure: StructureSummary, key: str, index: int) -> str:
    kept, dense = structure.kept.get(key) or [], structure.dense.get(key) or []
    if index >= len(kept) or index >= len(dense):
        return "n/a"
    return f"{kept[index]}/{dense[index]}"


def zeroing_runs(record: dict[str, Any] | None) -> int:
    """How many runs of a pruning record (this one and its ``previous`` list) zeroed weights.

    A run removed neurons or heads when the record's ``structure`` entry changed with it, and
    routed experts or residual channels when it has a ``removed_experts`` or ``removed_channels``
    entry; every other run with a non-zero sparsity set weights to zero.
    """
    if not record:
        return 0
    chain = [*(record.get("previous") or []), {k: v for k, v in record.items() if k != "previous"}]
    count = 0
    for index, run in enumerate(chain):
        before = chain[index - 1].get("structure") if index else None
        shrank = ((bool(run.get("structure")) and run.get("structure") != before) or bool(run.get("removed_experts"))
                  or bool(run.get("removed_channels")))
        if not shrank and float(run.get("sparsity") or 0) > 0:
            count += 1
    return count


def expert_summary(record: dict[str, Any] | None) -> dict[str, int] | None:
    """Routed experts per MoE layer and parameters before the first expert-pruning run of a record and
    after its last; ``None`` when no run removed experts."""
    if not record:
        return None
    chain = [*(record.get("previous") or []), {k: v for k, v in record.items() if k != "previous"}]
    runs = [run["removed_experts"] for run in chain if isinstance(run.get("removed_experts"), dict)]
    if not runs:
        return None
    return {"experts_before": runs[0].get("experts_before"), "experts_after": runs[-1].get("experts_after"),
            "parameters_before": runs[0].get("parameters_before"), "parameters_after": runs[-1].get("parameters_after")}


def channel_summary(record: dict[str, Any] | None) -> dict[str, int] | None:
    """Hidden size and parameters before the first hidden-size pruning run of a record and after its last;
    ``None`` when no run removed residual channels."""
    if not record:
        return None
    chain = [*(record.get("previous") or []), {k: v for k, v in record.items() if k != "previous"}]
    runs = [run["removed_channels"] for run in chain if isinstance(run.get("removed_channels"), dict)]
    if not runs:
        return None
    return {"hidden_before": runs[0].get("hidden_before"), "hidden_after": runs[-1].get("hidden_after"),
            "parameters_before": runs[0].get("parameters_before"), "parameters_after": runs[-1].get("parameters_after")}


def measure_sparsity(model: nn.Module) -> PruningReport:
    """Count zeros in every prunable weight inside the decoder layers (through peft/DDP wrappers;
    offloaded weights are read from their store): the one sparsity count of hf_prune."""
    per_module: dict[str, float] = {}
    layer_zeros = [0] * len(DecoderLayout(unwrap_model(model)))
    layer_count = [0] * len(layer_zeros)
    for op in decoder_operators(model, include_routers=True):  # routers count once `targets` pruned them
        weight = op.stored_weight(read_parameter(op.module, op.parameter))  # offloaded: read from the store
        zeros = int((weight == 0).sum()) if weight.device.type != "meta" else 0
        per_module[op.name] = zeros / weight.numel() if weight.numel() else 0.0
        layer_zeros[op.layer_index] += zeros
        layer_count[op.layer_index] += weight.numel()
    per_layer = [z / c if c else 0.0 for z, c in zip(layer_zeros, layer_count)]
    zeros_total, count_total = sum(layer_zeros), sum(layer_count)
    overall = zeros_total / count_total if count_total else 0.0
    return PruningReport(per_module, per_layer, overall, zeros_total, count_total)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total

