"""PruningConfig validation, dispatch on ``method`` and JSON round trips."""

from __future__ import annotations

import json

import pytest

from hf_prune import MagnitudeConfig, OWLSettings, PruningConfig, SparseGPTConfig, WandaConfig


@pytest.mark.parametrize(
    "config",
    [
        WandaConfig(sparsity=0.6, pattern="unstructured", targets=["mlp.*"], num_samples=4, seq_len=16),
        WandaConfig(pattern="2:4", owl=None),
        SparseGPTConfig(sparsity=None, pattern="4:8", block_size=64, dampening=0.05),
        MagnitudeConfig(sparsity=0.3, owl=OWLSettings(threshold=3.0, max_shift=0.05)),
    ],
)
def test_json_round_trip(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert data["method"] == config.method
    again = PruningConfig.from_dict(data)
    assert type(again) is type(config) and again == config
    assert PruningConfig.from_json_string(config.to_json_string()) == config


def test_nm_pattern_fixes_sparsity():
    assert WandaConfig(sparsity=None, pattern="2:4").sparsity == 0.5
    assert WandaConfig(sparsity=None, pattern="1:4").sparsity == 0.75
    with pytest.raises(ValueError, match="contradicts pattern 2:4"):
        WandaConfig(sparsity=0.6, pattern="2:4")


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "half", True])
def test_sparsity_outside_range_is_rejected(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be"):
        WandaConfig(sparsity=sparsity)


@pytest.mark.parametrize("pattern", ["2-4", "4:2", "0:4", "2:4:8", "a:b", "4:4"])
def test_malformed_pattern_is_rejected(pattern):
    with pytest.raises(ValueError, match="pattern"):
        WandaConfig(sparsity=None, pattern=pattern)


def test_unknown_method_and_fields_name_the_fix():
    with pytest.raises(ValueError, match="unknown pruning method 'prunotron'.*wanda"):
        PruningConfig.from_dict({"method": "prunotron", "sparsity": 0.5})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['blocksize'\].*block_size"):
        PruningConfig.from_dict({"method": "sparsegpt", "blocksize": 64})


def test_record_keys_are_ignored_on_read():
    record = WandaConfig().to_dict() | {"hf_prune_version": "0.1.0", "measured_sparsity": {"overall": 0.5}}
    assert PruningConfig.from_dict(record) == WandaConfig()


def test_base_config_is_not_a_method():
    with pytest.raises(TypeError, match="not a pruning method"):
        PruningConfig().make_pruner()


def test_owl_and_nm_do_not_mix():
    with pytest.raises(ValueError, match="owl"):
        WandaConfig(pattern="2:4", owl=True)


def test_sparsegpt_block_size_must_fit_nm():
    with pytest.raises(ValueError, match="multiple of M=8"):
        SparseGPTConfig(pattern="4:8", block_size=12)


def test_config_values_are_never_executed():
    with pytest.raises(ValueError):
        PruningConfig.from_dict({"method": "wanda", "sparsity": "__import__('os').system('true')"})
