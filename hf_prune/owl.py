"""OWL (arXiv 2310.05175): outlier-weighted, non-uniform sparsity per decoder layer.

A dense pass over the calibration data measures, per layer, the share of Wanda scores
``|W| * ||X||`` above ``threshold`` times the layer's mean score. Those outlier ratios
are mapped linearly onto ``[-max_shift, +max_shift]``, centred, and subtracted from the
target sparsity: layers with more outliers keep more weights; the mean stays the target.
"""

from __future__ import annotations

import torch
from transformers.utils import logging

from .architectures import DecoderLayout, Operator
from .capture import LayerCall, move_to
from .config import PruningConfig
from .layer_pass import StatisticsCollector, check_finite, run_layer
from .offload import OffloadStats, layer_on_device, place_activations
from .statistics import StatKind

logger = logging.get_logger(__name__)


def outlier_ratio(ops: list[Operator], collector: StatisticsCollector, threshold: float) -> float:
    """Share of the layer's ``|W| * ||X||`` scores above ``threshold`` x their mean."""
    scores = []
    for op in ops:
        norms = collector.stats[op.name].column_norms
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
    for index in logging.tqdm(range(len(layout)), desc="OWL outlier scan", unit="layer"):
        layer = layout.layers[index]
        with layer_on_device(layout.model, layer, layout.layer_prefix(index), device, offload, write_back=False):
            call = LayerCall(move_to(calls[index].args, device), move_to(calls[index].kwargs, device))
            collector = StatisticsCollector(targets[index], lambda op: StatKind.NORMS, device)
            try:
                hidden = run_layer(layer, hidden, call, batch_size, collector.end_batch)
            finally:
                collector.remove()
            check_finite(hidden, index, layout.model.dtype)
            ratios.append(outlier_ratio(targets[index], collector, settings.threshold) if targets[index] else 0.0)
    sparsities = spread_sparsity(ratios, config.sparsity, settings.max_shift)
    logger.info("OWL layer sparsities: %s", ", ".join(f"{s:.3f}" for s in sparsities))
    return sparsities
