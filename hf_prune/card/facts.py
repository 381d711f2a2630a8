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
    from ..checkpoint.record import validate_record

    validate_record(record, require_measurement=False)  # a crafted record raises the library's error here
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

    The entry (written by ``hf_prune.surgery.structure``) holds per-layer lists ``mlp_neurons``,
    ``attention_heads`` and ``kv_heads``, the same lists of the dense model under ``dense``, and,
    once decoder layers were removed, ``kept_layers``: the dense index of each remaining layer.
    For a mixture of experts (``mlp_neurons`` null, ``expert_neurons`` listed) the neuron columns
    are the neurons kept in each routed expert.
    """
    structure = next((r["structure"] for r in reversed(chain) if r.get("structure")), None)
    if structure is None:
        return None
    key = "mlp_neurons"
    if isinstance(structure, dict) and structure.get(key) is None and isinstance(structure.get("expert_neurons"), list):
        key = "expert_neurons"
    if not isinstance(structure, dict) or not isinstance(structure.get(key), list):
        raise ValueError("pruning_config.structure must hold per-layer lists such as 'mlp_neurons' and 'dense'")
    dense = structure.get("dense") or {}
    count = len(structure[key])
    kept_layers = structure.get("kept_layers")
    if not (isinstance(kept_layers, list) and len(kept_layers) == count
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in kept_layers)):
        kept_layers = list(range(count))

    def column(values: Any) -> list[Any]:
        return list(values) + [None] * (count - len(values)) if isinstance(values, list) else [None] * count

    def dense_column(values: Any) -> list[Any]:
        values = values if isinstance(values, list) else []
        return [values[i] if i < len(values) else None for i in kept_layers]

    rows = []
    for dense_index, kept, total, heads, heads_total, kv, kv_total in zip(
        kept_layers, column(structure.get(key)), dense_column(dense.get(key)),
        column(structure.get("attention_heads")), dense_column(dense.get("attention_heads")),
        column(structure.get("kv_heads")), dense_column(dense.get("kv_heads")),
    ):
        rows.append({"dense_index": dense_index, "neurons": kept, "neurons_total": total, "heads": heads,
                     "heads_total": heads_total, "kv": kv, "kv_total": kv_total})
    return rows


def _layer_count(sizes: dict[str, Any]) -> int:
    """Decoder layers a ``structure`` entry (or its ``dense`` sizes) lists: its ``mlp_neurons``, or for a mixture of
    experts (``mlp_neurons`` null) its ``expert_neurons``."""
    values = sizes.get("mlp_neurons")
    if not isinstance(values, list):
        values = sizes.get("expert_neurons")
    return len(values) if isinstance(values, list) else 0


def removed_units(structure: dict[str, Any] | None, before: dict[str, Any] | None = None) -> list[str]:
    """What a ``structure`` entry removed relative to ``before`` (an earlier entry; default the dense
    sizes): any of "decoder layers", "MLP neurons", "attention heads", "routed-expert neurons"."""
    if not structure:
        return []
    reference = before or {}
    reference_layers = reference.get("kept_layers") or list(range(_layer_count(structure.get("dense") or {})))
    kept = structure.get("kept_layers") or list(range(_layer_count(structure)))
    units = ["decoder layers"] if len(kept) < len(reference_layers) else []

    def previous(key: str) -> list[Any]:
        if before:
            lookup = dict(zip(reference_layers, before.get(key) or []))
        else:
            lookup = dict(enumerate((structure.get("dense") or {}).get(key) or []))
        return [lookup.get(i) for i in kept]

    for key, unit in (("mlp_neurons", "MLP neurons"), ("attention_heads", "attention heads"),
                      ("expert_neurons", "routed-expert neurons")):
        now = structure.get(key) or []
        if any(old is not None and new != old for new, old in zip(now, previous(key))):
            units.append(unit)
    return units


def architecture_rows(structure: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """(what, dense, pruned) rows: decoder layers and the width of each kind of unit."""
    if not structure:
        return []
    dense = structure.get("dense") or {}

    def summary(values: Any) -> str:
        values = [v for v in values if isinstance(v, int)] if isinstance(values, list) else []
        if not values:
            return "n/a"
        low, high = min(values), max(values)
        return str(low) if low == high else f"{low} to {high} (varies by layer)"

    rows = [("decoder layers", str(len(dense.get("mlp_neurons") or [])), str(len(structure.get("mlp_neurons") or [])))]
    labels = (("mlp_neurons", "MLP width (neurons per layer)"), ("attention_heads", "attention heads per layer"),
              ("kv_heads", "key/value heads per layer"))
    if isinstance(structure.get("expert_neurons"), list):
        rows[0] = ("decoder layers", str(len(dense.get("expert_neurons") or [])),
                   str(len(structure["expert_neurons"])))
        labels = (("expert_neurons", "routed-expert width (neurons per expert)"),)
    for key, label in labels:
        rows.append((label, summary(dense.get(key)), summary(structure.get(key))))
    before, after = structure.get("parameters_before"), structure.get("parameters_after")
    if isinstance(before, int) and isinstance(after, int):
        share = f" ({100 * after / before:.1f}%)" if before else ""
        rows.append(("parameters", f"{before:,}", f"{after:,}{share}"))
    return rows


def structured_steps(chain: list[dict[str, Any]]) -> list[bool]:
    """Which runs removed neurons, heads, layers or experts: those after which the ``structure`` entry
    changed, and those that removed routed experts (``removed_experts``) or residual channels
    (``removed_channels``)."""
    flags = []
    for index, record in enumerate(chain):
        before = chain[index - 1].get("structure") if index else None
        shrank = bool(record.get("structure")) and record.get("structure") != before
        flags.append(shrank or expert_removal(record) is not None or channel_removal(record) is not None)
    return flags


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def expert_removal(record: dict[str, Any]) -> dict[str, Any] | None:
    """What a run of expert pruning removed, from its ``removed_experts`` entry (``None`` for other runs).

    ``layers`` holds one ``{"layer", "kept", "removed"}`` row per mixture-of-experts layer, the
    removed experts numbered as in the model the run started from.
    """
    entry = record.get("removed_experts")
    if not isinstance(entry, dict):
        return None
    before, after = _count(entry.get("experts_before")), _count(entry.get("experts_after"))
    if before is None or after is None:
        return None
    layers = []
    for item in entry.get("layers") if isinstance(entry.get("layers"), list) else []:
        if not isinstance(item, dict) or _count(item.get("layer")) is None:
            continue
        removed = [e for e in item.get("removed") or [] if _count(e) is not None] \
            if isinstance(item.get("removed"), list) else []
        layers.append({"layer": item["layer"], "kept": f"{before - len(removed)} / {before}",
                       "removed": ", ".join(str(e) for e in removed) or "none"})
    score = str(entry.get("score") or "")
    return {
        "before": before, "after": after, "field": str(entry.get("config_field") or ""),
        "score": {"reap": "REAP saliency (mean over routed calibration tokens of gate value x L2 norm of the "
                          "expert's output)",
                  "frequency": "routing frequency (calibration tokens routed to each expert)"}.get(score, score),
        "layers": layers,
        "parameters_before": _count(entry.get("parameters_before")),
        "parameters_after": _count(entry.get("parameters_after")),
    }


def model_expert_removal(chain: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Routed experts per MoE layer before the first expert-pruning run and after the last, with the
    last run's per-layer rows; ``None`` when no run removed experts."""
    runs = [facts for facts in (expert_removal(r) for r in chain) if facts is not None]
    if not runs:
        return None
    return {**runs[-1], "before": runs[0]["before"], "parameters_before": runs[0]["parameters_before"]}


