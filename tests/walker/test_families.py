"""Every method x pattern on a tiny model of every supported family."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, tiny_model
from transformers import AutoModelForCausalLM

from hf_prune import AutoPrunedModelForCausalLM, MagnitudeConfig, PruningConfig, SparseGPTConfig, WandaConfig
from hf_prune.methods.patterns import satisfies_nm
from hf_prune.walker.layout import DecoderLayout

METHODS = {"magnitude": MagnitudeConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig}
PATTERNS = ["unstructured", "2:4"]


def _config(method: str, pattern: str) -> PruningConfig:
    sparsity = 0.5 if pattern == "unstructured" else None
    return METHODS[method](sparsity=sparsity, pattern=pattern, device="cpu")


def _assert_pattern(model, pattern: str) -> None:
    layout = DecoderLayout(model)
    checked = 0
    for index in range(len(layout)):
        for op in layout.operators(index):
            weight = op.read_weight()
            zeros_per_row = (weight == 0).sum(dim=1)
            expected = weight.shape[1] // 2
            assert torch.all(zeros_per_row == expected), f"{op.name}: zeros per row {zeros_per_row.unique()}"
            if pattern == "2:4":
                assert satisfies_nm(weight, 2, 4), op.name
            checked += 1
    assert checked >= 8


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("pattern", PATTERNS)
def test_prune_save_reload(family, method, pattern, token_ids, tmp_path):
    model = tiny_model(family)
    config = _config(method, pattern)
    report = model.prune(config, calibration_data=token_ids)
    assert report.overall == pytest.approx(0.5)
    _assert_pattern(model, pattern)
    assert type(model).__name__ == type(AutoModelForCausalLM.from_config(model.config)).__name__

    probe = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(probe).logits
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    record = saved["pruning_config"]
    assert record["method"] == method and record["pattern"] == pattern
    assert record["measured_sparsity"]["overall"] == pytest.approx(0.5)
    assert saved["architectures"] == [type(model).__name__]
    assert not list((tmp_path / "out").glob("*.bin"))
    assert not [p for p in (tmp_path).iterdir() if p.name.startswith(".")], "staging folder left behind"

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(plain(probe).logits, expected)
    assert not any("_orig" in name or "mask" in name for name in plain.state_dict())

    reloaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.is_pruned
    assert reloaded.pruning_config == config
    assert PruningConfig.from_dict(json.loads(config.to_json_string())) == config
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, expected)


@pytest.mark.parametrize("pattern", ["4:8", "unstructured"])
def test_other_patterns_and_sparsities(pattern, token_ids):
    model = tiny_model("llama")
    sparsity = 0.7 if pattern == "unstructured" else None
    model.prune(WandaConfig(sparsity=sparsity, pattern=pattern, device="cpu"), calibration_data=token_ids)
    layout = DecoderLayout(model)
    for op in layout.operators(0) + layout.operators(1):
        weight = op.read_weight()
        if pattern == "4:8":
            assert satisfies_nm(weight, 4, 8)
        else:
            assert torch.all((weight == 0).sum(dim=1) == int(0.7 * weight.shape[1]))


def test_targets_limit_what_is_pruned(token_ids):
    model = tiny_model("llama")
    model.prune(WandaConfig(sparsity=0.5, targets=["mlp.*"], device="cpu"), calibration_data=token_ids)
    report = model.pruning_report()
    for name, sparsity in report.per_module.items():
        assert sparsity == (0.5 if ".mlp." in name else 0.0), name
    assert float((model.lm_head.weight == 0).float().mean()) == 0.0
    assert float((model.get_input_embeddings().weight == 0).float().mean()) == 0.0


def test_two_pass_batches_match_sparsity(token_ids):
    model = tiny_model("qwen2")
    model.prune(SparseGPTConfig(sparsity=0.5, batch_size=3, device="cpu"), calibration_data=token_ids)
    _assert_pattern(model, "unstructured")


def test_owl_gives_non_uniform_layers_averaging_target(token_ids):
    model = tiny_model("llama")
    model.prune(WandaConfig(sparsity=0.5, owl=True, device="cpu"), calibration_data=token_ids)
    record = model.config.pruning_config
    layer_sparsity = record["layer_sparsity"]
    assert sum(layer_sparsity) / len(layer_sparsity) == pytest.approx(0.5, abs=1e-6)
    measured = record["measured_sparsity"]["per_layer"]
    assert layer_sparsity[0] != layer_sparsity[1]
    # each row prunes floor(sparsity * width) weights, so a 64-wide row can fall 1/64 short
    assert measured == pytest.approx(layer_sparsity, abs=1 / 64 + 1e-6)
