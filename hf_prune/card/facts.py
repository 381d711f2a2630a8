"""What a saved pruned checkpoint holds, read without loading it: tensor sizes and the record.

``read_checkpoint`` reads ``config.json`` (the pruning record in ``pruning_config``) and the
safetensors headers; the helpers here turn the record into the facts a card shows.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Checkpoint:
    """What a saved directory holds: its config, pruning record and tensor sizes."""

    config: dict[str, Any]
    record: dict[str, Any]
    tensors: dict[str, tuple[int, int]]  # name -> (elements, bytes)
    file_bytes: int

    @property
    def parameters(self) -> int:
        return sum(n for n, _ in self.tensors.values())

    @property
    def weight_bytes(self) -> int:
        return sum(b for _, b in self.tensors.values())

    @property
    def chain(self) -> list[dict[str, Any]]:
        """Every pruning run, oldest first (the record keeps earlier ones under ``previous``)."""
        latest = {k: v for k, v in self.record.items() if k != "previous"}
        return [*self.record.get("previous", []), latest]


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise ValueError(f"{path.name} has an implausible safetensors header length {length}")
        return json.loads(handle.read(length))


def read_checkpoint(directory: str | os.PathLike) -> Checkpoint:
    """Read ``config.json`` and the safetensors headers of a saved pruned model."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}: point to a directory written by save_pretrained")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    record = config.get("pruning_config")
    if not isinstance(record, dict) or not record:
        raise ValueError(
            f"{config_path} has no pruning record (pruning_config): the card describes models pruned with "
            "hf_prune; prune the model and save it with save_pretrained first"
        )
    tensors: dict[str, tuple[int, int]] = {}
    file_bytes = 0
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {directory}")
    for path in files:
        file_bytes += path.stat().st_size
        for name, meta in _safetensors_header(path).items():
            if name == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            tensors[name] = (math.prod(meta["shape"]), end - start)
        if record.get("compressed"):
            _merge_compressed(path, tensors)
    return Checkpoint(config, record, tensors, file_bytes)


def _merge_compressed(path: Path, tensors: dict[str, tuple[int, int]]) -> None:
    """Count each compressed weight (values + bitmask + shape) once, with its dense element count."""
    from safetensors import safe_open

    from ..checkpoint.compressed import MASK_SUFFIX, SHAPE_SUFFIX, VALUES_SUFFIX

    shape_names = [name for name in tensors if name.endswith(SHAPE_SUFFIX)]
    if not shape_names:
        return
    with safe_open(str(path), framework="pt") as handle:
        in_file = set(handle.keys())
        for shape_name in shape_names:
            if shape_name not in in_file:
                continue
            base = shape_name[: -len(SHAPE_SUFFIX)]
            stored = sum(tensors.pop(base + suffix, (0, 0))[1] for suffix in (VALUES_SUFFIX, MASK_SUFFIX, SHAPE_SUFFIX))
            tensors[base] = (math.prod(int(d) for d in handle.get_tensor(shape_name).tolist()), stored)


def structure_rows(chain: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Kept MLP neurons and heads per layer, from the record's ``structure`` entry, if any.

    The entry (written by ``hf_prune.structured``) holds per-layer lists ``mlp_neurons``,
    ``attention_heads`` and ``kv_heads``, and the same lists of the dense model under ``dense``.
    """
    structure = next((r["structure"] for r in reversed(chain) if r.get("structure")), None)
    if structure is None:
        return None
    if not isinstance(structure, dict) or not isinstance(structure.get("mlp_neurons"), list):
        raise ValueError("pruning_config.structure must hold per-layer lists such as 'mlp_neurons' and 'dense'")
    dense = structure.get("dense") or {}
    count = len(structure["mlp_neurons"])

    def column(values: Any) -> list[Any]:
        return list(values) + [None] * (count - len(values)) if isinstance(values, list) else [None] * count

    rows = []
    for kept, total, heads, heads_total, kv, kv_total in zip(
        column(structure.get("mlp_neurons")), column(dense.get("mlp_neurons")),
        column(structure.get("attention_heads")), column(dense.get("attention_heads")),
        column(structure.get("kv_heads")), column(dense.get("kv_heads")),
    ):
        rows.append({"neurons": kept, "neurons_total": total, "heads": heads, "heads_total": heads_total,
                     "kv": kv, "kv_total": kv_total})
    return rows


def structured_steps(chain: list[dict[str, Any]]) -> list[bool]:
    """Which runs removed neurons or heads: those after which the ``structure`` entry changed."""
    flags = []
    for index, record in enumerate(chain):
        before = chain[index - 1].get("structure") if index else None
        flags.append(bool(record.get("structure")) and record.get("structure") != before)
    return flags


def heads_removed(rows: list[dict[str, Any]] | None) -> bool:
    return bool(rows) and any(r["heads"] is not None and r["heads"] != r["heads_total"] for r in rows)


def expert_facts(record: dict[str, Any]) -> dict[str, Any] | None:
    """What a run did with routed experts, from the record's ``experts`` entry (``None`` if no experts).

    ``fallback`` holds one ``(bank, "experts 0, 3")`` pair per expert bank where an expert got
    fewer calibration tokens than the floor and was pruned by the data-free rule instead.
    """
    entry = record.get("experts")
    if not isinstance(entry, dict) or not isinstance(entry.get("banks"), dict):
        return None
    banks = entry["banks"]
    counts = [n for bank in banks.values() for n in (bank.get("tokens") or []) if isinstance(n, int)]
    fallback = [(name, "experts " + ", ".join(str(e) for e in bank.get("fallback") or []))
                for name, bank in banks.items() if bank.get("fallback")]
    return {
        "banks": len(banks),
        "experts": sum(len(bank.get("tokens") or []) for bank in banks.values()),
        "uses_statistics": bool(entry.get("uses_statistics")),
        "gate_weighting": bool(entry.get("gate_weighting")),
        "floor": entry.get("token_floor"),
        "rule": entry.get("fallback_rule", "magnitude"),
        "fewest": min(counts) if counts else None,
        "most": max(counts) if counts else None,
        "fallback": fallback,
        "fallback_count": sum(len(bank.get("fallback") or []) for bank in banks.values()),
    }
