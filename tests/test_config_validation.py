"""Every config field is checked for type and range at construction and in ``from_dict``.

Bad values raise ``PruningConfigError`` (a ``ValueError``) naming the field, before anything is
pruned; ``from_dict`` turns any JSON value into a config or one of the library's errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model

from hf_prune import (
    BarberConfig,
    FISTAConfig,
    HfPruneError,
    MagnitudeConfig,
    OWLSettings,
    PruningConfig,
    WandaConfig,
    registered_methods,
)
from hf_prune.errors import PruningConfigError

METHODS = registered_methods()

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


# --- the values the review found (issue item 6) -----------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"targets": {"mlp.*"}}, "targets"),
        ({"targets": frozenset({"mlp.*"})}, "targets"),
        ({"seed": "abc"}, "seed"),
        ({"seed": -10**30}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"device": "meta"}, "device"),
        ({"device": "not-a-device"}, "device"),
        ({"device": 0}, "device"),
        ({"sparsity": 10**400}, "sparsity"),
        ({"sparsity": float("inf")}, "sparsity"),
        ({"num_samples": 2**70}, "num_samples"),
        ({"num_samples": 4.0}, "num_samples"),
        ({"seq_len": True}, "seq_len"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": "8"}, "batch_size"),
        ({"calibration": ["c4"]}, "calibration"),
        ({"calibration": ""}, "calibration"),
        ({"pattern": "1:" + "9" * 5000}, "pattern"),
        ({"owl": {"threshold": "5"}}, "owl.threshold"),
        ({"owl": {"threshold": 5.0, "extra": 1}}, "owl"),
        ({"owl": 5}, "owl"),
        ({"targets": ["mlp.*", 3]}, "targets"),
        ({"targets": [""]}, "targets"),
    ],
)
def test_bad_values_are_refused_at_construction_naming_the_field(kwargs, field):
    with pytest.raises(PruningConfigError) as caught:
        WandaConfig(**kwargs)
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, HfPruneError)
    assert field.split(".")[0] in str(caught.value)
    if not any(isinstance(v, (set, frozenset)) for v in kwargs.values()):  # the same value read from JSON
        with pytest.raises(PruningConfigError) as again:
            PruningConfig.from_dict({"method": "wanda", **kwargs})
        assert again.value.field == field


def test_a_set_of_targets_is_refused_before_pruning_so_no_work_is_lost(token_ids):
    model = tiny_model("llama")
    with pytest.raises(PruningConfigError, match="targets must be a list"):
        model.prune(WandaConfig(targets={"mlp.*"}, device="cpu"), calibration_data=token_ids)
    assert not model.is_pruned and model.pruning_report().overall == 0.0


def test_accepted_shorthands_become_the_annotated_types():
    config = WandaConfig(sparsity=0, targets=("mlp.*", "self_attn.*"), owl={"threshold": 4, "max_shift": 0})
    assert config.sparsity == 0.0 and isinstance(config.sparsity, float)
    assert config.targets == ["mlp.*", "self_attn.*"]
    assert config.owl == OWLSettings(threshold=4.0, max_shift=0.0) and isinstance(config.owl.threshold, float)
    assert WandaConfig(targets="mlp.*").targets == ["mlp.*"]
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    assert WandaConfig(device="cuda:3").device == "cuda:3"  # checked for syntax only: no GPU needed to build it
    assert FISTAConfig(devices="cuda:1").devices == ["cuda:1"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_field_of_every_method_checks_its_type(method):
    cls = METHODS[method]
    for field in dataclasses.fields(cls):
        with pytest.raises(PruningConfigError) as caught:
            cls(**{field.name: object()})
        assert caught.value.field == field.name, (method, field.name, str(caught.value))


def _accepts(hint: object, kind: type) -> bool:
    return hint is kind or kind in typing.get_args(hint)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_numeric_field_refuses_nan_inf_and_overflow(method):
    cls = METHODS[method]
    for name, hint in typing.get_type_hints(cls).items():
        if name not in {f.name for f in dataclasses.fields(cls)}:
            continue
        bad: list[object] = []
        if _accepts(hint, float):
            bad += [math.nan, math.inf, -math.inf, 10**400]
        if _accepts(hint, int):
            bad += [2**63, -(2**63) - 1, "3"]
        for value in bad:
            with pytest.raises(PruningConfigError) as caught:
                cls(**{name: value})
            assert caught.value.field == name, (method, name, value)


def test_fista_devices_are_checked_like_device():
    with pytest.raises(PruningConfigError, match="devices") as caught:
        FISTAConfig(devices=["cuda:0", "meta"])
    assert caught.value.field == "devices"
    with pytest.raises(PruningConfigError):
        FISTAConfig(devices=["auto"])


def test_deeply_nested_barber_initial_is_refused_without_recursion():
    data: dict = {"method": "wanda"}
    for depth in range(500):
        data = {"method": "barber", "initial": data}
        if depth == 2:
            with pytest.raises(PruningConfigError, match="initial must be one of"):  # refused at the first level
                PruningConfig.from_dict(data)
    with pytest.raises(PruningConfigError, match="levels deep"):
        PruningConfig.from_dict(data)
    deep: object = 0
    for _ in range(10_000):
        deep = [deep]
    with pytest.raises(PruningConfigError, match="levels deep"):
        PruningConfig.from_dict({"method": "wanda", "targets": deep})


def test_barber_initial_of_another_method_is_refused_before_it_is_built():
    with pytest.raises(PruningConfigError, match="initial must be one of") as caught:
        PruningConfig.from_dict({"method": "barber", "initial": {"method": "fista", "max_iters": "x"}})
    assert caught.value.field == "initial"
    assert BarberConfig(initial={"method": "sparsegpt", "block_size": 64}).initial.block_size == 64


def test_from_json_string_with_invalid_json_is_a_config_error():
    with pytest.raises(PruningConfigError, match="JSON"):
        PruningConfig.from_json_string("{not json")
    with pytest.raises(PruningConfigError):
        PruningConfig.from_json_string("[" * 100_000 + "]" * 100_000)


def test_unknown_field_with_a_non_string_key_is_reported():
    with pytest.raises(PruningConfigError, match="unknown field"):
        PruningConfig.from_dict({"method": "wanda", 1: 2, "x": 3})


# --- property-based: any JSON value gives a config or the library's error --------------------------


def _config_or_library_error(data: object) -> PruningConfig | None:
    try:
        config = PruningConfig.from_dict(data)  # type: ignore[arg-type]
    except HfPruneError:
        return None
    # what from_dict accepts is a JSON-ready config that round-trips
    again = PruningConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    return config


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_from_dict_of_any_json_value_is_a_config_or_a_library_error(data):
    _config_or_library_error(data)


field_names = sorted({f.name for cls in METHODS.values() for f in dataclasses.fields(cls)})


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(METHODS)),
    st.dictionaries(st.sampled_from(field_names), json_values | st.sampled_from(
        [0.5, 0.3, "2:4", "4:8", "unstructured", "cpu", "cuda:0", "auto", 0, 1, 8, 64, None, True, False,
         "wanda", "sparsegpt", "magnitude", "swaps", "gradient", "row", "renyi", "gaussian", ["mlp.*"]]),
        max_size=6),
)
def test_from_dict_of_any_fields_is_a_config_or_a_library_error(method, fields):
    _config_or_library_error({"method": method, **fields})


@settings(max_examples=200, deadline=None)
@given(st.builds(
    dict,
    sparsity=st.floats(0, 0.99),
    seed=st.integers(0, 2**63 - 1),
    num_samples=st.integers(1, 2**31),
    seq_len=st.integers(1, 2**20),
    targets=st.none() | st.lists(st.text(min_size=1, max_size=8), max_size=3),
    device=st.sampled_from(["auto", "cpu", "cuda", "cuda:1", "mps"]),
))
def test_valid_configs_round_trip(fields):
    config = MagnitudeConfig(**fields)
    assert PruningConfig.from_json_string(config.to_json_string()) == config


def test_config_errors_are_value_errors_for_old_callers():
    with pytest.raises(ValueError, match="sparsity must be"):
        WandaConfig(sparsity="half")
    assert torch.Generator().manual_seed(WandaConfig(seed=2**63 - 1).seed) is not None
