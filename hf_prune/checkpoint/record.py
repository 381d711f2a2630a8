"""The pruning record stored as ``config.json["pruning_config"]``, and its check on load."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ..config import PruningConfig
from ..engine.offload import read_parameter
from ..errors import PruningRecordMismatchError, StructureMismatchError
from ..methods.patterns import Pattern, parse_pattern, satisfies_nm
from ..report import PruningReport, measure_sparsity
from ..walker.layout import Operator, decoder_operators

TOLERANCE = 1e-4


def make_record(config: PruningConfig, calibration: dict | None, layer_sparsity: list[float],
                report: PruningReport, previous: dict | None = None,
                structure: dict | None = None) -> dict[str, Any]:
    """The JSON record of one pruning run: config, calibration used, measured sparsity.

    ``structure`` (per-layer kept sizes, parameter counts) is set once any run removed
    neurons or heads, and stays at the top level through later runs so loaders find it.
    """
    from .. import __version__

    record = config.to_dict()
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
    weight = read_parameter(op.module, "weight").detach()
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
    structure; return the measured sparsity."""
    advice = (
        f"The checkpoint at {source} was probably changed after pruning (fine-tuned without hf_prune's "
        "SparsityCallback, or merged with a dense adapter). Load it with transformers' AutoModelForCausalLM "
        "to ignore the record, or pass verify_pruning=False"
    )
    check_weights_against_record(decoder_operators(model), record, advice)
    _verify_structure(model, record, advice)
    return measure_sparsity(model)


def _verify_structure(model: nn.Module, record: dict[str, Any], advice: str) -> None:
    """Raise ``StructureMismatchError`` if the layers' sizes differ from the recorded structure."""
    structure = record.get("structure")
    if not structure:
        return
    from ..surgery.structure import SIZE_KEYS, model_shape

    measured = model_shape(model).lists()
    for key in SIZE_KEYS:
        if structure.get(key) != measured[key]:
            raise StructureMismatchError(
                f"the model has {key} {measured[key]} per layer but its pruning record says {structure.get(key)}. "
                f"{advice}"
            )
