"""Measured sparsity of a model's decoder operators, read from the weights themselves."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .engine.offload import read_parameter
from .walker.layout import DecoderLayout


@dataclass
class PruningReport:
    """Share of exact zeros per operator, per layer and overall (decoder operators only)."""

    per_module: dict[str, float]
    per_layer: list[float]
    overall: float
    zeros: int
    total: int

    def __str__(self) -> str:
        lines = [f"{'layer':>5}  {'sparsity':>8}"]
        lines += [f"{i:>5}  {s:>8.4f}" for i, s in enumerate(self.per_layer)]
        lines.append(f"overall sparsity of decoder operator weights: {self.overall:.4f} ({self.zeros}/{self.total})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "overall": round(self.overall, 6),
            "per_layer": [round(s, 6) for s in self.per_layer],
            "modules": {name: round(s, 6) for name, s in self.per_module.items()},
        }


def measure_sparsity(model: nn.Module) -> PruningReport:
    """Count zeros in every operator inside the decoder layers (Linear, Conv1D, each expert's slice)."""
    layout = DecoderLayout(model)
    per_module: dict[str, float] = {}
    per_layer: list[float] = []
    zeros_total = 0
    count_total = 0
    for index in range(len(layout)):
        layer_zeros = 0
        layer_count = 0
        for op in layout.operators(index, include_routers=True):  # routers count once `targets` pruned them
            weight = op.stored_weight(read_parameter(op.module, op.parameter))  # offloaded: read from the store
            zeros = int((weight == 0).sum()) if weight.device.type != "meta" else 0
            per_module[op.name] = zeros / weight.numel() if weight.numel() else 0.0
            layer_zeros += zeros
            layer_count += weight.numel()
        per_layer.append(layer_zeros / layer_count if layer_count else 0.0)
        zeros_total += layer_zeros
        count_total += layer_count
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

