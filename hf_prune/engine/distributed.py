"""torch.distributed plumbing for layer-parallel pruning: the process group, failure agreement, broadcasts.

Launched with ``torchrun``, each rank prunes a share of the decoder layers (see
``parallel``); here the process group is created from the environment when needed, the
ranks agree on whether any of them failed, and each layer's pruned weights are broadcast
from the rank that pruned them. Only rank 0 saves (``is_main_process``).
"""

from __future__ import annotations

import contextlib
import os

import torch
from transformers.utils import logging

from ..walker.layout import DecoderLayout, Operator
from .offload import is_offloaded, layer_on_device

logger = logging.get_logger(__name__)


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
            weights = [op.stored_weight() for op in targets[index]]
            dtype = weights[0].dtype
            flat = torch.cat([w.reshape(-1).to(device=comm, dtype=dtype) for w in weights])
            dist.broadcast(flat, src=owner)
            if rank != owner:
                offset = 0
                for weight in weights:
                    weight.copy_(flat[offset:offset + weight.numel()].view_as(weight))
                    offset += weight.numel()
    logger.info("rank %d: received the pruned weights of every layer", rank)
