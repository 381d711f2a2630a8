"""Layer-parallel pruning for methods whose decoder layers are independent.

A pruner with ``dense_inputs = True`` (FISTAPruner by default) prunes every decoder layer
from the hidden states of the *dense* model, so layer ``l`` never waits for layers ``< l``.
Here the dense hidden states are computed layer by layer (one dense forward of the model
over the calibration data, on the main device) and each layer, with its dense inputs, is
handed to a worker as soon as its inputs are known:

* one worker thread per device: ``config.devices``, or every visible GPU (a single device,
  no thread, otherwise). Layers go round-robin to the devices; a device holds at most two
  queued layers' inputs.
* under ``torch.distributed`` (launched with ``torchrun``; the process group is created from
  the environment when it does not exist yet), rank ``r`` of ``R`` prunes a contiguous share
  of the layers, then every layer's pruned weights are broadcast from the rank that pruned
  them, so every rank ends with the whole pruned model. Only rank 0 saves
  (``is_main_process``). With several processes per machine, each uses GPU ``LOCAL_RANK``.

Layers offloaded by accelerate (``device_map`` with ``"cpu"``/``"disk"``) are read from their
store for the dense pass (nothing written back) and again to be pruned (written back), so
a process holds one offloaded layer, plus one per worker thread.

The result is the same whatever the split: a layer's work depends only on its dense inputs.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from transformers.utils import logging

from .architectures import DecoderLayout, Operator
from .capture import LayerCall, move_to
from .config import PruningConfig
from .engine import prune_operator_now
from .layer_pass import StatisticsCollector, check_finite, run_layer
from .methods.base import LayerContext, LayerPruner
from .offload import OffloadStats, is_offloaded, layer_on_device

logger = logging.get_logger(__name__)

MAX_QUEUED_PER_DEVICE = 2


def distributed_state() -> tuple[int, int]:
    """``(world_size, rank)``; creates the process group from ``torchrun``'s environment if needed."""
    if not torch.distributed.is_available():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        return 1, 0
    dist = torch.distributed
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 1, 0
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        logger.info("torch.distributed initialised from the environment: %s, world size %d", backend,
                    dist.get_world_size())
    return dist.get_world_size(), dist.get_rank()