def channel_removal(record: dict[str, Any]) -> dict[str, Any] | None:
    """What a run of hidden-size pruning removed, from its ``removed_channels`` entry (``None`` for other runs)."""
    entry = record.get("removed_channels")
    if not isinstance(entry, dict):
        return None
    before, after = _count(entry.get("hidden_before")), _count(entry.get("hidden_after"))
    if before is None or after is None:
        return None
    return {
        "before": before, "after": after, "field": str(entry.get("config_field") or ""),
        "head_dim_before": _count(entry.get("head_dim_before")), "head_dim_after": _count(entry.get("head_dim_after")),
        "parameters_before": _count(entry.get("parameters_before")),
        "parameters_after": _count(entry.get("parameters_after")),
    }


def model_channel_removal(chain: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Hidden size before the first hidden-size pruning run and after the last; ``None`` when no run removed
    residual channels."""
    runs = [facts for facts in (channel_removal(r) for r in chain) if facts is not None]
    if not runs:
        return None
    return {**runs[-1], "before": runs[0]["before"], "head_dim_before": runs[0]["head_dim_before"],
            "parameters_before": runs[0]["parameters_before"]}


def heads_removed(rows: list[dict[str, Any]] | None) -> bool:
    return bool(rows) and any(r["heads"] is not None and r["heads"] != r["heads_total"] for r in rows)


#: (runtime, the entry point that loads a checkpoint, or None)
RUNTIMES = (("transformers", "AutoModelForCausalLM"), ("vLLM", None), ("llama.cpp", "convert_hf_to_gguf.py"),
            ("hf_prune", "AutoPrunedModelForCausalLM"))

#: What ``tests/inference/test_llama_cpp_convert.py`` runs through llama.cpp's ``convert_hf_to_gguf.py``:
#: model_type -> (the cases: which checkpoints and what was removed from them, what the GGUF was checked to
#: give). Llama and Qwen3-MoE GGUFs are loaded back in transformers; transformers reads llama.cpp's Mixtral as a
#: dense Llama, so its GGUF's sizes and router/expert weights are compared instead.
LLAMA_CPP_TESTED = {
    "llama": ((("tiny Llama", frozenset({"decoder layers", "MLP neurons", "attention heads",
                                         "residual-stream channels"})),),
              "into GGUF files with the pruned sizes and the same logits"),
    "qwen3_moe": ((("tiny Qwen3-MoE", frozenset({"routed experts", "routed-expert neurons"})),),
                  "into GGUF files with the pruned sizes and the same logits"),
    "mixtral": ((("tiny Mixtral", frozenset({"routed experts", "routed-expert neurons"})),),
                "into GGUF files with the pruned sizes and the same router and expert weights"),
}


def removed_kinds(chain: list[dict[str, Any]]) -> list[str]:
    """What the runs of ``chain`` removed from the base model: the units of the last ``structure`` entry
    (``removed_units``), then "routed experts" and "residual-stream channels" when a run removed them."""
    structure = next((r["structure"] for r in reversed(chain) if isinstance(r.get("structure"), dict)), None)
    kinds = removed_units(structure)
    if any(expert_removal(r) is not None for r in chain):
        kinds.append("routed experts")
    if any(channel_removal(r) is not None for r in chain):
        kinds.append("residual-stream channels")
    return kinds


#: What ``tests/inference/test_vllm_serving.py`` serves with vLLM, in the same form: SmolLM2-135M (a Llama)
#: with layers, neurons and heads removed gives transformers' greedy text; tiny Qwen3-MoE and Llama checkpoints
#: give transformers' log-probability of every prompt token.
VLLM_TESTED = {
    "llama": ((("SmolLM2-135M (a Llama)", frozenset({"decoder layers", "MLP neurons", "attention heads"})),
               ("tiny Llama", frozenset({"residual-stream channels"}))),
              "with the same output as transformers"),
    "qwen3_moe": ((("tiny Qwen3-MoE", frozenset({"routed experts", "routed-expert neurons"})),),
                  "with the same output as transformers"),
}


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _tested_note(tested: dict, subject: str, verb: str, model_type: Any, kinds: list[str]) -> str | None:
    """A runtime row's note: tested when the runtime's test runs this family pruned these ways, else expected."""
    if not kinds:
        return None
    entry = tested.get(model_type)
    wanted = set(kinds)
    if entry is not None and wanted <= set().union(*(removed for _, removed in entry[0])):
        cases = [f"{checkpoints} checkpoints with {_listed([k for k in kinds if k in removed])} removed"
                 for checkpoints, removed in entry[0] if removed & wanted]
        how = "tested" if len(cases) == 1 else "tested separately"  # no one checkpoint had it all removed
        return f"{how}: {subject} {verb} {' and '.join(cases)} {entry[1]}"
    families = _listed([f"{checkpoints} checkpoints ({', '.join(sorted(removed))} removed)"
                        for cases, _ in tested.values() for checkpoints, removed in cases])
    return f"expected: {subject} reads the kept sizes from config.json; tested only on {families}"


def runtimes(checkpoint: Checkpoint) -> list[dict[str, Any]]:
    """Which runtimes load the checkpoint: ``{"name", "entry", "loads", "why", "note"}`` per runtime.

    Unstructured and N:M checkpoints are dense tensors with zeros, and structured ones whose
    config states their sizes (``standard_config``) are ordinary checkpoints of their family:
    every runtime loads them. Compressed checkpoints and those whose layer sizes only the
    pruning record holds load with hf_prune alone. The note of a structured checkpoint says
    whether llama.cpp's converter (``LLAMA_CPP_TESTED``) and vLLM (``VLLM_TESTED``) are tested on its family
    pruned these ways, or expected to load it.
    """
    from ..checkpoint.standard_config import saved_config_is_standard

    if checkpoint.record.get("compressed"):
        why = "the weights are stored as nonzero values plus a bitmask, which only hf_prune expands"
    elif not saved_config_is_standard(checkpoint.config):
        why = "the layers have different sizes, which only the pruning record lists"
    else:
        why = None
    kinds = removed_kinds(checkpoint.chain)
    model_type = checkpoint.config.get("model_type")
    rows = []
    for name, entry in RUNTIMES:
        ours = name == "hf_prune"
        loads = ours or why is None
        note = None
        if loads and name == "llama.cpp":
            note = _tested_note(LLAMA_CPP_TESTED, "its converter", "turns", model_type, kinds)
        elif loads and name == "vLLM":
            note = _tested_note(VLLM_TESTED, "it", "serves", model_type, kinds)
        rows.append({"name": name, "entry": entry, "loads": loads, "why": None if ours else why, "note": note})
    return rows


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
