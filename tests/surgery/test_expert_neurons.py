"""Structured neuron pruning inside routed experts: same kept count per expert, standard config, reloads."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import MOE_FAMILIES, VOCAB, tiny_model
from transformers import AutoModelForCausalLM

from hf_prune import (
    ActivationNormStructuredConfig,
    AutoPrunedModelForCausalLM,
    L1NormStructuredConfig,
    LLMRankConfig,
    MutualInfoConfig,
    StructureMismatchError,
    UnsupportedArchitectureError,
    UnsupportedOperatorError,
)
from hf_prune.checkpoint.standard_config import saved_config_is_standard
from hf_prune.methods.structured.base import kept_count
from hf_prune.surgery.expert_neurons import tied_shared_expert
from hf_prune.walker.layout import DecoderLayout

PROBE = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))

#: family -> config field that holds the routed experts' width
SIZE_FIELD = {
    "mixtral": "intermediate_size", "qwen3_moe": "moe_intermediate_size", "olmoe": "intermediate_size",
    "gpt_oss": "intermediate_size", "deepseek_v3": "moe_intermediate_size", "llama4_text": "intermediate_size",
    "qwen3_next": "moe_intermediate_size", "granitemoehybrid": "intermediate_size",
}


def _logits(model):
    with torch.no_grad():
        return model(PROBE).logits


def _expert_shapes(model):
    """Per MoE layer: ({parameter: shape}, width of the shared expert tied to it or None)."""
    layout = DecoderLayout(model)
    out = {}
    for index in range(len(layout)):
        for bank in layout.expert_banks(index):
            shared = tied_shared_expert(layout, index, bank)
            out[index] = ({p.parameter: tuple(bank.stored(p.parameter).shape) for p in bank.projections},
                          [bank.weight("down_proj", e).shape[1] for e in range(bank.num_experts)],
                          shared.width if shared is not None else None)
    return out


def test_every_moe_family_is_covered():
    assert sorted(SIZE_FIELD) == sorted(MOE_FAMILIES)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_activation_norm_removes_expert_neurons_and_saves_a_standard_checkpoint(family, token_ids, tmp_path):
    model = tiny_model(family).eval()
    dense = _expert_shapes(model)
    assert dense, f"{family}: no expert banks found"
    model.prune(ActivationNormStructuredConfig(amount=0.25, device="cpu"), calibration_data=token_ids)

    width = 32
    kept = kept_count(width, 0.25, 8)
    assert kept == 24
    after = _expert_shapes(model)
    assert after.keys() == dense.keys()
    for index, (shapes, per_expert, shared) in after.items():
        assert per_expert == [kept] * len(per_expert), f"layer {index}: each expert keeps {kept} neurons"
        dense_shapes = dense[index][0]
        for name, shape in shapes.items():  # one dimension lost 1/4 (x2 for the fused gate/up), the rest as before
            changed = [(a, b) for a, b in zip(dense_shapes[name], shape) if a != b]
            assert changed in ([(width, kept)], [(2 * width, 2 * kept)]), (name, dense_shapes[name], shape)
        if shared is not None:  # DeepSeek-V3 / Llama 4: the config sizes the shared expert from the same field
            assert shared == dense[index][2] * kept // width
    expected = _logits(model)
    assert torch.isfinite(expected).all()

    structure = model.config.pruning_config["structure"]
    moe_layers = [i in after for i in range(len(DecoderLayout(model)))]
    assert structure["expert_neurons"] == [kept if moe else None for moe in moe_layers]
    assert structure["dense"]["expert_neurons"] == [width if moe else None for moe in moe_layers]
    assert structure["parameters_after"] < structure["parameters_before"]
    assert structure["parameters_after"] == sum(p.numel() for p in model.parameters()) - (
        model.get_output_embeddings().weight.numel() if model.config.tie_word_embeddings else 0)

    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved[SIZE_FIELD[family]] == kept
    assert saved_config_is_standard(saved)

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(plain).__module__.startswith("transformers.")
    torch.testing.assert_close(_logits(plain), expected, atol=1e-5, rtol=0)
    ours = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=0)
    assert ours.config.pruning_config["structure"]["expert_neurons"] == structure["expert_neurons"]

    # pruned again from the standard checkpoint, whose size field now holds 24: the new width replaces it
    ours.prune(ActivationNormStructuredConfig(amount=0.5, device="cpu"), calibration_data=token_ids)
    again = _logits(ours)
    ours.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved[SIZE_FIELD[family]] == kept_count(kept, 0.5, 8) < kept and saved_config_is_standard(saved)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    torch.testing.assert_close(_logits(plain), again, atol=1e-5, rtol=0)


def test_a_neuron_dead_on_its_experts_tokens_goes_first(token_ids):
    """Planted: neurons 0-7 of expert 1 get zero gate and up rows (activation 0 on every token); with a quarter
    removed, exactly those eight leave expert 1, while the other experts keep some of neurons 0-7."""
    model = tiny_model("qwen3_moe").eval()
    bank = DecoderLayout(model).expert_banks(0)[0]
    dead = torch.arange(8)
    with torch.no_grad():
        bank.stored("gate_up_proj")[1, bank.neuron_rows(dead)] = 0
        bank.stored("gate_up_proj")[1, bank.neuron_rows(torch.arange(8, 32))] *= 0.01  # small but alive
    before = {e: bank.weight("down_proj", e).clone() for e in range(bank.num_experts)}
    model.prune(ActivationNormStructuredConfig(amount=0.25, device="cpu"), calibration_data=token_ids)
    bank = DecoderLayout(model).expert_banks(0)[0]
    kept = {e: _kept_columns(before[e], bank.weight("down_proj", e)) for e in range(bank.num_experts)}
    assert kept[1] == list(range(8, 32))
    assert all(set(kept[e]) & set(range(8)) for e in (0, 2, 3))
    tokens = model.config.pruning_config["experts"]["banks"]["model.layers.0.mlp.experts"]["tokens"]
    assert all(t and t > 0 for t in tokens)


def _kept_columns(dense: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Which columns of the dense ``(out, in)`` weight the pruned one kept, in order."""
    return [next(j for j in range(dense.shape[1]) if torch.equal(dense[:, j], pruned[:, i]))
            for i in range(pruned.shape[1])]


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral"])
def test_l1_norm_removes_the_weakest_incoming_neurons_of_each_expert(family, tmp_path):
    model = tiny_model(family).eval()
    bank = DecoderLayout(model).expert_banks(1)[0]
    weak = {0: [3, 9, 17, 30, 1, 2, 4, 5], 2: [10, 11, 12, 13, 14, 15, 16, 31]}
    with torch.no_grad():
        for expert, neurons in weak.items():
            rows = bank.neuron_rows(torch.tensor(neurons))
            weight = bank.stored("gate_up_proj")
            if bank.layout.transposed:
                weight[expert][:, rows] *= 1e-3
            else:
                weight[expert][rows] *= 1e-3
    before = {e: bank.weight("down_proj", e).clone() for e in weak}
    model.prune(L1NormStructuredConfig(amount=0.25))
    bank = DecoderLayout(model).expert_banks(1)[0]
    for expert, neurons in weak.items():
        assert _kept_columns(before[expert], bank.weight("down_proj", expert)) == sorted(set(range(32)) - set(neurons))
    expected = _logits(model)
    model.save_pretrained(tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(plain), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", [LLMRankConfig(amount=0.25), MutualInfoConfig(amount=0.25)],
                         ids=["llm-rank", "mutual-info"])
