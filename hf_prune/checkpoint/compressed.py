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
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import logging

from ..config import short_repr
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


# --- loading ---------------------------------------------------------------------------------------

#: Most dimensions a stored tensor may have.
_MAX_DIMS = 8


def plain_file_name(name: object) -> bool:
    """Whether ``name`` is a bare file name: no directory part, not ``.``/``..``, not absolute, no NUL."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and "/" not in name and "\\" not in name
            and "\0" not in name and ":" not in name and name not in (".", "..") and not os.path.isabs(name))


def _bad_layout(message: str) -> CompressedCheckpointError:
    return CompressedCheckpointError(
        f"config.json's pruning_config.compressed {message}; the checkpoint was crafted or damaged, nothing was "
        f"written. {LOADER_ADVICE}"
    )


def _check_pair(compressed: object, dense: object, suffix: str) -> None:
    """A (compressed, dense) file-name pair as ``compress_checkpoint`` writes it."""
    for name in (compressed, dense):
        if not plain_file_name(name):
            raise _bad_layout(f"names {name!r}, which is not a plain file name inside the checkpoint")
    assert isinstance(compressed, str) and isinstance(dense, str)
    if not (compressed.startswith(COMPRESSED_PREFIX) and compressed.endswith(suffix)
            and dense == "model" + compressed[len(COMPRESSED_PREFIX):]):
        raise _bad_layout(
            f"maps {compressed!r} to {dense!r}; hf_prune writes 'compressed<rest>{suffix}' for 'model<rest>{suffix}'"
        )


def check_layout(entry: Any) -> dict[str, Any]:
    """Validate the ``compressed`` entry of a pruning record before any file is read or written; return it.

    Every file it names must be a plain file name (no separator, no ``..``, not absolute),
    each compressed file ``compressed<rest>`` standing for the dense ``model<rest>``.
    """
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("version") != VERSION:
        raise CompressedCheckpointError(
            f"unsupported compressed checkpoint layout {short_repr(entry)}: this hf_prune reads format {FORMAT!r} "
            f"version {VERSION}; upgrade hf_prune"
        )
    files = entry.get("files")
    if not isinstance(files, dict) or not files:
        raise _bad_layout(f"must map compressed file names to dense ones in 'files', got {short_repr(files)}")
    for compressed, dense in files.items():
        _check_pair(compressed, dense, ".safetensors")
    index = entry.get("index")
    if index is not None:
        if not isinstance(index, dict) or len(index) != 1:
            raise _bad_layout(f"must name one index file in 'index', got {short_repr(index)}")
        ((compressed, dense),) = index.items()
        _check_pair(compressed, dense, ".safetensors.index.json")
    return entry


def compressed_layout(config: Any) -> dict[str, Any] | None:
    """The ``compressed`` entry of a config's pruning record (validated), or ``None`` for dense checkpoints."""
    record = getattr(config, "pruning_config", None)
    entry = record.get("compressed") if isinstance(record, dict) else None
    if entry is None:
        return None
    return check_layout(entry)


def _dims(value: Any, name: str) -> list[int]:
    dims = value.tolist() if isinstance(value, torch.Tensor) else value
    if (not isinstance(dims, list) or len(dims) > _MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in dims)):
        raise CompressedCheckpointError(f"{name} has the dense shape {short_repr(dims)}, which is not a list of at "
                                        f"most {_MAX_DIMS} non-negative integers; the checkpoint is damaged")
    return dims


class _Entry:
    """One dense tensor a compressed shard describes: its name, dtype code, shape and how to load it."""

    def __init__(self, name: str, dtype: str, shape: list[int], load: Callable[[], torch.Tensor],
                 compressed: bool) -> None:
        self.name, self.dtype, self.shape, self.load, self.compressed = name, dtype, shape, load, compressed

    @property
    def size(self) -> int:
        return math.prod(self.shape) * _DTYPE_BYTES[self.dtype]


