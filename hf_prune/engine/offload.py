"""Pruning models that do not fit on the device: onloading accelerate-offloaded decoder layers.

A model loaded with ``device_map=...`` / ``offload_folder=...`` carries accelerate
``AlignDevicesHook``s: the parameters of an offloaded module sit on the ``meta`` device and
are read from the hook's ``weights_map`` (a CPU state dict, or safetensors / ``.dat`` files on
disk) for each forward. :func:`layer_on_device` materializes one decoder layer on the device
with its hooks told not to reload or drop the weights, lets the engine prune it, then writes
the layer's weights back to where the hooks read them from and puts them back on ``meta``.
Dense passes (OWL's outlier scan, FISTA's dense inputs) onload a layer without writing it
back. One offloaded layer is held at a time, plus one per FISTA worker thread.

Disk-offloaded weights loaded by transformers point into the source checkpoint itself; that
file is never written. The pruned layer goes to a new safetensors file in the offload folder
(``hf_prune_pruned/<layer>.safetensors``, or a temporary folder removed with the model) and the
weights map is pointed at it, so forwards, ``save_pretrained`` and the sparsity report all
see the pruned weights.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

PRUNED_SUBFOLDER = "hf_prune_pruned"
_LOCK = threading.Lock()  # worker threads (one per device) may onload and write layers at the same time


@dataclass
class OffloadStats:
    """What offloaded pruning held in memory: the bytes of each onload (a layer may be onloaded
    twice: for a dense pass and to be pruned), the peak of all materialized (non-``meta``)
    parameter bytes of the model while a layer was onloaded, and how many layers were written."""

    layer_bytes: list[int] = field(default_factory=list)
    peak_materialized_bytes: int = 0
    layers_written: int = 0


def _hooks_of(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _align_hooks(module: nn.Module) -> list:
    return [hook for hook in _hooks_of(module) if hasattr(hook, "execution_device") and hasattr(hook, "offload")]


def _offloading_hook(module: nn.Module):
    for hook in _align_hooks(module):
        if hook.offload and getattr(hook, "weights_map", None) is not None:
            return hook
    return None


def is_offloaded(model: nn.Module) -> bool:
    """Whether any module of ``model`` has its weights offloaded by an accelerate hook."""
    return any(_offloading_hook(module) is not None for module in model.modules())


def execution_device(module: nn.Module) -> torch.device | None:
    """Where an accelerate hook runs ``module`` (``None`` without a hook)."""
    for hook in _align_hooks(module):
        if hook.execution_device is not None:
            return torch.device(hook.execution_device)
    return None


def _unprefix(weights_map) -> tuple[object, str]:
    """The ``OffloadedWeightsLoader`` (or dict) under nested ``PrefixedDataset``s, and the full prefix."""
    prefix = ""
    while hasattr(weights_map, "dataset") and hasattr(weights_map, "prefix"):
        prefix = weights_map.prefix + prefix
        weights_map = weights_map.dataset
    return weights_map, prefix


def _own_tensors(module: nn.Module, hook) -> list[str]:
    names = [name for name, _ in module.named_parameters(recurse=False)]
    if getattr(hook, "offload_buffers", False):
        persistent = [name for name, _ in module.named_buffers(recurse=False)
                      if name not in getattr(module, "_non_persistent_buffers_set", set())]
        names.extend(persistent)
    return names


def materialized_bytes(model: nn.Module) -> int:
    """Bytes of the parameters of ``model`` that are not on the ``meta`` device."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


