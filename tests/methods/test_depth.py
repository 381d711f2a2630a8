"""Depth pruning: whole decoder layers removed, chosen on calibration data; standard checkpoints."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import HYBRID_FAMILIES, MOE_FAMILIES, VOCAB, MissingFamily, tiny_model
from transformers import AutoModelForCausalLM

from hf_prune import (
    AutoPrunedModelForCausalLM,
    DepthConfig,
    L1NormStructuredConfig,
    PruningConfig,
    UnsupportedArchitectureError,
)
from hf_prune.checkpoint.standard_config import saved_config_is_standard
from hf_prune.engine.forward import bypassed_layers
from hf_prune.methods.depth import SCORES, best_block
from hf_prune.surgery import structure_report
from hf_prune.surgery.layers import remove_layers
from hf_prune.walker.layout import DecoderLayout

PROBE = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
FAMILIES = ["llama", "qwen3", "gemma3", "phi3", "gpt2", "opt"]


def _logits(model, ids=PROBE):
    with torch.no_grad():
        return model(ids).logits


def _bypassed_logits(model, removed):
    with bypassed_layers(DecoderLayout(model).layers, removed):
        return _logits(model)


def _make_identity(model, index):
    """Zero the projections that write layer ``index``'s attention and MLP into the residual stream."""
    layout = DecoderLayout(model)
    for name in (layout.spec.o, layout.spec.mlp_out):
        module = layout.submodule(index, name)
        module.weight.data.zero_()
        if getattr(module, "bias", None) is not None:
            module.bias.data.zero_()


@pytest.mark.parametrize("family", FAMILIES)
def test_depth_pruned_checkpoint_loads_with_plain_transformers(family, token_ids, tmp_path):
    model = tiny_model(family, layers=4)
    dense = copy.deepcopy(model)
    model.prune(DepthConfig(num_layers=2, device="cpu"), calibration_data=token_ids)
    structure = model.config.pruning_config["structure"]
    kept = structure["kept_layers"]
    removed = [i for i in range(4) if i not in kept]
    assert len(kept) == 2 and len(DecoderLayout(model)) == 2 and model.config.num_hidden_layers == 2
    expected = _logits(model)
    assert torch.allclose(expected, _bypassed_logits(dense, removed), atol=1e-5)  # same as skipping them
    generated = model.generate(PROBE[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False)

    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved.get("num_hidden_layers", saved.get("n_layer")) == 2
    assert saved_config_is_standard(saved)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(_logits(plain), expected)
    assert torch.equal(plain.generate(PROBE[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False), generated)
    ours = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(_logits(ours), expected)
    assert "decoder layers: 2 of 4" in str(structure_report(ours))


@pytest.mark.parametrize("family", sorted(set(MOE_FAMILIES) | set(HYBRID_FAMILIES)))
def test_depth_on_mixtures_of_experts_and_hybrids_stays_standard(family, token_ids, tmp_path):
    try:
        model = tiny_model(family, layers=4)
    except MissingFamily as err:
        pytest.skip(str(err))
    dense = copy.deepcopy(model)
    report = model.prune(DepthConfig(num_layers=1, device="cpu"), calibration_data=token_ids)
    assert report.summary().startswith("removed 1 of 4 layers; parameters")
    structure = model.config.pruning_config["structure"]
    removed = [i for i in range(4) if i not in structure["kept_layers"]]
    assert len(removed) == 1 and model.config.num_hidden_layers == 3
    if family in MOE_FAMILIES:
        assert len(structure["expert_neurons"]) == 3 and len(structure["dense"]["expert_neurons"]) == 4
    expected = _logits(model)
    torch.testing.assert_close(_bypassed_logits(dense, removed), expected, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "out", model_card=False)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert plain.config.num_hidden_layers == 3
    torch.testing.assert_close(_logits(plain), expected, rtol=0, atol=1e-6)
    ours = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(ours), expected, rtol=0, atol=1e-6)
    assert "decoder layers: 3 of 4" in str(structure_report(ours))


@pytest.mark.parametrize("score", SCORES)
def test_every_score_finds_layers_that_do_nothing(score, token_ids):
    """Layers 1 and 2 write nothing to the residual stream: each score must pick exactly them."""
    model = tiny_model("llama", layers=5)
    for index in (1, 2):
        _make_identity(model, index)
    dense = copy.deepcopy(model)
    model.prune(DepthConfig(num_layers=2, score=score, device="cpu"), calibration_data=token_ids)
    assert model.config.pruning_config["structure"]["kept_layers"] == [0, 3, 4]
    assert torch.allclose(_logits(model), _logits(dense), atol=1e-5)


def test_angular_block_is_the_closest_contiguous_block():
    torch.manual_seed(0)
    states = [torch.randn(32, 8) for _ in range(6)]
    states[4] = states[2] + 0.01 * torch.randn(32, 8)  # layers 2 and 3 together change almost nothing
    start, distances = best_block(states, 2)
    assert start == 2 and len(distances) == 4 and distances[2] == min(distances)


def test_remove_layers_updates_per_layer_config():
    model = tiny_model("gemma3", layers=4)  # sliding, full, sliding, full
    dense = copy.deepcopy(model)
    assert remove_layers(DecoderLayout(model), [1, 2]) == [1, 2]
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.layer_idx for layer in DecoderLayout(model).layers] == [0, 1]
    long_probe = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(2))  # > sliding window 8
    assert torch.allclose(_logits(model, long_probe), _bypassed_logits_for(dense, [0, 3], long_probe), atol=1e-5)

    qwen = tiny_model("qwen3", layers=4)
    qwen.config.max_window_layers = 3
    qwen.config.mlp_only_layers = [0, 2, 3]
    remove_layers(DecoderLayout(qwen), [0, 1, 3])
    assert (qwen.config.max_window_layers, qwen.config.mlp_only_layers) == (2, [0, 2])
    assert len(qwen.config.layer_types) == 3