def _entries(handle: Any, file_name: str) -> list[_Entry]:
    """The dense tensors of an open compressed shard, checked from the headers (and the tiny shape
    tensors) only: known dtypes, shapes whose bitmask holds exactly one bit per entry, no more
    values than entries, no orphan bitmask or shape, no name twice."""
    keys = set(handle.keys())
    entries: list[_Entry] = []
    for key in sorted(keys):
        if key.endswith(VALUES_SUFFIX):
            name = key[: -len(VALUES_SUFFIX)]
            if name in keys or name + MASK_SUFFIX not in keys or name + SHAPE_SUFFIX not in keys:
                raise CompressedCheckpointError(
                    f"{file_name}: {name} must be stored either dense or as values + bitmask + shape; the checkpoint "
                    "is damaged"
                )
            shape_slice = handle.get_slice(name + SHAPE_SUFFIX)
            if shape_slice.get_dtype() != "I64" or len(shape_slice.get_shape()) != 1 or (
                    shape_slice.get_shape()[0] > _MAX_DIMS):
                raise CompressedCheckpointError(f"{file_name}: {name}{SHAPE_SUFFIX} must be a short int64 vector")
            shape = _dims(handle.get_tensor(name + SHAPE_SUFFIX), name)
            count = math.prod(shape)
            mask_slice, values_slice = handle.get_slice(name + MASK_SUFFIX), handle.get_slice(key)
            if mask_slice.get_dtype() != "U8" or list(mask_slice.get_shape()) != [math.ceil(count / 8)]:
                raise CompressedCheckpointError(
                    f"{file_name}: {name} has the dense shape {shape} ({count} entries), which needs a bitmask of "
                    f"{math.ceil(count / 8)} uint8 bytes, but {mask_slice.get_dtype()} {mask_slice.get_shape()} is "
                    "stored; the checkpoint is damaged"
                )
            dtype, values_shape = values_slice.get_dtype(), list(values_slice.get_shape())
            if dtype not in _DTYPE_BYTES or len(values_shape) != 1 or values_shape[0] > count:
                raise CompressedCheckpointError(
                    f"{file_name}: {name} stores {values_shape} {dtype} values for {count} entries; the checkpoint is "
                    "damaged"
                )

            def load(name: str = name, shape: list[int] = shape) -> torch.Tensor:
                return decompress_tensor(handle.get_tensor(name + VALUES_SUFFIX),
                                         handle.get_tensor(name + MASK_SUFFIX), shape)

            entries.append(_Entry(name, dtype, shape, load, compressed=True))
        elif key.endswith((MASK_SUFFIX, SHAPE_SUFFIX)):
            if key.rsplit(".", 1)[0] + VALUES_SUFFIX not in keys:
                raise CompressedCheckpointError(f"{file_name}: {key} belongs to no stored values; the checkpoint is "
                                                "damaged")
        else:
            tensor_slice = handle.get_slice(key)
            dtype = tensor_slice.get_dtype()
            if dtype not in _DTYPE_BYTES:
                raise CompressedCheckpointError(f"{key} has dtype {dtype}, which this loader does not know")
            entries.append(_Entry(key, dtype, _dims(list(tensor_slice.get_shape()), key),
                                  lambda key=key: handle.get_tensor(key), compressed=False))
    return entries


def _write_dense_safetensors(handle: Any, entries: list[_Entry], target: Path) -> int:
    """Write the dense safetensors file an open compressed shard describes, one tensor in memory at a time.

    Returns the data bytes written. Tensors are laid out by decreasing element size, so each
    starts aligned to its element size, as the safetensors library lays them out.
    """
    metadata = {k: v for k, v in (handle.metadata() or {}).items() if k != "hf_prune_compressed"}
    entries = sorted(entries, key=lambda e: (-_DTYPE_BYTES[e.dtype], e.name))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": entry.dtype, "shape": entry.shape, "data_offsets": [offset, offset + entry.size]}
        offset += entry.size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(target, "xb") as out:  # a fresh file in our own folder: never follows or replaces anything
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for entry in entries:
            tensor = entry.load().contiguous().reshape(-1)
            if tensor.numel() * tensor.element_size() != entry.size:
                raise CompressedCheckpointError(f"{entry.name} decompressed to the wrong size; the checkpoint is "
                                                "damaged")
            out.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
            del tensor
    return offset


def _check_plan(plan: dict[str, list[_Entry]], expected: dict[str, tuple[int, ...]] | None) -> int:
    """Refuse tensors stored twice, shapes that differ from the model's, and compressed tensors that
    would expand beyond the model's size; return the bytes decompression will write."""
    seen: dict[str, str] = {}
    compressed_elements = 0
    total = 0
    for file_name, entries in plan.items():
        for entry in entries:
            if entry.name in seen:
                raise CompressedCheckpointError(f"{entry.name} is stored in both {seen[entry.name]} and {file_name}; "
                                                "the checkpoint is damaged")
            seen[entry.name] = file_name
            total += entry.size
            if entry.compressed:
                compressed_elements += math.prod(entry.shape)
            if expected is not None and entry.name in expected and tuple(entry.shape) != expected[entry.name]:
                raise CompressedCheckpointError(
                    f"{file_name}: {entry.name} has the dense shape {entry.shape} but the model built from config.json "
                    f"has {list(expected[entry.name])}; the checkpoint was crafted or damaged, nothing was loaded"
                )
    if expected is not None:
        budget = sum(math.prod(shape) for shape in expected.values())
        if compressed_elements > budget:
            raise CompressedCheckpointError(
                f"the compressed tensors expand to {compressed_elements} entries, more than the {budget} the whole "
                "model built from config.json holds; the checkpoint was crafted (inflated bitmasks), nothing was "
                "written"
            )
    return total