def read_parameter(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """``module.<name>``, read from its offload store when it sits on ``meta``."""
    tensor = getattr(module, name)
    if tensor.device.type != "meta":
        return tensor
    hook = _offloading_hook(module)
    if hook is None:
        raise ValueError(f"{type(module).__name__}.{name} is on the meta device and no accelerate hook holds it")
    return hook.weights_map[name]


def _memory_store(loader, key: str) -> dict | None:
    """The dict that holds ``key`` in memory (a CPU-dict store), or ``None`` when it is read from disk."""
    if isinstance(loader, dict):
        return loader
    state = getattr(loader, "state_dict", None)
    return state if state is not None and key in state else None


class _Store:
    """Writes a layer's weights back into the ``OffloadedWeightsLoader`` its hooks read from."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def folder_for(self, loader) -> str:
        base = getattr(loader, "save_folder", None)
        with _LOCK:  # worker threads must not each create a temporary folder
            if base is None:
                base = getattr(self.model, "_hf_prune_offload_tmp", None)
                if base is None:
                    base = tempfile.mkdtemp(prefix="hf_prune_offload_")
                    self.model._hf_prune_offload_tmp = base
                    weakref.finalize(self.model, shutil.rmtree, base, True)
                    logger.info("no offload_folder was given; pruned offloaded layers go to %s", base)
            folder = os.path.join(os.fspath(base), PRUNED_SUBFOLDER)
            os.makedirs(folder, exist_ok=True)
        return folder

    def write(self, layer_name: str, entries: list[tuple[object, str, torch.Tensor]]) -> None:
        """``entries``: (loader, full key, tensor on any device)."""
        to_disk: dict[int, tuple[object, dict[str, torch.Tensor]]] = {}
        for loader, key, tensor in entries:
            cpu = tensor.detach().to("cpu").contiguous()
            in_memory = _memory_store(loader, key)
            if in_memory is not None:
                in_memory[key] = cpu
            else:
                to_disk.setdefault(id(loader), (loader, {}))[1][key] = cpu
        for loader, tensors in to_disk.values():
            folder = self.folder_for(loader)
            path = os.path.join(folder, f"{layer_name}.safetensors")
            # torchrun ranks sharing an offload folder may write the same layer at once: each
            # stages its own file, and the atomic replace leaves one complete copy
            handle, staging = tempfile.mkstemp(dir=folder, prefix=f".{layer_name}.", suffix=".tmp")
            os.close(handle)
            try:
                save_file(tensors, staging)
                os.replace(staging, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(staging)
                raise
            for key, cpu in tensors.items():
                loader.index[key] = {"safetensors_file": path, "weight_name": key,
                                     "dtype": str(cpu.dtype).removeprefix("torch.")}


@contextmanager
def layer_on_device(model: nn.Module, layer: nn.Module, layer_name: str, device: torch.device,
                    stats: OffloadStats | None = None, write_back: bool = True) -> Iterator[None]:
    """Hold ``layer`` on ``device`` for the body, then put it back where it was.

    A plain layer is moved with ``.to`` and back. A layer with accelerate-offloaded modules
    has their weights read from the offload store onto ``device``, its hooks are told to run
    on ``device`` without reloading or dropping weights, and on a normal exit its weights are
    written back to the store (CPU dict, or a new safetensors file for disk) and put back on
    ``meta``. On an exception, or with ``write_back=False`` (a dense pass), nothing is written
    back: the onloaded weights are copies, so the store is unchanged whatever the body did.
    """
    hooked = [(module, hook) for module in layer.modules() for hook in _align_hooks(module)]
    offloaded = [(name, module, hook) for name, module in layer.named_modules()
                 if (hook := _offloading_hook(module)) is not None]
    if not hooked:
        params = [p for p in layer.parameters() if p.device.type != "meta"]
        original = params[0].device if params else device
        if original != device:
            layer.to(device)
        try:
            yield
        finally:
            if original != device:
                layer.to(original)
        return

    from accelerate.utils import set_module_tensor_to_device

    saved = [(hook, hook.execution_device, hook.offload) for _, hook in hooked]
    onloaded = 0
    for _, module, hook in offloaded:
        loader, prefix = _unprefix(hook.weights_map)
        for tensor_name in _own_tensors(module, hook):
            stored = hook.weights_map[tensor_name]
            value = stored.to(device)
            # a disk read is already a fresh tensor; an in-memory store's entry must not be aliased
            if value is stored and _memory_store(loader, prefix + tensor_name) is not None:
                value = value.clone()
            set_module_tensor_to_device(module, tensor_name, device, value=value, clear_cache=False)
            onloaded += value.numel() * value.element_size()
    moved = {}
    for module in layer.modules():
        if _offloading_hook(module) is None:
            for tensor_name, param in list(module.named_parameters(recurse=False)):
                if param.device.type != "meta" and param.device != device:
                    moved[(module, tensor_name)] = param.device
                    set_module_tensor_to_device(module, tensor_name, device, clear_cache=False)
    for _, hook in hooked:
        hook.execution_device = device
        hook.offload = False
    if stats is not None:
        with _LOCK:
            stats.layer_bytes.append(onloaded)
            stats.peak_materialized_bytes = max(stats.peak_materialized_bytes, materialized_bytes(model))
    completed = False
    try:
        yield
        completed = True
    finally:
        for hook, exec_device, offload in saved:
            hook.execution_device = exec_device
            hook.offload = offload
        if completed and write_back and offloaded:
            entries = []
            for _, module, hook in offloaded:
                loader, prefix = _unprefix(hook.weights_map)
                for tensor_name in _own_tensors(module, hook):
                    entries.append((loader, prefix + tensor_name, getattr(module, tensor_name)))
            _Store(model).write(layer_name, entries)
            if stats is not None:
                with _LOCK:
                    stats.layers_written += 1
        for _, module, hook in offloaded:
            for tensor_name in _own_tensors(module, hook):
                set_module_tensor_to_device(module, tensor_name, "meta", clear_cache=False)
        for (module, tensor_name), original in moved.items():
            set_module_tensor_to_device(module, tensor_name, original, clear_cache=False)


def offloaded_shard_size(model: nn.Module) -> int | None:
    """A ``max_shard_size`` for saving an offloaded model one decoder layer's worth at a time.

    transformers reads the offloaded weights of one shard into memory before writing it, so
    shards the size of the largest decoder layer (at least 1 MiB) keep the save as lean as
    pruning was. ``None`` for a model without offloaded weights.
    """
    if not is_offloaded(model):
        return None
    from ..walker.layout import DecoderLayout

    layout = DecoderLayout(model)
    largest = max((sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layout.layers),
                  default=0)
    return max(largest, 1 << 20)
