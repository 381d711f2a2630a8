"""Property-based tests of the record and layout readers: any JSON value gives a result or the
library's own error, never another exception (``validate_record``, ``check_layout`` of the
compressed entry, ``check_structure_entry`` and ``apply_structure`` of the structure entry)."""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model

from hf_prune import HfPruneError, L1NormStructuredConfig, MagnitudeConfig
from hf_prune.checkpoint.compressed import check_layout
from hf_prune.checkpoint.record import validate_record
from hf_prune.surgery.reload import apply_structure, check_structure_entry

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)


@pytest.fixture(scope="module")
def records():
    """A real record of an unstructured run followed by a structured one, and the structured model."""
    model = tiny_model("llama")
    model.prune(MagnitudeConfig(sparsity=0.5))
    model.prune(L1NormStructuredConfig(amount=0.25))
    return model.config.pruning_config, model


def test_real_records_are_valid(records):
    record, _ = records
    assert validate_record(record) is record
    check_structure_entry(record["structure"])


# --- property-based: any JSON value gives a result or the library's error --------------------------


def _library_or_ok(function, value) -> None:
    try:
        function(value)
    except HfPruneError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_record_reader_on_any_json_value(value):
    _library_or_ok(validate_record, value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_record_reader_on_a_real_record_with_entries_replaced(records, data):
    record, _ = records
    crafted = copy.deepcopy(record)
    target = crafted
    path = data.draw(st.lists(st.sampled_from(
        ["measured_sparsity", "modules", "structure", "dense", "previous", 0, "calibration_used", "source",
         "layer_sparsity", "per_layer", "mlp_neurons", "overall"]), max_size=3))
    for step in path:  # walk into the record as far as the path leads
        if isinstance(target, dict) and isinstance(step, str) and isinstance(target.get(step), (dict, list)):
            target = target[step]
        elif isinstance(target, list) and isinstance(step, int) and target:
            target = target[step]
    key = data.draw(st.sampled_from(sorted(target)) if isinstance(target, dict) and target else st.just(None))
    value = data.draw(json_values)
    if isinstance(target, dict) and key is not None:
        target[key] = value
    elif isinstance(target, list) and target:
        target[0] = value
    for require in (True, False):
        _library_or_ok(lambda r, require=require: validate_record(r, require_measurement=require), crafted)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values | st.fixed_dictionaries(
    {"format": st.just("bitmask"), "version": st.just(1)},
    optional={"files": json_values | st.dictionaries(st.text(max_size=30), st.text(max_size=30), max_size=3),
              "index": json_values | st.dictionaries(st.text(max_size=40), st.text(max_size=40), max_size=2)},
))
def test_compressed_layout_reader_on_any_json_value(value):
    try:
        layout = check_layout(value)
    except HfPruneError:
        return
    for name in [*layout["files"].items(), *(layout.get("index") or {}).items()]:
        for part in name:  # what it accepts are plain file names
            assert "/" not in part and "\\" not in part and part not in (".", "..") and not part.startswith("/")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values | st.fixed_dictionaries(
    {key: json_values | st.lists(st.integers(-2, 300), max_size=3) for key in
     ("mlp_neurons", "attention_heads", "kv_heads")},
    optional={"dense": json_values, "parameters_before": json_values, "parameters_after": json_values,
              "kept_layers": json_values | st.lists(st.integers(-1, 5), max_size=4)},
))
def test_structure_reader_on_any_json_value(records, value):
    _, model = records
    _library_or_ok(check_structure_entry, value)
    fresh = tiny_model("llama")
    _library_or_ok(lambda v: apply_structure(fresh, v), value)


def test_structure_of_removed_layers_names_the_kept_ones():
    dense = {"mlp_neurons": [128] * 4, "attention_heads": [4] * 4, "kv_heads": [2] * 4}
    entry = {"mlp_neurons": [128, 64, 128], "attention_heads": [4] * 3, "kv_heads": [2] * 3, "dense": dense,
             "kept_layers": [0, 2, 3], "parameters_before": 10, "parameters_after": 8}
    assert check_structure_entry(entry)["mlp_neurons"] == [128, 64, 128]
    unknown = {**entry, "mlp_neurons": None, "attention_heads": None, "kv_heads": None,
               "dense": {key: None for key in dense}}  # a mixture of experts: layers removed, sizes not per layer
    assert check_structure_entry(unknown) is None
    for kept in ([0, 2], [2, 0, 3], [0, 2, 4], [0, 0, 3], [0, 2, True], "0,2,3"):
        with pytest.raises(HfPruneError, match="kept_layers"):
            check_structure_entry({**entry, "kept_layers": kept})
    with pytest.raises(HfPruneError, match="unless kept_layers"):
        check_structure_entry({k: v for k, v in entry.items() if k != "kept_layers"})
