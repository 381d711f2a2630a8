"""The sequential engine: one decoder layer on the device at a time.

For each layer: move it to the device, run the calibration hidden states through it with
hooks on the targeted operators, prune, and keep its outputs as the next layer's inputs.

With all samples in one batch (the default), each operator is pruned in its forward
pre-hook as soon as its input statistics are complete, so the layer's pruned outputs
come out of that same pass: one forward per layer, and later operators of a layer are
calibrated on the inputs of the already-pruned earlier ones. With ``batch_size`` smaller
than the sample count, statistics are summed over the batches first and outputs are
recomputed in a second pass.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from .architectures import DecoderLayout, Operator
from .block_chunking import chunked_blocks
from .calibration import CalibrationSet
from .capture import LayerCall, capture_layer_inputs, move_to
from .config import PruningConfig
from .host_memory import return_freed_memory_to_os
from .layer_pass import StatisticsCollector, check_finite, run_layer
from .methods.base import LayerContext, LayerPruner
from .offload import OffloadStats, is_offloaded, layer_on_device, place_activations
from .owl import owl_layer_sparsities
from .statistics import InputStatistics

logger = logging.get_logger(__name__)


@dataclass
class PruningRun:
    """What the engine did: the target sparsity of each layer and the wall time."""

    layer_sparsity: list[float]
    seconds: float
    offload: OffloadStats | None = None


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` is the first GPU when one is visible, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={spec!r} was asked for but no CUDA GPU is visible; use device='auto' or 'cpu'")
    return device


def prune_operator_now(pruner: LayerPruner, op: Operator, stats: InputStatistics | None, sparsity: float,
                       device: torch.device) -> None:
    """Prune one operator's weight in fp32 on ``device`` and write it back in place."""
    weight = op.read_weight().to(device=device, dtype=torch.float32).clone()
    op.write_weight(pruner.prune_operator(op, weight, stats, sparsity))


def prune_model(model: PreTrainedModel, config: PruningConfig, calibration: CalibrationSet | None) -> PruningRun:
    """Prune ``model`` in place, layer by layer, as ``config`` says."""
    start_time = time.perf_counter()
    return_freed_memory_to_os()  # activations of each layer are freed before the next: keep RSS flat
    layout = DecoderLayout(model)
    pruner = config.make_pruner()
    targets = layout.all_targeted(config.targets)
    for ops in targets:
        for op in ops:
            pruner.validate(op)
    device = resolve_device(config.device)
    offload = OffloadStats() if is_offloaded(model) else None
    was_training = model.training
    model.eval()
    try:
        if not config.uses_calibration:
            sparsities = [config.sparsity] * len(layout)
            for index in logging.tqdm(range(len(layout)), desc="Pruning layers", unit="layer"):
                context = LayerContext(layout, index, layout.layers[index], None, None, targets[index],
                                       sparsities[index], device, 1)
                with layer_on_device(model, layout.layers[index], layout.layer_prefix(index), device, offload):
                    pruner.start_layer(context)
                    for op in targets[index] if pruner.prunes_operators else ():
                        prune_operator_now(pruner, op, None, sparsities[index], device)
                    pruner.finish_layer(context)
        else:
            if calibration is None:
                raise ValueError(f"method {config.method!r} needs calibration data")
            hidden, calls = capture_layer_inputs(layout, calibration.input_ids)
            if config.owl is not None:
                sparsities = owl_layer_sparsities(layout, targets, hidden, calls, config, device, offload)
            else:
                sparsities = [config.sparsity] * len(layout)
            if getattr(pruner, "dense_inputs", False):  # layers independent: parallel over devices/ranks
                from .parallel import prune_layers_parallel

                prune_layers_parallel(layout, targets, pruner, hidden, calls, config, device, sparsities, offload)
            else:
                handed_over = [hidden]  # no reference stays here: layer 0's inputs are freed after layer 0
                del hidden
                _prune_with_data(layout, targets, pruner, handed_over, calls, config, device, sparsities, offload)
    finally:
        model.train(was_training)
    return PruningRun(sparsities, time.perf_counter() - start_time, offload)


def _prune_with_data(layout: DecoderLayout, targets: list[list[Operator]], pruner: LayerPruner,
                     handed_over: list[torch.Tensor], calls: list[LayerCall], config: PruningConfig,
                     device: torch.device, sparsities: list[float], offload: OffloadStats | None = None) -> None:
    """The sequential pass. ``handed_over`` holds layer 0's inputs and is emptied, so that each
    layer's inputs are freed as soon as its outputs replace them."""
    hidden = handed_over.pop()
    samples = hidden.shape[0]
    batch_size = min(config.batch_size or samples, samples)
    hidden, batch_size = place_activations(hidden, device, batch_size)
    one_pass = pruner.prunes_operators and batch_size >= samples
    for index in logging.tqdm(range(len(layout)), desc="Pruning layers", unit="layer"):
        with layer_on_device(layout.model, layout.layers[index], layout.layer_prefix(index), device, offload):
            hidden = _prune_layer(layout, targets, pruner, hidden, calls, device, sparsities, index, batch_size,
                                  one_pass)


def _prune_layer(layout: DecoderLayout, targets: list[list[Operator]], pruner: LayerPruner, hidden: torch.Tensor,
                 calls: list[LayerCall], device: torch.device, sparsities: list[float], index: int,
                 batch_size: int, one_pass: bool) -> torch.Tensor:
    """Prune decoder layer ``index`` (already on ``device``); return its outputs for ``hidden``."""
    layer = layout.layers[index]
    call = LayerCall(move_to(calls[index].args, device), move_to(calls[index].kwargs, device))
    sparsity = sparsities[index]

    def prune_now(op: Operator, stats: InputStatistics | None, sparsity: float = sparsity) -> None:
        prune_operator_now(pruner, op, stats, sparsity, device)

    context = LayerContext(layout, index, layer, hidden, call, targets[index], sparsity, device, batch_size)
    pruner.start_layer(context)
    collector = StatisticsCollector(
        targets[index], pruner.statistics_kind, device, on_ready=prune_now if one_pass else None
    )
    try:
        with chunked_blocks(layout, index, targets[index], collector) if one_pass else contextlib.nullcontext():
            outputs = run_layer(layer, hidden, call, batch_size, collector.end_batch)
    finally:
        collector.remove()
    context.stats = collector.stats
    if one_pass:
        missing = [op.name for op in targets[index] if op.name not in collector.done]
        if missing:
            raise RuntimeError(
                f"targeted operators {missing} were never called in their layer's forward pass, so they "
                "have no calibration statistics; exclude them with `targets`"
            )
        if pruner.finish_layer(context):
            outputs = run_layer(layer, hidden, call, batch_size)
    else:
        if pruner.prunes_operators:
            for op in targets[index]:
                prune_now(op, collector.stats.get(op.name))
        changed = pruner.finish_layer(context)
        if pruner.prunes_operators or changed:
            outputs = run_layer(layer, hidden, call, batch_size)
    del context
    del collector
    check_finite(outputs, index, layout.model.dtype)
    return outputs
