"""One decoder layer at a time: the per-layer loop, the statistics pass, and pruning one layer.

Every path of the engine is built from the three functions here:

* :func:`visit_layers`: the per-layer loop. Each layer is put on the device (onloaded from
  accelerate's store when offloaded; written back afterwards unless ``write_back`` is off)
  for the visit, with a progress bar.
* :func:`observe_layer`: run hidden states through a layer with statistics hooks on its
  operators (optionally pruning each as soon as its statistics are complete, with blocks
  run in chunks), and check that the outputs are finite.
* :func:`prune_layer`: a method's whole treatment of one layer (``start_layer``, the
  statistics pass, operator pruning, ``finish_layer``), returning the outputs for the next
  layer when asked.

The sequential pass, OWL's outlier scan and the layer-parallel dense pass are loops of
:func:`visit_layers` over these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.utils import logging

from ..methods.base import LayerContext, LayerPruner
from ..walker.layout import DecoderLayout, Operator
from .capture import LayerCall, move_to
from .chunking import chunked_blocks
from .collector import StatisticsCollector
from .experts import ExpertOutputObserver
from .forward import check_finite, run_layer
from .offload import OffloadStats, layer_on_device
from .statistics import InputStatistics, StatKind

if TYPE_CHECKING:
    from contextlib import AbstractContextManager


def layer_call(call: LayerCall, device: torch.device) -> LayerCall:
    """A layer's recorded call arguments, moved to ``device``."""
    return LayerCall(move_to(call.args, device), move_to(call.kwargs, device))


def visit_layers(layout: DecoderLayout, device: torch.device, offload: OffloadStats | None,
                 visit: Callable[[int], Callable[[], None] | None], *, indices: Iterable[int] | None = None,
                 desc: str = "Pruning layers", write_back: bool = True) -> None:
    """The per-layer loop: call ``visit(index)`` with decoder layer ``index`` held on ``device``.

    ``write_back=False`` onloads offloaded layers read-only (dense passes). ``visit`` may return
    a callable, run once the layer is put back (to hand the layer to a worker that onloads it
    again, say).
    """
    indices = range(len(layout)) if indices is None else indices
    for index in logging.tqdm(indices, desc=desc, unit="layer"):
        with layer_on_device(layout.model, layout.layers[index], layout.layer_prefix(index), device, offload,
                             write_back=write_back):
            after = visit(index)
        if after is not None:
            after()


def observe_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall, batch_size: int, ops: list[Operator],
                  kind_for: Callable[[Operator], StatKind], device: torch.device, layer_index: int,
                  model_dtype: torch.dtype, *,
                  on_ready: Callable[[Operator, InputStatistics | None], None] | None = None,
                  chunking: Callable[[StatisticsCollector], AbstractContextManager] | None = None,
                  gate_weighting: bool = False,
                  on_expert_output: ExpertOutputObserver | None = None,
                  ) -> tuple[torch.Tensor, dict[str, InputStatistics], set[str]]:
    """Run ``hidden`` through ``layer`` with statistics hooks on ``ops``; return the outputs, the
    statistics per operator name and the operators pruned inside the pass (via ``on_ready``).

    ``chunking(collector)``, when given, is a context that runs the layer's blocks in chunks
    of samples (one-pass pruning). Expert slices among ``ops`` see only their expert's tokens
    (weighted by the router's gate values with ``gate_weighting``). Raises
    ``NonFiniteActivationError`` on NaN/Inf outputs.
    """
    collector = StatisticsCollector(ops, kind_for, device, on_ready=on_ready, gate_weighting=gate_weighting,
                                    on_expert_output=on_expert_output)
    try:
        with chunking(collector) if chunking is not None else contextlib.nullcontext():
            outputs = run_layer(layer, hidden, call, batch_size, collector.end_batch)
    finally:
        collector.remove()
    check_finite(outputs, layer_index, model_dtype)
    return outputs, collector.stats, collector.done


def prune_layer(pruner: LayerPruner, layout: DecoderLayout, index: int, targets: list[Operator],
                hidden: torch.Tensor | None, call: LayerCall | None, sparsity: float, device: torch.device,
                batch_size: int, *, one_pass: bool, need_outputs: bool = True) -> torch.Tensor | None:
    """Prune decoder layer ``index`` (already on ``device``) as ``pruner`` says.

    ``hidden`` are the layer's calibration inputs (``None`` for data-free methods) and ``call``
    its other arguments, on ``device``. With ``one_pass`` each operator is pruned inside the
    statistics pass as soon as its statistics are complete, blocks running in chunks;
    otherwise after the pass. Returns the layer's pruned outputs for ``hidden`` when
    ``need_outputs``, else ``None`` (the pass is then skipped when no statistics are needed).
    """
    layer = layout.layers[index]
    context = LayerContext(layout, index, layer, hidden, call, targets, sparsity, device, batch_size)
    pruner.start_layer(context)

    def prune_now(op: Operator, stats: InputStatistics | None) -> None:
        pruner.prune_in_place(op, stats, sparsity, device)

    outputs = None
    wants_stats = any(pruner.statistics_kind(op) is not StatKind.NONE for op in targets)
    if hidden is not None and (need_outputs or one_pass or wants_stats):
        outputs, context.stats, done = observe_layer(
            layer, hidden, call, batch_size, targets, pruner.statistics_kind, device, index, layout.model.dtype,
            on_ready=prune_now if one_pass else None,
            chunking=(lambda collector: chunked_blocks(layout, index, targets, collector)) if one_pass else None,
            gate_weighting=pruner.config.expert_gate_weighting,
            on_expert_output=pruner.observe_expert_output if pruner.observes_expert_outputs else None,
        )
        context.outputs = outputs
        missing = [op.name for op in targets if op.name not in done] if one_pass else []
        if missing:
            raise RuntimeError(
                f"targeted operators {missing} were never called in their layer's forward pass, so they "
                "have no calibration statistics; exclude them with `targets`"
            )
    if not one_pass and pruner.prunes_operators:
        for op in targets:
            prune_now(op, context.stats.get(op.name))
    changed = pruner.finish_layer(context)
    del context
    if not need_outputs or hidden is None:
        return None
    if changed or (not one_pass and pruner.prunes_operators):
        outputs = run_layer(layer, hidden, call, batch_size)
        check_finite(outputs, index, layout.model.dtype)
    return outputs