def _bypassed_logits_for(model, removed, ids):
    with bypassed_layers(DecoderLayout(model).layers, removed):
        return _logits(model, ids)


def test_layers_that_depend_on_their_index_are_refused():
    model = tiny_model("gpt2", layers=3)
    model.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(UnsupportedArchitectureError, match="scale_attn_by_inverse_layer_idx"):
        remove_layers(DecoderLayout(model), [0, 2])
    assert len(DecoderLayout(model)) == 3


def test_depth_and_width_together_stay_standard(token_ids, tmp_path):
    model = tiny_model("llama", layers=4)
    model.prune(DepthConfig(amount=0.25, score="block-influence", device="cpu"), calibration_data=token_ids)
    model.prune(L1NormStructuredConfig(amount=0.5, heads=True, device="cpu"))
    structure = model.config.pruning_config["structure"]
    assert len(structure["kept_layers"]) == 3 and structure["mlp_neurons"] == [64] * 3
    assert structure["dense"]["mlp_neurons"] == [128] * 4
    # the dropped layer is named once; neurons and heads are counted in the three layers left
    assert model.pruning_report().summary().startswith(
        "removed 1 of 4 layers, and in the 3 left 50.0% of MLP neurons (192 of 384), 6 of 12 attention heads")
    expected = _logits(model)
    model.save_pretrained(tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    sizes = (plain.config.num_hidden_layers, plain.config.intermediate_size, plain.config.num_key_value_heads)
    assert sizes == (3, 64, 1)
    assert torch.equal(_logits(plain), expected)


def test_config_validation_and_round_trip():
    assert DepthConfig().amount == 0.25 and DepthConfig().sparsity == 0.25
    assert DepthConfig(amount=0.3).layers_to_remove(30) == 9
    assert DepthConfig(num_layers=4).layers_to_remove(30) == 4
    for config in (DepthConfig(amount=0.3, score="skip-kl"), DepthConfig(num_layers=3)):
        assert PruningConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="not both"):
        DepthConfig(amount=0.3, num_layers=2)
    with pytest.raises(ValueError, match="amount must be in"):
        DepthConfig(amount=1.0)
    with pytest.raises(ValueError, match="score must be one of"):
        DepthConfig(score="cosine")
    with pytest.raises(ValueError, match="pattern"):
        DepthConfig(pattern="2:4")
    with pytest.raises(ValueError, match="leave none"):
        DepthConfig(num_layers=4).layers_to_remove(4)