def test_methods_without_an_expert_rule_refuse_moe_models_naming_the_alternatives(config, token_ids):
    model = tiny_model("qwen3_moe")
    with pytest.raises(UnsupportedOperatorError, match="activation-norm-structured.*expert-pruning"):
        model.prune(config, calibration_data=token_ids)


def test_heads_on_a_moe_model_are_refused(token_ids):
    with pytest.raises(UnsupportedArchitectureError, match="heads=False"):
        tiny_model("mixtral").prune(ActivationNormStructuredConfig(amount=0.25, heads=True),
                                    calibration_data=token_ids)


def test_record_that_does_not_match_the_experts_is_refused(token_ids, tmp_path):
    model = tiny_model("mixtral")
    model.prune(ActivationNormStructuredConfig(amount=0.25, device="cpu"), calibration_data=token_ids)
    model.save_pretrained(tmp_path / "out")
    path = tmp_path / "out" / "config.json"
    saved = json.loads(path.read_text())
    saved["pruning_config"]["structure"]["expert_neurons"] = [16, 16]
    path.write_text(json.dumps(saved))
    with pytest.raises(StructureMismatchError):
        AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_hf_prune_rebuilds_recorded_expert_widths_when_the_config_keeps_dense_sizes(family, token_ids, tmp_path):
    """A checkpoint whose config.json still says the dense width (e.g. written before the field was known)
    loads with AutoPrunedModelForCausalLM from the record alone: experts (transposed, with biases) and the
    tied shared expert are rebuilt at the recorded width."""
    model = tiny_model(family).eval()
    model.prune(ActivationNormStructuredConfig(amount=0.25, device="cpu"), calibration_data=token_ids)
    expected = _logits(model)
    model.save_pretrained(tmp_path / "out")
    path = tmp_path / "out" / "config.json"
    saved = json.loads(path.read_text())
    saved[SIZE_FIELD[family]] = 32
    path.write_text(json.dumps(saved))
    assert not saved_config_is_standard(saved)
    ours = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=0)
