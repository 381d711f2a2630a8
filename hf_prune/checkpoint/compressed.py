"""Compact checkpoints: sparse weights stored as their non-zero values plus a packed bitmask.

``save_pretrained(..., compressed=True)`` first lets transformers write its usual safetensors
files into the staging folder, then rewrites them one shard at a time: every floating tensor
that gets smaller this way (the pruned Linear / Conv1D weights, unstructured or N:M) becomes

* ``<name>.nonzero_values``: its non-zero entries in row-major order, same dtype;
* ``<name>.bitmask``: uint8, bit ``i % 8`` of byte ``i // 8`` set when entry ``i`` is kept
  (numpy ``packbits(..., bitorder="little")``);
* ``<name>.dense_shape``: int64, the dense shape.

"Non-zero" means any bit set, so ``-0.0`` and NaN are kept as values and the dense tensor
comes back bit for bit. Other tensors are stored unchanged. The files are renamed
``compressed*.safetensors`` so plain ``AutoModelForCausalLM`` finds no weights and raises
instead of loading random ones; the layout is recorded in ``config.json`` under
``pruning_config["compressed"]``. ``AutoPrunedModelForCausalLM.from_pretrained`` rebuilds the
dense files in a temporary folder, streaming one tensor at a time, and loads from there
through transformers' own ``from_pretrained`` (dtype, device_map and the rest keep working).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import logging

from ..errors import CompressedCheckpointError

logger = logging.get_logger(__name__)

FORMAT = "bitmask"
VERSION = 1
VALUES_SUFFIX = ".nonzero_values"
MASK_SUFFIX = ".bitmask"
SHAPE_SUFFIX = ".dense_shape"
COMPRESSED_PREFIX = "compressed"
LOADER_ADVICE = (
    "This is an hf_prune compressed checkpoint (values + bitmask): load it with "
    "hf_prune.AutoPrunedModelForCausalLM.from_pretrained; plain transformers AutoModelForCausalLM cannot read it"
)
# header bytes a compressed tensor adds (three header entries, the shape tensor): below this saving, keep it dense
_MIN_SAVING = 256
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}




# --- one tensor --------------------------------------------------------------------------------------


def nonzero_mask(tensor: torch.Tensor) -> torch.Tensor:
    """Flat bool mask of the entries with any bit set (``-0.0`` and NaN count as kept)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).reshape(flat.numel(), flat.element_size()).ne(0).any(dim=1)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a flat bool mask into uint8, little bit order (entry ``i`` is bit ``i % 8`` of byte ``i // 8``)."""
    padded = torch.zeros(math.ceil(mask.numel() / 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[: mask.numel()] = mask.to(torch.uint8)
    weights = torch.tensor([1 << bit for bit in range(8)], dtype=torch.uint8, device=mask.device)
    return (padded.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``count`` bits as a flat bool mask."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(count / 8):
        raise CompressedCheckpointError(
            f"a bitmask for {count} entries must be {math.ceil(count / 8)} uint8 bytes, got {packed.numel()} "
            f"{packed.dtype} (dim {packed.dim()}); the checkpoint is damaged, save it again from the pruned model"
        )
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[:count].bool()


def compress_tensor(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, packed bitmask, dense shape)`` of a tensor; see ``decompress_tensor``."""
    mask = nonzero_mask(tensor)
    values = tensor.detach().contiguous().reshape(-1)[mask].clone()
    return values, pack_bits(mask), torch.tensor(list(tensor.shape), dtype=torch.int64)


def decompress_tensor(values: torch.Tensor, packed: torch.Tensor, shape: torch.Tensor | list[int]) -> torch.Tensor:
    """The dense tensor, bit for bit: zeros (all bits clear) where the mask is unset."""
    dims = [int(d) for d in (shape.tolist() if isinstance(shape, torch.Tensor) else shape)]
    count = math.prod(dims)
    mask = unpack_bits(packed, count)
    kept = int(mask.sum())
    if values.dim() != 1 or values.numel() != kept:
        raise CompressedCheckpointError(
            f"the bitmask keeps {kept} entries but {values.numel()} values are stored; the checkpoint is damaged, "
            "save it again from the pruned model"
        )
    dense = torch.zeros(count, dtype=values.dtype, device=values.device)
    dense[mask] = values
    return dense.reshape(dims)


def compressed_bytes(tensor: torch.Tensor) -> int:
    """Bytes the values, bitmask and shape of ``tensor`` take."""
    kept = int(nonzero_mask(tensor).sum())
    return kept * tensor.element_size() + math.ceil(tensor.numel() / 8) + 8 * tensor.dim()


def worth_compressing(tensor: torch.Tensor) -> bool:
    """True for floating tensors whose values + bitmask are clearly smaller than the dense bytes."""
    if not tensor.is_floating_point() or tensor.dim() == 0:
        return False
    return compressed_bytes(tensor) + _MIN_SAVING < tensor.numel() * tensor.element_size()


# --- saving -------------------------------------------------------------------------------------------


def _compressed_name(dense_name: str) -> str:
    if not dense_name.startswith("model"):
        raise CompressedCheckpointError(f"unexpected weights file name {dense_name!r}: expected model*.safetensors")
    return COMPRESSED_PREFIX + dense_name[len("model"):]


def _dense_weight_files(directory: Path) -> tuple[str | None, list[str]]:
    """``(index file or None, shard files)`` of the transformers checkpoint in ``directory``."""
    indexes = sorted(p.name for p in directory.glob("model*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CompressedCheckpointError(f"{directory} holds several weight indexes {indexes}; save into a new folder")
    if indexes:
        weight_map = json.loads((directory / indexes[0]).read_text())["weight_map"]
        return indexes[0], sorted(set(weight_map.values()))
    files = sorted(p.name for p in directory.glob("model*.safetensors"))
    if not files:
        raise CompressedCheckpointError(
            f"no model*.safetensors files in {directory}: compressed=True needs the safetensors format "
            "(do not pass safe_serialization=False)"
        )
    return None, files


def compress_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """Rewrite the transformers checkpoint in ``directory`` (a staging folder) in compressed form.

    One shard at a time: the dense shard is read, its compressed twin written, the dense file
    removed. ``config.json``'s pruning record gets the layout; the returned dict is that entry.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    record = config.get("pruning_config")
    if not isinstance(record, dict):
        raise CompressedCheckpointError(
            f"{config_path} has no pruning record: compressed checkpoints are for models pruned with hf_prune "
            "(prune the model first, or save without compressed=True)"
        )
    index_name, shards = _dense_weight_files(directory)
    files: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    dense_bytes = stored_bytes = tensors = sparse_dense_bytes = sparse_stored_bytes = 0
    for shard in shards:
        target = _compressed_name(shard)
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(directory / shard), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                dense_bytes += tensor.numel() * tensor.element_size()
                if worth_compressing(tensor):
                    values, packed, shape = compress_tensor(tensor)
                    out[key + VALUES_SUFFIX], out[key + MASK_SUFFIX], out[key + SHAPE_SUFFIX] = values, packed, shape
                    tensors += 1
                    sparse_dense_bytes += tensor.numel() * tensor.element_size()
                    sparse_stored_bytes += sum(t.numel() * t.element_size() for t in (values, packed, shape))
                else:
                    out[key] = tensor
                del tensor
        stored_bytes += sum(t.numel() * t.element_size() for t in out.values())
        metadata.setdefault("format", "pt")
        metadata["hf_prune_compressed"] = f"{FORMAT}/{VERSION}"
        save_file(out, str(directory / target), metadata=metadata)
        weight_map.update({key: target for key in out})
        del out
        (directory / shard).unlink()
        files[target] = shard
    index_entry = None
    if index_name is not None:
        compressed_index = _compressed_name(index_name)
        total = sum(os.path.getsize(directory / name) for name in files)
        (directory / compressed_index).write_text(json.dumps(
            {"metadata": {"total_size": total, "hf_prune_compressed": f"{FORMAT}/{VERSION}"},
             "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        (directory / index_name).unlink()
        index_entry = {compressed_index: index_name}
    entry = {
        "format": FORMAT,
        "version": VERSION,
        "bit_order": "little",
        "suffixes": {"values": VALUES_SUFFIX, "bitmask": MASK_SUFFIX, "shape": SHAPE_SUFFIX},
        "files": files,
        "index": index_entry,
        "compressed_tensors": tensors,
        "dense_tensor_bytes": dense_bytes,
        "stored_tensor_bytes": stored_bytes,
        "compressed_tensor_bytes": {"dense": sparse_dense_bytes, "stored": sparse_stored_bytes},
        "loader": "hf_prune.AutoPrunedModelForCausalLM",
    }
    record["compressed"] = entry
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    logger.info("compressed %d tensors: %d -> %d tensor bytes (%.3fx)", tensors, dense_bytes, stored_bytes,
                stored_bytes / max(dense_bytes, 1))
    return entry


# --- loading ------------------------------------------------------------------------------------------


def compressed_layout(config: Any) -> dict[str, Any] | None:
    """The ``compressed`` entry of a config's pruning record, or ``None`` for dense checkpoints."""
    record = getattr(config, "pruning_config", None)
    entry = record.get("compressed") if isinstance(record, dict) else None
    if entry is None:
        return None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("version") != VERSION:
        raise CompressedCheckpointError(
            f"unsupported compressed checkpoint layout {entry!r}: this hf_prune reads format {FORMAT!r} version "
            f"{VERSION}; upgrade hf_prune"
        )
    return entry


def _entries(handle: Any) -> Iterator[tuple[str, str, list[int], Callable[[], torch.Tensor]]]:
    """``(name, dtype code, shape, load)`` of each dense tensor a compressed shard describes."""
    keys = set(handle.keys())
    for key in sorted(keys):
        if key.endswith(VALUES_SUFFIX):
            name = key[: -len(VALUES_SUFFIX)]
            if name + MASK_SUFFIX not in keys or name + SHAPE_SUFFIX not in keys:
                raise CompressedCheckpointError(f"{name} has values but no bitmask or shape; the checkpoint is damaged")
            shape = [int(d) for d in handle.get_tensor(name + SHAPE_SUFFIX).tolist()]

            def load(name: str = name, shape: list[int] = shape) -> torch.Tensor:
                return decompress_tensor(handle.get_tensor(name + VALUES_SUFFIX),
                                         handle.get_tensor(name + MASK_SUFFIX), shape)

            yield name, handle.get_slice(key).get_dtype(), shape, load
        elif not key.endswith((MASK_SUFFIX, SHAPE_SUFFIX)):
            yield key, handle.get_slice(key).get_dtype(), list(handle.get_slice(key).get_shape()), (
                lambda key=key: handle.get_tensor(key))


def _write_dense_safetensors(source: Path, target: Path) -> int:
    """Write the dense safetensors file ``source`` (compressed) describes, one tensor in memory at a time.

    Returns the data bytes written. Tensors are laid out by decreasing element size, so each
    starts aligned to its element size, as the safetensors library lays them out.
    """
    with safe_open(str(source), framework="pt") as handle:
        metadata = {k: v for k, v in (handle.metadata() or {}).items() if k != "hf_prune_compressed"}
        entries = list(_entries(handle))
        for name, dtype, _, _ in entries:
            if dtype not in _DTYPE_BYTES:
                raise CompressedCheckpointError(f"{name} has dtype {dtype}, which this loader does not know")
        entries.sort(key=lambda e: (-_DTYPE_BYTES[e[1]], e[0]))
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, dtype, shape, _ in entries:
            size = math.prod(shape) * _DTYPE_BYTES[dtype]
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(target, "wb") as out:
            out.write(len(encoded).to_bytes(8, "little"))
            out.write(encoded)
            for name, _, _, load in entries:
                tensor = load().contiguous().reshape(-1)
                start, end = header[name]["data_offsets"]
                if tensor.numel() * tensor.element_size() != end - start:
                    raise CompressedCheckpointError(f"{name} decompressed to the wrong size; the checkpoint is damaged")
                out.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
                del tensor
    return offset


def decompress_checkpoint(files: dict[str, Path], layout: dict[str, Any], target: str | os.PathLike) -> Path:
    """Write the dense transformers checkpoint of a compressed one into ``target``.

    ``files`` maps each compressed file name (weights and index) to its local path.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for name, dense_name in layout["files"].items():
        _write_dense_safetensors(files[name], target / dense_name)
    if layout.get("index"):
        ((compressed_index, dense_index),) = layout["index"].items()
        index = json.loads(Path(files[compressed_index]).read_text())
        renamed = dict(layout["files"])
        weight_map: dict[str, str] = {}
        for key, shard in index["weight_map"].items():
            if key.endswith((MASK_SUFFIX, SHAPE_SUFFIX)):
                continue
            name = key[: -len(VALUES_SUFFIX)] if key.endswith(VALUES_SUFFIX) else key
            weight_map[name] = renamed[shard]
        total = sum(os.path.getsize(target / name) for name in renamed.values())
        (target / dense_index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return target


def _resolve(path: str | os.PathLike, layout: dict[str, Any], hub_kwargs: dict[str, Any]) -> dict[str, Path]:
    """Local paths of the compressed files (a local folder, or downloaded through the Hub cache)."""
    from transformers.utils import cached_file

    names = list(layout["files"]) + list((layout.get("index") or {}).keys())
    resolved = {}
    for name in names:
        local = cached_file(str(path), name, **hub_kwargs)
        if local is None:
            raise CompressedCheckpointError(f"{path} lacks {name}, which its config.json lists. {LOADER_ADVICE}")
        resolved[name] = Path(local)
    return resolved


def _offloads_to_disk(kwargs: dict[str, Any]) -> bool:
    device_map = kwargs.get("device_map")
    return bool(kwargs.get("offload_folder")) or (
        isinstance(device_map, dict) and any(str(v) == "disk" for v in device_map.values())) or (
        isinstance(device_map, str) and device_map != "cpu" and not device_map.startswith("cuda"))


def load_compressed(loader: Callable[..., Any], path: str | os.PathLike, *model_args: Any,
                    hub_keys: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """Load a compressed checkpoint with transformers' ``from_pretrained`` (``loader``).

    The dense files are rebuilt in a temporary folder (``decompress_dir=`` chooses where;
    it needs the dense checkpoint's size on disk) and removed after loading, or when the model
    is garbage-collected if weights may be offloaded to disk from there.
    """
    config = kwargs.pop("config")
    layout = compressed_layout(config)
    if layout is None:
        raise CompressedCheckpointError(f"{path} is not a compressed checkpoint (no pruning_config.compressed)")
    if kwargs.pop("gguf_file", None):
        raise CompressedCheckpointError(f"{path} is a compressed safetensors checkpoint: do not pass gguf_file")
    hub_kwargs = {k: kwargs.pop(k) for k in hub_keys if k in kwargs}
    files = _resolve(path, layout, hub_kwargs)
    dense_config = copy.deepcopy(config)
    dense_config.pruning_config = {k: v for k, v in config.pruning_config.items() if k != "compressed"}
    keep = _offloads_to_disk(kwargs)
    folder = tempfile.mkdtemp(prefix="hf_prune-dense-", dir=kwargs.pop("decompress_dir", None))
    try:
        decompress_checkpoint(files, layout, folder)
        dense_config.to_json_file(os.path.join(folder, "config.json"))
        _copy_generation_config(path, hub_kwargs, folder)
        model = loader(folder, *model_args, config=dense_config, **kwargs)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if keep:
        weakref.finalize(model, shutil.rmtree, folder, True)
    else:
        shutil.rmtree(folder, ignore_errors=True)
    model.config._name_or_path = str(path)
    model.name_or_path = str(path)
    return model


def _copy_generation_config(path: str | os.PathLike, hub_kwargs: dict[str, Any], folder: str) -> None:
    """Put the source's ``generation_config.json`` (if any) beside the rebuilt weights, for transformers to read."""
    from transformers.utils import cached_file

    local = cached_file(str(path), "generation_config.json", _raise_exceptions_for_missing_entries=False,
                        **hub_kwargs)
    if local is not None:
        shutil.copyfile(local, os.path.join(folder, "generation_config.json"))


def checkpoint_bytes(directory: str | os.PathLike) -> int:
    """Total size of the ``*.safetensors`` files in a folder."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))
