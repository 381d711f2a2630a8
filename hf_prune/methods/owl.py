"""OWL (arXiv 2310.05175): outlier-weighted, non-uniform sparsity per decoder layer.

A dense pass over the calibration data measures, per layer, the share of Wanda scores
``|W| * ||X||`` above ``threshold`` times the layer's mean score. Those outlier ratios
are mapped linearly onto ``[-max_shift, +max_shift]``, centred, and subtracted from the
target sparsity: layers with more outliers keep more weights; the mean stays the target.
"""

from __future__ import annotations

import torch
from transformers.utils import logging

from ..config import PruningConfig
from ..engine.activations import place_activations
from ..engine.capture import LayerCall
from ..engine.layer_pass import layer_call, observe_layer, visit_layers
from ..engine.offload import OffloadStats
from ..engine.statistics import InputStatistics, StatKind
from ..walker.layout import DecoderLayout, Operator

logger = logging.get_logger(__name__)


def outlier_ratio(ops: list[Operator], stats: dict[str, InputStatistics], threshold: float) -> float:
    """Share of the layer's ``|W| * ||X||`` scores above ``threshold`` x their mean."""
    scores = []
    for op in ops:
        if op.name not in stats:  # an expert routed no calibration token
            continue
        norms = stats[op.name].column_norms
        weight = op.read_weight().to(device=norms.device, dtype=torch.float32)
        scores.append((weight.abs() * norms.unsqueeze(0)).flatten())
    flat = torch.cat(scores)
    return float((flat > threshold * flat.mean()).float().mean())


def spread_sparsity(ratios: list[float], target: float, max_shift: float) -> list[float]:
    """Per-layer sparsities from outlier ratios, averaging to ``target``."""
    values = torch.tensor(ratios, dtype=torch.float64)
    span = values.max() - values.min()
    if span <= 0:
        return [target] * len(ratios)
    shift = (values - values.min()) / span * (2 * max_shift)
    shift -= shift.mean()
    return [float(min(max(target - s, 0.0), 0.999)) for s in shift]


def owl_layer_sparsities(layout: DecoderLayout, targets: list[list[Operator]], hidden: torch.Tensor,
                         calls: list[LayerCall], config: PruningConfig, device: torch.device,
                         offload: OffloadStats | None = None) -> list[float]:
    """Run the dense model over the calibration data and return OWL's sparsity per layer
    (offloaded layers are read from their store one at a time and left unchanged)."""
    settings = config.owl
    samples = hidden.shape[0]
    batch_size = min(config.batch_size or samples, samples)
    hidden, batch_size = place_activations(hidden, device, batch_size)
    ratios = []
    current = [hidden]
    del hidden

    def visit(index: int) -> None:
        outputs, stats, _ = observe_layer(layout.layers[index], current.pop(), layer_call(calls[index], device),
                                          batch_size, targets[index], lambda op: StatKind.NORMS, device, index,
                                          layout.model.dtype, gate_weighting=config.expert_gate_weighting)
        current.append(outputs)
        ratios.append(outlier_ratio(targets[index], stats, settings.threshold) if targets[index] else 0.0)

    visit_layers(layout, device, offload, visit, desc="OWL outlier scan", write_back=False)
    sparsities = spread_sparsity(ratios, config.sparsity, settings.max_shift)
    logger.info("OWL layer sparsities: %s", ", ".join(f"{s:.3f}" for s in sparsities))
    return sparsities
