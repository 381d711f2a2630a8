"""Measured sparsity of a model's decoder operators, read from the weights themselves."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .engine.offload import read_parameter
from .walker.layout import DecoderLayout, decoder_operators, unwrap_model


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
        lines.append(f"overall sparsity of decoder Linear weights: {self.overall:.4f} ({self.zeros}/{self.total})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "overall": round(self.overall, 6),
            "per_layer": [round(s, 6) for s in self.per_layer],
            "modules": {name: round(s, 6) for name, s in self.per_module.items()},
        }


def measure_sparsity(model: nn.Module) -> PruningReport:
    """Count zeros in every prunable weight inside the decoder layers (through peft/DDP wrappers;
    offloaded weights are read from their store): the one sparsity count of hf_prune."""
    per_module: dict[str, float] = {}
    layer_zeros = [0] * len(DecoderLayout(unwrap_model(model)))
    layer_count = [0] * len(layer_zeros)
    for op in decoder_operators(model):
        weight = read_parameter(op.module, "weight")
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

