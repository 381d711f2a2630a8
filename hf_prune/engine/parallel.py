"""Layer-parallel pruning for methods whose decoder layers are independent.

A pruner with ``layers_take_dense_inputs`` (FISTAPruner by default) prunes every decoder layer
from the hidden states of the *dense* model, so layer ``l`` never waits for layers ``< l``.
Here the dense hidden states are computed layer by layer (one dense forward of the model
over the calibration data, on the main device) and each layer, with its dense inputs, is
handed to a worker as soon as its inputs are known:

* one worker thread per device: the pruner's ``worker_devices``, or every visible GPU (a
  single device, no thread, otherwise). Layers go round-robin to the devices; a device holds at most two
  queued layers' inputs.
* under ``torch.distributed`` (launched with ``torchrun``; the process group is created from
  the environment when it does not exist yet), rank ``r`` of ``R`` prunes a contiguous share
  of the layers, then every layer's pruned weights are broadcast from the rank that pruned
  them (``distributed``), so every rank ends with the whole pruned model. With several
  processes per machine, each uses GPU ``LOCAL_RANK``.

Layers offloaded by accelerate (``device_map`` with ``"cpu"``/``"disk"``) are read from their
store for the dense pass (nothing written back) and again to be pruned (written back), so
a process holds one offloaded layer, plus one per worker thread.

The result is the same whatever the split: a layer's work depends only on its dense inputs.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from transformers.utils import logging

from ..config import PruningConfig
from ..methods.base import LayerPruner
from ..walker.layout import DecoderLayout, Operator
from .capture import LayerCall
from .distributed import broadcast_layers, distributed_state, failed_ranks
from .forward import check_finite, run_layer
from .layer_pass import layer_call, prune_layer, visit_layers
from .offload import OffloadStats, layer_on_device

logger = logging.get_logger(__name__)

MAX_QUEUED_PER_DEVICE = 2


def shard_layers(num_layers: int, world_size: int) -> list[int]:
    """Owner rank of each layer: contiguous, balanced shares (earlier ranks take the remainder)."""
    base, extra = divmod(num_layers, world_size)
    owners: list[int] = []
    for rank in range(world_size):
        owners += [rank] * (base + (1 if rank < extra else 0))
    return owners


def worker_devices(requested: list[str] | None, device_spec: str, main: torch.device,
                   world_size: int) -> list[torch.device]:
    """Devices this process spreads its layers over: ``requested`` (the pruner's ``worker_devices``),
    else every visible GPU when ``device_spec`` lets the engine choose, else ``main``."""
    if requested:
        devices = [torch.device(d) for d in requested]
        if any(d.type == "cuda" for d in devices) and not torch.cuda.is_available():
            raise ValueError(f"devices={requested} asks for CUDA but no GPU is visible; use devices=None or 'cpu'")
        return devices
    if main.type != "cuda" or device_spec not in ("auto", "cuda"):
        return [main]
    if world_size > 1 and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        return [torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))]
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def prune_from_dense_inputs(pruner: LayerPruner, layout: DecoderLayout, index: int, targets: list[Operator],
                            inputs: torch.Tensor, call: LayerCall, sparsity: float, device: torch.device,
                            batch_size: int, offload: OffloadStats | None = None) -> None:
    """Prune layer ``index`` on ``device`` from its dense ``inputs``; the layer goes back where it was
    (an offloaded layer is read from its store and its pruned weights written back)."""
    with layer_on_device(layout.model, layout.layers[index], layout.layer_prefix(index), device, offload):
        prune_layer(pruner, layout, index, targets, inputs.to(device), layer_call(call, device), sparsity, device,
                    batch_size, one_pass=False, need_outputs=False)


def prune_layers_parallel(layout: DecoderLayout, targets: list[list[Operator]], pruner: LayerPruner,
                          hidden: torch.Tensor, calls: list[LayerCall], config: PruningConfig,
                          device: torch.device, sparsities: list[float], offload: OffloadStats | None = None) -> None:
    """Prune this rank's share of the layers from dense inputs, over its devices; then share the results.

    Under torch.distributed, every rank learns whether any rank failed before the results
    are shared, so a failure on one rank stops all of them at once instead of leaving the
    others waiting in a collective until its timeout.
    """
    world_size, rank = distributed_state()
    error: Exception | None = None
    try:
        _prune_my_layers(layout, targets, pruner, hidden, calls, config, device, sparsities, world_size, rank,
                         offload)
    except Exception as exc:  # shared with the other ranks below, then re-raised
        if world_size == 1:
            raise
        error = exc
    if world_size == 1:
        return
    failed = failed_ranks(error is not None, world_size, rank)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(
            f"torch.distributed rank(s) {failed} failed while pruning their layers, so rank {rank} stops too; "
            "the cause is in the failing rank's log"
        )
    broadcast_layers(layout, targets, shard_layers(len(layout), world_size), rank)


def _prune_my_layers(layout: DecoderLayout, targets: list[list[Operator]], pruner: LayerPruner,
                     hidden: torch.Tensor, calls: list[LayerCall], config: PruningConfig, device: torch.device,
                     sparsities: list[float], world_size: int, rank: int, offload: OffloadStats | None) -> None:
    """This rank's layers, pruned from their dense inputs over this process's devices.

    One dense pass (layers onloaded read-only) computes each layer's dense inputs; a layer
    this rank owns is then pruned from them, inline on a single device or by the worker
    thread of its device (at most ``MAX_QUEUED_PER_DEVICE`` layers queued per device).
    """
    owners = shard_layers(len(layout), world_size)
    devices = worker_devices(pruner.worker_devices, config.device, device, world_size)
    main = devices[0] if device.type == "cuda" and world_size > 1 else device
    mine = [i for i, owner in enumerate(owners) if owner == rank]
    samples = hidden.shape[0]
    batch_size = min(config.batch_size or samples, samples)
    if world_size > 1 or len(devices) > 1:
        logger.info("rank %d/%d prunes layers %s on %s", rank, world_size, mine, [str(d) for d in devices])
    executors = [ThreadPoolExecutor(max_workers=1) for _ in devices] if len(devices) > 1 else []
    queued: list[deque[Future]] = [deque() for _ in devices]
    last = mine[-1] if mine else -1
    current = [hidden.to(main)]

    def visit(index: int) -> Callable[[], None] | None:
        inputs = current[0]
        if index < last:  # dense outputs: the next layer's inputs (computed before any pruning)
            current[0] = run_layer(layout.layers[index], inputs, layer_call(calls[index], main), batch_size)
            check_finite(current[0], index, layout.model.dtype)
        if owners[index] != rank:
            return None
        job = (pruner, layout, index, targets[index], inputs, calls[index], sparsities[index])
        return lambda: hand_over(mine.index(index), job)  # once this read-only hold has ended

    def hand_over(position: int, job: tuple) -> None:
        """Prune inline on a single device, else queue the layer on its device's worker thread."""
        if not executors:
            prune_from_dense_inputs(*job, devices[0], batch_size, offload)
            return
        slot = position % len(devices)
        while len(queued[slot]) >= MAX_QUEUED_PER_DEVICE:
            queued[slot].popleft().result()
        queued[slot].append(executors[slot].submit(prune_from_dense_inputs, *job, devices[slot], batch_size,
                                                   offload))

    try:
        visit_layers(layout, main, offload, visit, indices=range(last + 1), write_back=False,
                     desc="Pruning layers (dense inputs)")
        for pending in queued:
            while pending:
                pending.popleft().result()
    finally:
        for executor in executors:
            executor.shutdown(wait=True, cancel_futures=True)
