"""The pruning record stored as ``config.json["pruning_config"]``, and its check on load."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import PruningConfig
from ..errors import PruningRecordMismatchError, StructureMismatchError
from ..methods.patterns import parse_pattern, satisfies_nm
from ..report import PruningReport, measure_sparsity
from ..walker.layout import DecoderLayout

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


def verify_record(model: nn.Module, record: dict[str, Any], source: str) -> PruningReport:
    """Raise ``PruningRecordMismatchError`` if the weights lost zeros or the N:M pattern."""
    measured = measure_sparsity(model)
    recorded = (record.get("measured_sparsity") or {}).get("modules") or {}
    advice = (
        f"The checkpoint at {source} was probably changed after pruning (fine-tuned without hf_prune's "
        "SparsityCallback, or merged with a dense adapter). Load it with transformers' AutoModelForCausalLM "
        "to ignore the record, or pass verify_pruning=False"
    )
    missing = sorted(set(recorded) - set(measured.per_module))
    if missing:
        raise PruningRecordMismatchError(f"the pruning record names modules the model lacks: {missing[:5]}. {advice}")
    for name, expected in recorded.items():
        if measured.per_module[name] + TOLERANCE < expected:
            raise PruningRecordMismatchError(
                f"{name} has sparsity {measured.per_module[name]:.4f} but the pruning record says {expected:.4f}. "
                f"{advice}"
            )
    _verify_structure(model, record, advice)
    pattern = parse_pattern(record.get("pattern", "unstructured"))
    if pattern.is_nm:
        layout = DecoderLayout(model)
        for index in range(len(layout)):
            for op in layout.operators(index):
                if recorded.get(op.name, 0) > 0 and not satisfies_nm(op.read_weight(), pattern.n, pattern.m):
                    raise PruningRecordMismatchError(f"{op.name} no longer has the {pattern} pattern. {advice}")
    return measured


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