def decompress_checkpoint(files: dict[str, Path], layout: dict[str, Any], target: str | os.PathLike,
                          expected: dict[str, tuple[int, ...]] | None = None) -> Path:
    """Write the dense transformers checkpoint of a compressed one into ``target``.

    ``files`` maps each compressed file name (weights and index) to its local path. The
    layout's names are validated (``check_layout``) and every header is read and checked
    before anything is written; ``expected`` (tensor name -> shape of the model the config
    builds) refuses wrong shapes and compressed tensors larger than the model. Files are
    created only inside ``target``, under the layout's plain dense names.
    """
    check_layout(layout)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        handles = {name: stack.enter_context(safe_open(str(files[name]), framework="pt")) for name in layout["files"]}
        plan = {name: _entries(handle, name) for name, handle in handles.items()}
        weight_map = _dense_weight_map(files, layout) if layout.get("index") else None
        total = _check_plan(plan, expected)
        free = shutil.disk_usage(target).free
        if total > free:
            raise CompressedCheckpointError(
                f"rebuilding the dense weights needs {total} bytes but {target} has {free} free: pass "
                "decompress_dir= a folder on a disk with room"
            )
        for name, dense_name in layout["files"].items():
            _write_dense_safetensors(handles[name], plan[name], target / dense_name)
    if weight_map is not None:
        ((_, dense_index),) = layout["index"].items()
        total = sum(os.path.getsize(target / name) for name in layout["files"].values())
        with open(target / dense_index, "x", encoding="utf-8") as out:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, out)
    return target


def _dense_weight_map(files: dict[str, Path], layout: dict[str, Any]) -> dict[str, str]:
    """The dense index's weight map from the compressed index, checked against the layout's files."""
    ((compressed_index, _),) = layout["index"].items()
    try:
        index = json.loads(Path(files[compressed_index]).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise CompressedCheckpointError(f"{compressed_index} is not a readable JSON index ({err}); the checkpoint is "
                                        "damaged") from None
    shards = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(shards, dict):
        raise CompressedCheckpointError(f"{compressed_index} has no 'weight_map' object; the checkpoint is damaged")
    renamed = layout["files"]
    weight_map: dict[str, str] = {}
    for key, shard in shards.items():
        if not isinstance(shard, str) or shard not in renamed:
            raise CompressedCheckpointError(
                f"{compressed_index} puts {short_repr(key)} in {short_repr(shard)}, which config.json's compressed "
                "layout does not list; the checkpoint was crafted or damaged"
            )
        if key.endswith((MASK_SUFFIX, SHAPE_SUFFIX)):
            continue
        name = key[: -len(VALUES_SUFFIX)] if key.endswith(VALUES_SUFFIX) else key
        weight_map[name] = renamed[shard]
    return weight_map


def _resolve(path: str | os.PathLike, layout: dict[str, Any], hub_kwargs: dict[str, Any]) -> dict[str, Path]:
    """Local paths of the compressed files (a local folder, or downloaded through the Hub cache).

    Only the layout's plain file names are asked for, so nothing outside the checkpoint is read.
    """
    from transformers.utils import cached_file

    check_layout(layout)
    names = list(layout["files"]) + list((layout.get("index") or {}).keys())
    resolved = {}
    for name in names:
        try:
            local = cached_file(str(path), name, **hub_kwargs)
        except OSError as err:
            raise CompressedCheckpointError(f"{path} lacks {name}, which its config.json lists ({err}). "
                                            f"{LOADER_ADVICE}") from None
        if local is None:
            raise CompressedCheckpointError(f"{path} lacks {name}, which its config.json lists. {LOADER_ADVICE}")
        resolved[name] = Path(local)
    return resolved


def expected_shapes(model_class: type, config: Any) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the model ``model_class`` builds from ``config``, on the meta device (no memory)."""
    with torch.device("meta"):
        model = model_class._from_config(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _offloads_to_disk(kwargs: dict[str, Any]) -> bool:
    device_map = kwargs.get("device_map")
    return bool(kwargs.get("offload_folder")) or (
        isinstance(device_map, dict) and any(str(v) == "disk" for v in device_map.values())) or (
        isinstance(device_map, str) and device_map != "cpu" and not device_map.startswith("cuda"))


def load_compressed(loader: Callable[..., Any], path: str | os.PathLike, *model_args: Any,
                    hub_keys: tuple[str, ...] = (), model_class: type | None = None, **kwargs: Any) -> Any:
    """Load a compressed checkpoint with transformers' ``from_pretrained`` (``loader``).

    The dense files are rebuilt in a temporary folder (``decompress_dir=`` chooses where;
    it needs the dense checkpoint's size on disk) and removed after loading, or when the model
    is garbage-collected if weights may be offloaded to disk from there. With ``model_class``,
    stored shapes are checked against the model its config builds before anything is written.
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
    expected = expected_shapes(model_class, dense_config) if model_class is not None else None
    folder = tempfile.mkdtemp(prefix="hf_prune-dense-", dir=kwargs.pop("decompress_dir", None))
    try:
        decompress_checkpoint(files, layout, folder, expected)
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
