"""The pruning record stored as ``config.json["pruning_config"]``: written, validated, checked on load."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torch import nn

from ..config import MAX_NESTING, PruningConfig, check_nesting, short_repr
from ..engine.offload import read_parameter
from ..errors import PruningConfigError, PruningRecordError, PruningRecordMismatchError, StructureMismatchError
from ..methods.patterns import Pattern, parse_pattern, satisfies_nm
from ..report import PruningReport, measure_sparsity
from ..walker.layout import Operator, decoder_operators
from .provenance import public_source_name

TOLERANCE = 1e-4
#: largest hidden size or head width a record may state (keeps crafted numbers off the card)
MAX_WIDTH = 2**20
#: Entries holding flat JSON objects (strings, numbers, booleans, null as values).
_FLAT_ENTRIES = ("calibration_used", "source", "evaluation")
_SCALARS = (str, int, float, bool, type(None))


def _refuse(path: str, message: str) -> PruningRecordError:
    return PruningRecordError(
        f"pruning_config{path} {message}. The record in config.json was edited or does not come from hf_prune: "
        "save the pruned model again, or load the weights with transformers' AutoModelForCausalLM"
    )


def _share(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise _refuse(path, f"must be a sparsity in [0, 1], got {short_repr(value)}")
    return float(value)


def _check_measurement(measured: Any, path: str) -> None:
    if not isinstance(measured, dict):
        raise _refuse(path, f"must be a dict with 'modules', 'per_layer' and 'overall', got {short_repr(measured)}")
    modules = measured.get("modules")
    if not isinstance(modules, dict):
        raise _refuse(f"{path}.modules", f"must map module names to their sparsity, got {short_repr(modules)}")
    for name, value in modules.items():
        _share(value, f"{path}.modules[{short_repr(name)}]")
    if "overall" in measured:
        _share(measured["overall"], f"{path}.overall")
    per_layer = measured.get("per_layer", [])
    if not isinstance(per_layer, list):
        raise _refuse(f"{path}.per_layer", f"must be a list, got {short_repr(per_layer)}")
    for i, value in enumerate(per_layer):
        _share(value, f"{path}.per_layer[{i}]")


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _check_removed_experts(entry: Any, path: str) -> None:
    """The experts an expert-pruning run removed (``methods.experts``): counts before and after, and
    per MoE layer the removed experts, routed tokens and scores."""
    if not isinstance(entry, dict):
        raise _refuse(path, f"must be a JSON object, got {short_repr(entry)}")
    for key in ("parameters_before", "parameters_after"):
        if entry.get(key) is not None and not _natural(entry[key]):
            raise _refuse(f"{path}.{key}", f"must be a parameter count, got {short_repr(entry[key])}")
    for key in ("experts_before", "experts_after"):
        if not _natural(entry.get(key)):
            raise _refuse(f"{path}.{key}", f"must be a non-negative integer, got {short_repr(entry.get(key))}")
    if entry["experts_after"] > entry["experts_before"]:
        raise _refuse(path, "keeps more experts than it started from")
    layers = entry.get("layers", [])
    if not isinstance(layers, list):
        raise _refuse(f"{path}.layers", f"must be a list, got {short_repr(layers)}")
    for i, layer in enumerate(layers):
        where = f"{path}.layers[{i}]"
        if not isinstance(layer, dict) or not _natural(layer.get("layer")):
            raise _refuse(where, f"must be a JSON object with an integer 'layer', got {short_repr(layer)}")
        for key in ("removed", "tokens"):
            values = layer.get(key, [])
            if not isinstance(values, list) or not all(_natural(v) for v in values):
                raise _refuse(f"{where}.{key}", f"must be a list of non-negative integers, got {short_repr(values)}")
        scores = layer.get("scores", [])
        if not isinstance(scores, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and math.isfinite(v)
                for v in scores):
            raise _refuse(f"{where}.scores", f"must be a list of finite numbers, got {short_repr(scores)}")


#: the entries of ``distillation`` and what each holds
_DISTILLATION_TEXT = ("teacher", "data", "kl_data", "eval_dataset")
_DISTILLATION_COUNTS = ("steps", "tokens", "seq_len", "eval_seq_len", "eval_windows")
_DISTILLATION_NUMBERS = ("learning_rate", "temperature", "lm_weight", "hidden_weight", "kl_before", "kl_after",
                         "perplexity_before", "perplexity_after")
#: the mixed precision a distillation trained in (absent or ``None``: float32) -> the dtype its matmuls ran in
MIXED_PRECISIONS = {"bf16": "bfloat16", "fp16": "float16"}
_DISTILLATION_KEYS = frozenset((*_DISTILLATION_TEXT, *_DISTILLATION_COUNTS, *_DISTILLATION_NUMBERS, "lora",
                                "mixed_precision"))
_MAX_TEXT = 200


def check_distillation_entry(entry: Any, path: str) -> None:
    """The recovery training after pruning (``hf_prune.distill``): teacher and data names, step and token
    counts, loss settings, KL to the teacher and perplexity before and after. Only known keys; names are
    short strings, counts non-negative integers, the other numbers finite and non-negative."""
    if not isinstance(entry, dict):
        raise _refuse(path, f"must be a JSON object, got {short_repr(entry)}")
    unknown = sorted(short_repr(k) if not isinstance(k, str) else k for k in entry if k not in _DISTILLATION_KEYS)
    if unknown:
        raise _refuse(path, f"has unknown entries {unknown[:5]}; known: {sorted(_DISTILLATION_KEYS)}")
    for key in ("teacher", "steps", "tokens", "kl_before", "kl_after"):
        if entry.get(key) is None:
            raise _refuse(f"{path}.{key}", "is missing")
    for key in _DISTILLATION_TEXT:
        value = entry.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > _MAX_TEXT):
            raise _refuse(f"{path}.{key}", f"must be a name of at most {_MAX_TEXT} characters, got {short_repr(value)}")
    for key in _DISTILLATION_COUNTS:
        value = entry.get(key)
        if value is not None and not _natural(value):
            raise _refuse(f"{path}.{key}", f"must be a non-negative integer, got {short_repr(value)}")
    for key in _DISTILLATION_NUMBERS:
        value = entry.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise _refuse(f"{path}.{key}", f"must be a finite non-negative number, got {short_repr(value)}")
    if not isinstance(entry.get("lora", False), bool):
        raise _refuse(f"{path}.lora", f"must be true or false, got {short_repr(entry.get('lora'))}")
    if entry.get("mixed_precision") not in (None, *MIXED_PRECISIONS):
        raise _refuse(f"{path}.mixed_precision", f"must be one of {sorted(MIXED_PRECISIONS)} or null (float32), got "
                                                 f"{short_repr(entry.get('mixed_precision'))}")


def _check_removed_channels(entry: Any, path: str) -> None:
    """The residual channels a hidden-size run removed (``methods.hidden_size``): sizes before and after, the
    removed channel indices (one per removed channel, within the old width) and the channel scores."""
    if not isinstance(entry, dict):
        raise _refuse(path, f"must be a JSON object, got {short_repr(entry)}")
    for key in ("parameters_before", "parameters_after"):
        if entry.get(key) is not None and not _natural(entry[key]):
            raise _refuse(f"{path}.{key}", f"must be a parameter count, got {short_repr(entry[key])}")
    for key in ("hidden_before", "hidden_after", "head_dim_before", "head_dim_after"):
        if not _natural(entry.get(key)) or entry[key] > MAX_WIDTH:
            raise _refuse(f"{path}.{key}", f"must be a width in [0, {MAX_WIDTH}], got {short_repr(entry.get(key))}")
    before, after = entry["hidden_before"], entry["hidden_after"]
    if after > before or entry["head_dim_after"] > entry["head_dim_before"]:
        raise _refuse(path, "keeps more channels than it started from")
    if not isinstance(entry.get("config_field"), str):
        raise _refuse(f"{path}.config_field", f"must be a string, got {short_repr(entry.get('config_field'))}")
    removed = entry.get("removed")
    if (not isinstance(removed, list) or len(removed) != before - after
            or not all(_natural(c) and c < before for c in removed) or len(set(removed)) != len(removed)):
        raise _refuse(f"{path}.removed", f"must list the {before - after} distinct removed channels, each below "
                      f"{before}, got {short_repr(removed)}")
    scales = entry.get("norm_scales", [])
    if not isinstance(scales, list) or len(scales) > MAX_WIDTH or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in scales):
        raise _refuse(f"{path}.norm_scales", f"must list finite non-negative factors, got {short_repr(scales)}")
    scores = entry.get("scores", [])
    if not isinstance(scores, list) or len(scores) not in (0, before) or not all(
            isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and math.isfinite(v)
            for v in scores):
        raise _refuse(f"{path}.scores", f"must list one finite score per channel, got {short_repr(scores)}")


#: most candidates a ``budget_search`` entry may list (the config allows 64 mixes)
MAX_CANDIDATES = 256
#: the counts of a budget candidate: a natural number, or null when it was skipped before being shaped
_CANDIDATE_COUNTS = ("layers_removed", "kv_groups_removed", "hidden_size", "mlp_neurons", "experts_removed",
                     "parameters")


def _finite(value: Any, low: float = 0.0, high: float = math.inf) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and low <= value <= high)


def _check_budget_search(entry: Any, path: str) -> None:
    """What a parameter-budget search tried and chose (``methods.budget``): target, dense and kept non-embedding
    parameter counts, the rounding unit, and per candidate its mix, sizes, kept parameters and KL."""
    if not isinstance(entry, dict):
        raise _refuse(path, f"must be a JSON object, got {short_repr(entry)}")
    for key in ("target_params", "dense_params", "kept_params", "rounding_unit", "scored_windows"):
        if not _natural(entry.get(key)):
            raise _refuse(f"{path}.{key}", f"must be a non-negative integer, got {short_repr(entry.get(key))}")
    candidates = entry.get("candidates")
    if not isinstance(candidates, list) or not 0 < len(candidates) <= MAX_CANDIDATES:
        raise _refuse(f"{path}.candidates", f"must list 1 to {MAX_CANDIDATES} candidates, got "
                      f"{short_repr(candidates)}")
    if not isinstance(entry.get("mixture_of_experts", False), bool):
        raise _refuse(f"{path}.mixture_of_experts", f"must be true or false, got "
                      f"{short_repr(entry['mixture_of_experts'])}")
    chosen = entry.get("chosen")
    if not _natural(chosen) or chosen >= len(candidates):
        raise _refuse(f"{path}.chosen", f"must be the index of a candidate, got {short_repr(chosen)}")
    for i, candidate in enumerate(candidates):
        where = f"{path}.candidates[{i}]"
        if not isinstance(candidate, dict):
            raise _refuse(where, f"must be a JSON object, got {short_repr(candidate)}")
        mix = candidate.get("mix")
        if not isinstance(mix, list) or len(mix) not in (3, 4) or not all(_finite(v, 0.0, 1.0) for v in mix):
            raise _refuse(f"{where}.mix", f"must be three or four shares in [0, 1], got {short_repr(mix)}")
        for key in _CANDIDATE_COUNTS:
            if candidate.get(key) is not None and not _natural(candidate[key]):
                raise _refuse(f"{where}.{key}", f"must be a non-negative integer or null, got "
                              f"{short_repr(candidate[key])}")
        for key, high in (("neuron_amount", 1.0), ("kl", math.inf)):
            if candidate.get(key) is not None and not _finite(candidate[key], 0.0, high):
                raise _refuse(f"{where}.{key}", f"must be a finite non-negative number or null, got "
                              f"{short_repr(candidate[key])}")
        if candidate.get("skipped") is not None and not isinstance(candidate["skipped"], str):
            raise _refuse(f"{where}.skipped", f"must be a string or null, got {short_repr(candidate['skipped'])}")
        same = candidate.get("same_as")
        if same is not None and (not _natural(same) or same >= i):
            raise _refuse(f"{where}.same_as", f"must name an earlier candidate or be null, got {short_repr(same)}")
    if candidates[chosen].get("kl") is None:
        raise _refuse(f"{path}.chosen", "names a candidate that was not scored")


def _check_run(record: dict[str, Any], path: str, require_measurement: bool) -> None:
    """One pruning run: its configuration, measurements and flat descriptions."""
    try:
        PruningConfig.from_dict(record)
    except PruningConfigError as err:
        raise _refuse(f"{path}.{err.field}" if err.field != "pruning_config" else path, f"is invalid: {err}") from None
    measured = record.get("measured_sparsity")
    if measured is None:
        if require_measurement:
            raise _refuse(f"{path}.measured_sparsity", "is missing, so the weights cannot be checked against it "
                          "(pass verify_pruning=False to load without the check)")
    else:
        _check_measurement(measured, f"{path}.measured_sparsity")
    layers = record.get("layer_sparsity", [])
    if not isinstance(layers, list):
        raise _refuse(f"{path}.layer_sparsity", f"must be a list, got {short_repr(layers)}")
    for i, value in enumerate(layers):
        _share(value, f"{path}.layer_sparsity[{i}]")
    for key in _FLAT_ENTRIES:
        entry = record.get(key)
        if entry is None:
            continue
        if not isinstance(entry, dict) or not all(
            isinstance(k, str) and isinstance(v, _SCALARS) for k, v in entry.items()
        ):
            raise _refuse(f"{path}.{key}", f"must be a flat JSON object, got {short_repr(entry)}")
        for k, v in entry.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise _refuse(f"{path}.{key}.{k}", f"must be finite, got {v}")
    if record.get("removed_experts") is not None:
        _check_removed_experts(record["removed_experts"], f"{path}.removed_experts")
    if record.get("distillation") is not None:
        check_distillation_entry(record["distillation"], f"{path}.distillation")
    if record.get("removed_channels") is not None:
        _check_removed_channels(record["removed_channels"], f"{path}.removed_channels")
    if record.get("budget_search") is not None:
        _check_budget_search(record["budget_search"], f"{path}.budget_search")
    version = record.get("hf_prune_version")
    if version is not None and not isinstance(version, str):
        raise _refuse(f"{path}.hf_prune_version", f"must be a string, got {short_repr(version)}")


def validate_record(record: Any, require_measurement: bool = True) -> dict[str, Any]:
    """Check a pruning record's shape before anything reads it; return it.

    Raises ``PruningRecordError`` (or ``PruningConfigError`` / ``UnknownMethodError`` for the
    configuration itself) for anything but what ``make_record`` writes: entries of the wrong
    type, values out of range, nesting deeper than ``MAX_NESTING``, a missing
    ``measured_sparsity`` (when ``require_measurement``), a malformed ``structure`` or
    ``compressed`` layout. Never another exception, whatever JSON value it is given.
    """
    if not isinstance(record, dict):
        raise _refuse("", f"must be a JSON object, got {type(record).__name__}")
    try:
        check_nesting(record, MAX_NESTING)
    except PruningConfigError as err:
        raise PruningRecordError(str(err)) from None
    _check_run(record, "", require_measurement)
    previous = record.get("previous", [])
    if not isinstance(previous, list):
        raise _refuse(".previous", f"must be a list of earlier runs, got {short_repr(previous)}")
    for i, run in enumerate(previous):
        if not isinstance(run, dict) or "previous" in run:
            raise _refuse(f".previous[{i}]", "must be the record of one earlier run (a JSON object without "
                          "'previous')")
        for key in ("structure", "compressed"):
            if run.get(key) is not None and not isinstance(run[key], dict):
                raise _refuse(f".previous[{i}].{key}", f"must be a JSON object, got {short_repr(run[key])}")
        _check_run(run, f".previous[{i}]", require_measurement=False)
    if record.get("structure") is not None:
        from ..surgery.reload import check_structure_entry

        check_structure_entry(record["structure"])
    if record.get("compressed") is not None:
        from .compressed import check_layout

        check_layout(record["compressed"])
    return record


def _name_local_files(config: dict[str, Any]) -> None:
    """Keep only the file name of a local calibration file, in a config dict and its nested ``initial``."""
    while isinstance(config, dict):
        if isinstance(config.get("calibration"), str):
            config["calibration"] = public_source_name(config["calibration"])
        config = config.get("initial")


def make_record(config: PruningConfig, calibration: dict | None, layer_sparsity: list[float],
                report: PruningReport, previous: dict | None = None,
                structure: dict | None = None) -> dict[str, Any]:
    """The JSON record of one pruning run: config, calibration used, measured sparsity.

    ``structure`` (per-layer kept sizes, parameter counts) is set once any run removed
    neurons or heads, and stays at the top level through later runs so loaders find it.
    """
    from .. import __version__

    record = config.to_dict()
    _name_local_files(record)
    record["hf_prune_version"] = __version__
    record["calibration_used"] = calibration
    record["layer_sparsity"] = [round(s, 6) for s in layer_sparsity]
    record["measured_sparsity"] = report.to_dict()
    if structure:
        record["structure"] = structure
    if previous:
        record["previous"] = [*previous.get("previous", []), {k: v for k, v in previous.items() if k != "previous"}]
    return record


def recorded_sparsity(record: dict[str, Any] | None) -> dict[str, float]:
    """Module name -> sparsity measured when the record was written."""
    modules = ((record or {}).get("measured_sparsity") or {}).get("modules") or {}
    return {name: float(value) for name, value in modules.items()}


def check_operator(op: Operator, expected: float | None, pattern: Pattern, advice: str) -> None:
    """Raise ``PruningRecordMismatchError`` if ``op`` has fewer zeros than ``expected`` or lost its N:M
    pattern (offloaded weights are read from their store)."""
    weight = op.stored_weight(read_parameter(op.module, op.parameter)).detach()
    if weight.device.type == "meta":
        raise ValueError(f"{op.name} is on the meta device: load the weights first")
    zeros = int((weight == 0).sum())
    sparsity = zeros / weight.numel() if weight.numel() else 0.0
    if expected is not None and sparsity + TOLERANCE < expected:
        raise PruningRecordMismatchError(
            f"{op.name} has sparsity {sparsity:.4f} but its pruning record says {expected:.4f}: {advice}"
        )
    out_in = weight.t() if op.transposed else weight
    if pattern.is_nm and zeros and not satisfies_nm(out_in, pattern.n, pattern.m):
        raise PruningRecordMismatchError(f"{op.name} no longer has the {pattern} pattern: {advice}")


def check_weights_against_record(operators: Iterable[Operator], record: dict[str, Any], advice: str) -> int:
    """Check every operator the record lists as pruned (zeros at least as recorded, the N:M pattern
    kept) and that the record names no module the model lacks; returns how many were checked."""
    recorded = recorded_sparsity(record)
    pattern = parse_pattern(record.get("pattern") or "unstructured")
    seen: set[str] = set()
    checked = 0
    for op in operators:
        seen.add(op.name)
        if recorded.get(op.name, 0.0) > 0:
            check_operator(op, recorded[op.name], pattern, advice)
            checked += 1
    missing = sorted(set(recorded) - seen)
    if missing:
        raise PruningRecordMismatchError(f"the pruning record names modules the model lacks: {missing[:5]}. {advice}")
    return checked


def verify_record(model: nn.Module, record: dict[str, Any], source: str) -> PruningReport:
    """Raise ``PruningRecordMismatchError`` if the weights lost zeros, the N:M pattern or the recorded
    structure; return the measured sparsity.

    The record is validated first (``validate_record``): one without ``measured_sparsity``
    cannot be checked and raises ``PruningRecordError``.
    """
    validate_record(record, require_measurement=True)
    advice = (
        f"The checkpoint at {source} was probably changed after pruning (fine-tuned without hf_prune's "
        "SparsityCallback, or merged with a dense adapter). Load it with transformers' AutoModelForCausalLM "
        "to ignore the record, or pass verify_pruning=False"
    )
    check_weights_against_record(decoder_operators(model, include_routers=True), record, advice)
    _verify_structure(model, record, advice)
    return measure_sparsity(model)


def _verify_structure(model: nn.Module, record: dict[str, Any], advice: str) -> None:
    """Raise ``StructureMismatchError`` if the layers' sizes differ from the recorded structure."""
    structure = record.get("structure")
    if not structure:
        return
    from ..surgery.structure import EXPERT_KEY, SIZE_KEYS, model_shape

    measured = model_shape(model).lists()
    for key in (*SIZE_KEYS, EXPERT_KEY):
        if key == EXPERT_KEY and key not in structure:  # records of dense models, or written before expert neurons
            continue
        if structure.get(key) != measured.get(key):
            raise StructureMismatchError(
                f"the model has {key} {measured.get(key)} per layer but its pruning record says {structure.get(key)}. "
                f"{advice}"
            )
