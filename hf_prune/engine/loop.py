"""The sequential engine: one decoder layer on the device at a time.

For each layer: put it on the device, run the calibration hidden states through it with
hooks on the targeted operators, prune, and keep its outputs as the next layer's inputs.

With ``true_sequential`` and all samples in one batch, each operator is pruned in its
forward pre-hook as soon as its input statistics are complete, so the layer's pruned
outputs come out of that same pass: one forward per layer, and later operators of a layer
are calibrated on the inputs of the already-pruned earlier ones. Otherwise (or with
``batch_size`` smaller than the sample count) statistics of the whole dense layer are summed
over the batches first, everything is pruned, and outputs are recomputed in a second pass.
Methods whose layers take the dense model's inputs (``LayerPruner.layers_take_dense_inputs``)
go to ``parallel`` instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from ..config import PruningConfig
from ..data.calibration import CalibrationSet
from ..methods.base import LayerPruner, ModelContext
from ..methods.owl import owl_layer_sparsities
from ..walker.layout import DecoderLayout, Operator
from .activations import place_activations
from .capture import LayerCall, capture_layer_inputs
from .chunking import dense_pass_samples
from .experts import expert_calibration_record
from .host_memory import returning_freed_memory
from .layer_pass import layer_call, prune_layer, visit_layers
from .offload import OffloadStats, is_offloaded
from .parallel import prune_layers_parallel

logger = logging.get_logger(__name__)


@dataclass
class PruningRun:
    """What the engine did: the target sparsity of each kept layer, the wall time, and which
    decoder layers (indices before the run) are left when the method removed some."""

    layer_sparsity: list[float]
    seconds: float
    offload: OffloadStats | None = None
    kept_layers: list[int] | None = None
    experts: dict | None = None  # per-expert calibration tokens and fallbacks (MoE), for the record
    record_entries: dict | None = None  # what the method adds to the pruning record (removed experts...)


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` is the first GPU when one is visible, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={spec!r} was asked for but no CUDA GPU is visible; use device='auto' or 'cpu'")
    return device


def _plan(model: PreTrainedModel, config: PruningConfig
          ) -> tuple[DecoderLayout, LayerPruner, list[list[Operator]], torch.device]:
    layout = DecoderLayout(model)
    pruner = config.make_pruner()
    targets = layout.all_targeted(config.targets)
    for ops in targets:
        for op in ops:
            pruner.validate(op)
    pruner.validate_layout(layout)
    return layout, pruner, targets, resolve_device(config.device)


def check_pruning_plan(model: PreTrainedModel, config: PruningConfig) -> None:
    """Raise, before any calibration or forward pass, if ``config`` cannot be applied to ``model``.

    Checks what the shapes alone decide: the architecture is supported, ``targets`` match
    operators, every targeted operator's input width takes the pattern (N:M needs M to
    divide it), the method accepts each operator, and the device exists. Only module
    shapes are read, so ``model`` may be a skeleton on the ``meta`` device.
    """
    _plan(model, config)


def prune_model(model: PreTrainedModel, config: PruningConfig, calibration: CalibrationSet | None) -> PruningRun:
    """Prune ``model`` in place, layer by layer, as ``config`` says."""
    with returning_freed_memory():  # activations of each layer are freed before the next: keep RSS flat
        return _prune_model(model, config, calibration)


def _prune_model(model: PreTrainedModel, config: PruningConfig, calibration: CalibrationSet | None) -> PruningRun:
    start_time = time.perf_counter()
    layout, pruner, targets, device = _plan(model, config)
    offload = OffloadStats() if is_offloaded(model) else None
    was_training = model.training
    model.eval()
    layers_before = list(layout.layers)
    try:
        if not config.uses_calibration:
            sparsities = [config.sparsity] * len(layout)
            visit_layers(layout, device, offload, lambda index: prune_layer(
                pruner, layout, index, targets[index], None, None, sparsities[index], device, 1,
                one_pass=False, need_outputs=False))
        else:
            if calibration is None:
                raise ValueError(f"method {config.method!r} needs calibration data")
            hidden, calls = capture_layer_inputs(layout, calibration.input_ids)
            if config.owl is not None:
                sparsities = owl_layer_sparsities(layout, targets, hidden, calls, config, device, offload)
            else:
                sparsities = [config.sparsity] * len(layout)
            if pruner.layers_take_dense_inputs:  # layers independent: parallel over devices/ranks
                prune_layers_parallel(layout, targets, pruner, hidden, calls, config, device, sparsities, offload)
            else:
                handed_over = [hidden]  # no reference stays here: layer 0's inputs are freed after layer 0
                del hidden
                _prune_sequentially(layout, targets, pruner, handed_over, calls, config, device, sparsities, offload)
        pruner.finish_model(ModelContext(layout, calibration.input_ids if calibration is not None else None, device,
                                         config.batch_size or 1))
    finally:
        model.train(was_training)
    # a method that removed experts records them itself; the per-expert calibration record would
    # describe the removed experts' slices
    experts = None if pruner.observes_expert_outputs else expert_calibration_record(
        targets, pruner.expert_tokens, pruner.expert_fallbacks, config.expert_token_floor,
        config.expert_gate_weighting)
    entries = dict(pruner.record_entries) or None
    remaining = {id(layer) for layer in layout.layers}
    kept = [index for index, layer in enumerate(layers_before) if id(layer) in remaining]
    if len(kept) == len(layers_before):
        return PruningRun(sparsities, time.perf_counter() - start_time, offload, experts=experts,
                          record_entries=entries)
    return PruningRun([sparsities[i] for i in kept], time.perf_counter() - start_time, offload, kept_layers=kept,
                      experts=experts, record_entries=entries)


def _prune_sequentially(layout: DecoderLayout, targets: list[list[Operator]], pruner: LayerPruner,
                        handed_over: list[torch.Tensor], calls: list[LayerCall], config: PruningConfig,
                        device: torch.device, sparsities: list[float], offload: OffloadStats | None) -> None:
    """Each layer calibrated on the pruned outputs of the one before. ``handed_over`` holds layer 0's
    inputs and is emptied, so that each layer's inputs are freed as soon as its outputs replace them."""
    hidden = handed_over.pop()
    samples = hidden.shape[0]
    batch_size = min(config.batch_size or samples, samples)
    hidden, batch_size = place_activations(hidden, device, batch_size)
    one_pass = pruner.prunes_operators and config.resolved_true_sequential and batch_size >= samples
    if pruner.prunes_operators and config.true_sequential and batch_size < samples:
        logger.warning("true_sequential=True needs all %d calibration samples in one pass, but only %d fit on %s: "
                       "every operator of a layer is calibrated on the layer's dense pass instead", samples,
                       batch_size, device)
    if pruner.prunes_operators and not one_pass and config.batch_size is None:
        # two passes over the whole layer: without chunked blocks, few samples per forward keep them as small
        batch_size = min(batch_size, dense_pass_samples(layout, hidden))
    current = [hidden]
    del hidden

    def visit(index: int) -> None:
        inputs = current.pop()
        current.append(prune_layer(pruner, layout, index, targets[index], inputs, layer_call(calls[index], device),
                                   sparsities[index], device, batch_size, one_pass=one_pass))

    visit_layers(layout, device, offload, visit)
