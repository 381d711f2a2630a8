"""Structured pruning machinery: physical removal, recorded shapes, reload, methods on top."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from hf_prune import (
    ActivationNormStructuredConfig,
    AutoPrunedModelForCausalLM,
    L1NormStructuredConfig,
    LLMRankConfig,
    PruningConfig,
    SparseGPTConfig,
    StructureMismatchError,
    WandaConfig,
)
from hf_prune.checkpoint.record import verify_record
from hf_prune.methods.patterns import satisfies_nm
from hf_prune.methods.structured.base import kept_count
from hf_prune.report import count_parameters
from hf_prune.surgery import layer_sizes, shrink_attention, shrink_mlp, structure_report
from hf_prune.surgery.geometry import mlp_input_magnitude, operator
from hf_prune.walker.layout import DecoderLayout

PROBE = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))


def _logits(model, ids=PROBE):
    with torch.no_grad():
        return model(ids).logits


def _weights_bytes(directory) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


@pytest.mark.parametrize("family", FAMILIES)
def test_shrink_save_reload_every_family(family, token_ids, tmp_path):
    """Layer 0 loses every neuron and head by hand, LLM-Rank then prunes layer 1; all reloads exactly."""
    model = tiny_model(family)
    layout = DecoderLayout(model)
    dense_params = count_parameters(model)
    dense = layer_sizes(layout, 1)
    model.save_pretrained(tmp_path / "dense")

    shrink_mlp(layout, 0, [])
    shrink_attention(layout, 0, [])
    model.prune(LLMRankConfig(amount=0.25, heads=True, head_amount=0.5, device="cpu"), calibration_data=token_ids)

    first, second = layer_sizes(layout, 0), layer_sizes(layout, 1)
    assert (first.mlp_neurons, first.attention_heads, first.kv_heads) == (0, 0, 0)
    assert second.mlp_neurons == kept_count(dense.mlp_neurons, 0.25, 8)
    assert second.kv_heads == dense.kv_heads // 2
    assert second.attention_heads == dense.attention_heads // 2
    for op in layout.operators(0):  # every operator of layer 0 lost all its neurons or heads
        assert op.module.weight.numel() == 0, op.name

    record = model.config.pruning_config
    structure = record["structure"]
    assert structure["mlp_neurons"] == [0, second.mlp_neurons]
    assert structure["attention_heads"] == [0, second.attention_heads]
    assert structure["kv_heads"] == [0, second.kv_heads]
    assert structure["parameters_after"] == count_parameters(model) < dense_params
    assert record["sparsity"] == record["amount"] == 0.25

    expected = _logits(model)
    assert torch.isfinite(expected).all()
    generated = model.generate(PROBE[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    model.save_pretrained(tmp_path / "pruned")
    assert _weights_bytes(tmp_path / "pruned") < _weights_bytes(tmp_path / "dense")
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert saved["pruning_config"]["structure"] == structure

    reloaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert torch.equal(_logits(reloaded), expected)
    assert torch.equal(reloaded.generate(PROBE[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False), generated)
    assert count_parameters(reloaded) == count_parameters(model)
    assert isinstance(reloaded.pruning_config, LLMRankConfig)

    # plain transformers builds full-size layers and refuses the smaller weights
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")


def test_parameter_count_and_rounding(token_ids):
    model = tiny_model("llama")
    before = count_parameters(model)
    model.prune(LLMRankConfig(amount=0.3, round_to=1, device="cpu"), calibration_data=token_ids)
    # 128 * 0.7 = 89.6 -> 90 kept; each neuron is a gate row, an up row and a down column of width 64
    assert [layer_sizes(DecoderLayout(model), i).mlp_neurons for i in range(2)] == [90, 90]
    assert count_parameters(model) == before - 2 * 38 * 3 * 64
    report = structure_report(model)
    assert report.parameters_before == before and report.parameters_after == count_parameters(model)
    assert "90/128" in str(report)

    model = tiny_model("llama")
    model.prune(LLMRankConfig(amount=0.3, device="cpu"), calibration_data=token_ids)
    assert layer_sizes(DecoderLayout(model), 0).mlp_neurons == 88  # nearest multiple of round_to=8


def test_kept_count():
    assert kept_count(1536, 0.3, 8) == 1072
    assert kept_count(1536, 0.1, 8) == 1384
    assert kept_count(128, 0.0, 8) == 128
    assert kept_count(12, 0.5, 8) == 8
    assert kept_count(8, 0.6, 8) == 0
    assert kept_count(0, 0.5, 8) == 0


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_nm_and_unstructured_after_structured(family, token_ids, tmp_path):
    model = tiny_model(family)
    model.prune(ActivationNormStructuredConfig(amount=0.3, heads=True, head_amount=0.5, device="cpu"),
                calibration_data=token_ids)
    layout = DecoderLayout(model)
    widths = [op.in_features for i in range(len(layout)) for op in layout.operators(i)]
    assert all(w % 4 == 0 for w in widths), widths
    structure = model.config.pruning_config["structure"]

    model.prune(WandaConfig(pattern="2:4", sparsity=None, device="cpu"), calibration_data=token_ids)
    for index in range(len(layout)):
        for op in layout.operators(index):
            assert satisfies_nm(op.read_weight(), 2, 4), op.name
    record = model.config.pruning_config
    assert record["pattern"] == "2:4" and record["structure"]["mlp_neurons"] == structure["mlp_neurons"]
    assert record["previous"][0]["method"] == "activation-norm-structured"
    expected = _logits(model)
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(_logits(reloaded), expected)
    assert isinstance(reloaded.pruning_config, WandaConfig)

    other = tiny_model(family)
    other.prune(L1NormStructuredConfig(amount=0.5, device="cpu"))
    report = other.prune(SparseGPTConfig(sparsity=0.5, device="cpu"), calibration_data=token_ids)
    assert report.overall == pytest.approx(0.5)


def test_l1_norm_keeps_largest_rows():
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    model.prune(L1NormStructuredConfig(amount=0.5, device="cpu"))  # needs no calibration data
    layout, dense_layout = DecoderLayout(model), DecoderLayout(dense)
    for index in range(len(layout)):
        norms = mlp_input_magnitude(dense_layout, index).sum(dim=1)
        keep = torch.topk(norms, 64).indices.sort().values
        gate = operator(layout, index, "mlp.gate_proj").read_weight()
        down = operator(layout, index, "mlp.down_proj").read_weight()
        assert torch.equal(gate, operator(dense_layout, index, "mlp.gate_proj").read_weight()[keep])
        assert torch.equal(down, operator(dense_layout, index, "mlp.down_proj").read_weight()[:, keep])


def test_activation_norm_keeps_strongest_neurons(token_ids):
    model = tiny_model("qwen2")
    dense = copy.deepcopy(model)
    squares = {}
    down = DecoderLayout(dense).layers[0].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda m, a: squares.setdefault("x", a[0].flatten(0, 1).square().sum(0)))
    with torch.no_grad():
        dense(token_ids)
    handle.remove()
    keep = torch.topk(squares["x"], 64).indices.sort().values
    model.prune(ActivationNormStructuredConfig(amount=0.5, device="cpu"), calibration_data=token_ids)
    pruned_up = DecoderLayout(model).layers[0].mlp.up_proj
    assert torch.equal(pruned_up.weight, DecoderLayout(dense).layers[0].mlp.up_proj.weight[keep])


def test_our_loader_names_itself_on_shape_mismatch(token_ids, tmp_path):
    model = tiny_model("llama")
    model.prune(L1NormStructuredConfig(amount=0.5, device="cpu"))
    model.save_pretrained(tmp_path / "out")
    dense_config = AutoConfig.from_pretrained(tmp_path / "out")  # uniform sizes: the saved config has them
    del dense_config.pruning_config
    dense_config.intermediate_size = 128  # a config with the dense sizes and no record
    with pytest.raises(StructureMismatchError, match="AutoPrunedModelForCausalLM"):
        AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out", config=dense_config)

    config_path = tmp_path / "out" / "config.json"
    saved = json.loads(config_path.read_text())
    saved["pruning_config"]["structure"]["mlp_neurons"] = [72, 64]
    config_path.write_text(json.dumps(saved))
    with pytest.raises(StructureMismatchError, match="AutoPrunedModelForCausalLM"):
        AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out")
    saved["pruning_config"]["structure"]["mlp_neurons"] = [64, 999]
    config_path.write_text(json.dumps(saved))
    with pytest.raises(StructureMismatchError, match="cannot hold"):
        AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out")
    saved["pruning_config"]["structure"]["mlp_neurons"] = "64"
    config_path.write_text(json.dumps(saved))
    with pytest.raises(StructureMismatchError, match="non-negative integers"):
        AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out")


def test_record_check_sees_changed_shapes(token_ids):
    model = tiny_model("gpt_neox")
    model.prune(LLMRankConfig(amount=0.25, device="cpu"), calibration_data=token_ids)
    verify_record(model, model.config.pruning_config, "memory")
    shrink_mlp(DecoderLayout(model), 1, range(10))
    with pytest.raises(StructureMismatchError, match="mlp_neurons"):
        verify_record(model, model.config.pruning_config, "memory")


def test_structured_config_fields():
    config = LLMRankConfig(amount=0.2)
    assert config.sparsity == 0.2 and config.pattern == "unstructured" and config.scope == "chained"
    assert (config.gamma, config.theta, config.heads, config.round_to) == ("auto", 0.5, False, 8)
    assert config.score == "centrality"
    assert LLMRankConfig(sparsity=0.4).amount == 0.4
    assert PruningConfig.from_dict(json.loads(config.to_json_string())) == config
    assert PruningConfig.from_dict({"method": "l1-norm-structured", "amount": 0.1}).needs_calibration is False
    bad = [
        dict(amount=0.2, sparsity=0.3),
        dict(amount=1.0),
        dict(amount=0.2, pattern="2:4"),
        dict(amount=0.2, targets=["mlp.*"]),
        dict(amount=0.2, owl=True),
        dict(amount=0.2, round_to=0),
        dict(amount=0.2, head_amount=1.5),
        dict(amount=0.2, scope="global"),
        dict(amount=0.2, gamma=1.5),
        dict(amount=0.2, theta=-0.1),
        dict(amount=0.2, score="loss"),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            LLMRankConfig(**kwargs)