def is_main_process() -> bool:
    """False on every torch.distributed rank but 0 (True without torch.distributed)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shard_layers(num_layers: int, world_size: int) -> list[int]:
    """Owner rank of each layer: contiguous, balanced shares (earlier ranks take the remainder)."""
    base, extra = divmod(num_layers, world_size)
    owners: list[int] = []
    for rank in range(world_size):
        owners += [rank] * (base + (1 if rank < extra else 0))
    return owners


def worker_devices(config: PruningConfig, main: torch.device, world_size: int) -> list[torch.device]:
    """Devices this process spreads its layers over."""
    requested = getattr(config, "devices", None)
    if requested:
        devices = [torch.device(d) for d in requested]
        if any(d.type == "cuda" for d in devices) and not torch.cuda.is_available():
            raise ValueError(f"devices={requested} asks for CUDA but no GPU is visible; use devices=None or 'cpu'")
        return devices
    if main.type != "cuda" or config.device not in ("auto", "cuda"):
        return [main]
    if world_size > 1 and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        return [torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))]
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def prune_one_layer(pruner: LayerPruner, layout: DecoderLayout, index: int, targets: list[Operator],
                    inputs: torch.Tensor, call: LayerCall, sparsity: float, device: torch.device,
                    batch_size: int, offload: OffloadStats | None = None) -> None:
    """Prune layer ``index`` on ``device`` from its dense ``inputs``; the layer goes back where it was
    (an offloaded layer is read from its store and its pruned weights written back)."""
    layer = layout.layers[index]
    with layer_on_device(layout.model, layer, layout.layer_prefix(index), device, offload):
        context = LayerContext(layout, index, layer, inputs.to(device),
                               LayerCall(move_to(call.args, device), move_to(call.kwargs, device)),
                               targets, sparsity, device, batch_size)
        pruner.start_layer(context)
        if pruner.prunes_operators:
            collector = StatisticsCollector(targets, pruner.statistics_kind, device)
            try:
                run_layer(layer, context.inputs, context.call, batch_size, collector.end_batch)
            finally:
                collector.remove()
            context.stats = collector.stats
            for op in targets:
                prune_operator_now(pruner, op, collector.stats.get(op.name), sparsity, device)
        pruner.finish_layer(context)


def prune_layers_parallel(layout: DecoderLayout, targets: list[list[Operator]], pruner: LayerPruner,
                          hidden: torch.Tensor, calls: list[LayerCall], config: PruningConfig,
                          device: torch.device, sparsities: list[float], offload: OffloadStats | None = None) -> None:
    """Prune this rank's share of the layers from dense inputs, over its devices; then share the results.

    Under torch.distributed, every rank learns whether any rank failed before the results
    are shared, so a failure on one rank stops all of them at once instead of leaving the
    others waiting in a collective until its timeout.
    """
    world_size, rank = distributed_state()
    if world_size == 1:
        _prune_my_layers(layout, targets, pruner, hidden, calls, config, device, sparsities, world_size, rank,
                         offload)
        return
    error: Exception | None = None
    try:
        _prune_my_layers(layout, targets, pruner, hidden, calls, config, device, sparsities, world_size, rank,
                         offload)
    except Exception as exc:  # shared with the other ranks below, then re-raised
        error = exc
    failed = failed_ranks(error is not None, world_size, rank)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(
            f"torch.distributed rank(s) {failed} failed while pruning their layers, so rank {rank} stops too; "
            "the cause is in the failing rank's log"
        )
    broadcast_layers(layout, targets, shard_layers(len(layout), world_size), rank)


def failed_ranks(failed: bool, world_size: int, rank: int) -> list[int]:
    """The ranks that report ``failed``, agreed on by every rank (one all-reduce)."""
    dist = torch.distributed
    flags = torch.zeros(world_size, dtype=torch.int32, device=_comm_device())
    flags[rank] = int(failed)
    dist.all_reduce(flags)
    return [r for r, flag in enumerate(flags.tolist()) if flag]


def _comm_device() -> torch.device:
    """Where collective tensors live: the current GPU for NCCL, the CPU otherwise."""
    dist = torch.distributed
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _prune_my_layers(layout: DecoderLayout, targets: list[list[Operator]], pruner: LayerPruner,
                     hidden: torch.Tensor, calls: list[LayerCall], config: PruningConfig, device: torch.device,
                     sparsities: list[float], world_size: int, rank: int, offload: OffloadStats | None) -> None:
    """This rank's layers, pruned from their dense inputs over this process's devices."""
    owners = shard_layers(len(layout), world_size)
    devices = worker_devices(config, device, world_size)
    main = devices[0] if device.type == "cuda" and world_size > 1 else device
    mine = [i for i, owner in enumerate(owners) if owner == rank]
    samples = hidden.shape[0]
    batch_size = min(config.batch_size or samples, samples)
    if world_size > 1 or len(devices) > 1:
        logger.info("rank %d/%d prunes layers %s on %s", rank, world_size, mine, [str(d) for d in devices])
    progress = logging.tqdm(total=len(mine), desc="Pruning layers", unit="layer")
    executors = [ThreadPoolExecutor(max_workers=1) for _ in devices] if len(devices) > 1 else []
    queued: list[deque[Future]] = [deque() for _ in devices]
    try:
        hidden = hidden.to(main)
        last = mine[-1] if mine else -1
        for index in range(last + 1):
            layer = layout.layers[index]
            inputs = hidden
            if index < last:  # dense outputs: the next layer's inputs (computed before any pruning)
                with layer_on_device(layout.model, layer, layout.layer_prefix(index), main, offload, write_back=False):
                    call = LayerCall(move_to(calls[index].args, main), move_to(calls[index].kwargs, main))
                    hidden = run_layer(layer, inputs, call, batch_size)
                check_finite(hidden, index, layout.model.dtype)
            if owners[index] != rank:
                continue
            job = (pruner, layout, index, targets[index], inputs, calls[index], sparsities[index])
            if not executors:
                prune_one_layer(*job, devices[0], batch_size, offload)
                progress.update(1)
                continue
            slot = mine.index(index) % len(devices)
            while len(queued[slot]) >= MAX_QUEUED_PER_DEVICE:
                queued[slot].popleft().result()
                progress.update(1)
            queued[slot].append(executors[slot].submit(prune_one_layer, *job, devices[slot], batch_size, offload))
        for pending in queued:
            while pending:
                pending.popleft().result()
                progress.update(1)
    finally:
        for executor in executors:
            executor.shutdown(wait=True, cancel_futures=True)
        progress.close()


def broadcast_layers(layout: DecoderLayout, targets: list[list[Operator]], owners: list[int], rank: int) -> None:
    """Send each layer's targeted weights from the rank that pruned them to every other rank.

    An offloaded layer is read from its store for the exchange; the receiving ranks write the
    weights they got back to their own store.
    """
    dist = torch.distributed
    comm = _comm_device()
    for index, owner in enumerate(owners):
        if not targets[index]:
            continue
        layer = layout.layers[index]
        held = (layer_on_device(layout.model, layer, layout.layer_prefix(index), comm, write_back=rank != owner)
                if is_offloaded(layer) else contextlib.nullcontext())
        with held:
            weights = [op.module.weight.data for op in targets[index]]
            dtype = weights[0].dtype
            flat = torch.cat([w.reshape(-1).to(device=comm, dtype=dtype) for w in weights])
            dist.broadcast(flat, src=owner)
            if rank != owner:
                offset = 0
                for weight in weights:
                    weight.copy_(flat[offset:offset + weight.numel()].view_as(weight))
                    offset += weight.numel()
    logger.info("rank %d: received the pruned weights of every layer", rank)
