"""Structured checkpoints with uniform layers load with plain transformers: sizes in the config's own fields."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tiny_models import DENSE_FAMILIES, HYBRID_FAMILIES, VOCAB, tiny_model
from transformers import AutoModelForCausalLM

from hf_prune import ActivationNormStructuredConfig, AutoPrunedModelForCausalLM, L1NormStructuredConfig
from hf_prune.checkpoint.standard_config import saved_config_is_standard, standard_export
from hf_prune.methods.structured.base import kept_groups, shardable
from hf_prune.surgery import layer_sizes, shrink_mlp
from hf_prune.walker.layout import DecoderLayout

PROBE = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))

# family -> (config keys expected in config.json, whether heads can be removed in a standard config)
EXPECTED = {
    "llama": (("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"), True),
    "qwen3": (("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"), True),
    "gemma3": (("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"), True),
    "phi3": (("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"), True),
    "gpt2": (("n_inner",), False),
    "opt": (("ffn_dim",), False),
}


def _logits(model):
    with torch.no_grad():
        return model(PROBE).logits


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_uniform_structured_checkpoint_loads_with_plain_transformers(family, token_ids, tmp_path):
    keys, heads = EXPECTED[family]
    model = tiny_model(family)
    dense_head_dim = layer_sizes(DecoderLayout(model), 0)
    model.prune(ActivationNormStructuredConfig(amount=0.4, heads=heads, head_amount=0.5, device="cpu"),
                calibration_data=token_ids)
    sizes = layer_sizes(DecoderLayout(model), 0)
    assert sizes.mlp_neurons < dense_head_dim.mlp_neurons
    assert sizes.kv_heads < dense_head_dim.kv_heads if heads else sizes.kv_heads == dense_head_dim.kv_heads
    expected = _logits(model)
    model.save_pretrained(tmp_path / "out")

    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved[keys[0]] == sizes.mlp_neurons
    if heads:
        assert saved["num_attention_heads"] == sizes.attention_heads
        assert saved["num_key_value_heads"] == sizes.kv_heads
        assert saved["head_dim"] == 16  # written out: hidden_size / heads would now be wrong
    assert saved["pruning_config"]["structure"]["mlp_neurons"] == [sizes.mlp_neurons] * 2
    assert saved_config_is_standard(saved)

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(plain).__module__.startswith("transformers.")
    assert torch.equal(_logits(plain), expected)
    ours = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(_logits(ours), expected)
    assert ours.config.pruning_config["structure"]["dense"]["mlp_neurons"] == [dense_head_dim.mlp_neurons] * 2


#: families without an entry in SIZE_FIELDS whose configs keep the MLP width under a common key (Falcon:
#: ffn_hidden_size) and the head counts as Llama does; qwen3_5_text mixes attention kinds (no structure)
GUESSED = sorted(set(DENSE_FAMILIES + HYBRID_FAMILIES) - set(EXPECTED) - {"gpt_neox", "qwen3_5_text", "gemma3"})


@pytest.mark.parametrize("family", GUESSED)
def test_families_without_a_size_table_entry_save_standard_checkpoints(family, token_ids, tmp_path):
    """Their size fields are guessed and written only when the model transformers builds from them has the
    pruned shapes; OLMo 2/3's whole-projection q/k norms lose the removed heads' entries too."""
    model = tiny_model(family).eval()
    dense = layer_sizes(DecoderLayout(model), 0)
    model.prune(ActivationNormStructuredConfig(amount=0.4, heads=True, head_amount=0.5, device="cpu"),
                calibration_data=token_ids)
    sizes = layer_sizes(DecoderLayout(model), 0)
    assert sizes.mlp_neurons < dense.mlp_neurons
    assert sizes.kv_heads < dense.kv_heads or dense.kv_heads == 1  # multi-query: one KV group, kept
    expected = _logits(model)
    model.save_pretrained(tmp_path / "out", model_card=False)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved_config_is_standard(saved)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(plain).__module__.startswith("transformers.")
    torch.testing.assert_close(_logits(plain), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_heads_of_families_that_derive_head_width_stay_in_the_record(family, tmp_path):
    """GPT-2 and OPT compute head_dim = hidden / heads: removed heads cannot be written in their configs."""
    model = tiny_model(family)
    model.prune(L1NormStructuredConfig(amount=0.5, heads=True, device="cpu"))
    export = standard_export(model)
    assert not export.standard and "head width" in export.reason
    expected = _logits(model)
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert not saved_config_is_standard(saved)
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(_logits(AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out").eval()), expected)


def test_non_uniform_layers_keep_dense_config_and_record(tmp_path):
    model = tiny_model("llama")
    model.prune(L1NormStructuredConfig(amount=0.25, device="cpu"))
    shrink_mlp(DecoderLayout(model), 0, range(40))
    model.prune(L1NormStructuredConfig(amount=0.0, device="cpu"))  # record the new shapes
    export = standard_export(model)
    assert not export.standard and "mlp_neurons" in export.reason
    expected = _logits(model)
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["intermediate_size"] == 128
    assert saved["pruning_config"]["structure"]["mlp_neurons"] == [40, 96]
    assert not saved_config_is_standard(saved)
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(_logits(AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out").eval()), expected)


def test_shardable_head_counts():
    # SmolLM2: 3 KV heads of 3 query heads; over 2 GPUs only 2 KV heads (6 query heads) split
    assert [k for k in range(1, 4) if shardable(k, 3, 2)] == [2]
    assert kept_groups(3, 3, 0.3, 2) == 2
    assert kept_groups(3, 3, 0.6, 2) == 2
    assert kept_groups(32, 1, 0.3, 8) == 24  # 22.4 -> nearest multiple of 8
    assert kept_groups(8, 4, 0.7, 4) == 2  # 2 KV heads replicated over 4 GPUs, 8 query heads split
    assert kept_groups(8, 1, 0.5, 4) == 4
    assert kept_groups(8, 1, 0.3, 1) == 6
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        kept_groups(3, 1, 0.3, 4)  # 1, 2 or 3 query heads never split over 4 GPUs


def _eight_head_llama(hidden_size: int):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=144,
                                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8, head_dim=8,
                                      max_position_embeddings=128)
    torch.manual_seed(0)
    return AutoPrunedModelForCausalLM.from_config(config).eval()


def _prune_for_three_gpus(model, token_ids):
    model.prune(ActivationNormStructuredConfig(amount=0.3, heads=True, head_amount=0.4, tensor_parallel_size=3,
                                               device="cpu"), calibration_data=token_ids)


def test_tensor_parallel_rounding_in_a_pruned_model(token_ids, tmp_path):
    model = _eight_head_llama(48)
    _prune_for_three_gpus(model, token_ids)
    sizes = {layer_sizes(DecoderLayout(model), i) for i in range(2)}
    # heads: 8 * 0.6 = 4.8 -> 5 kept, which 3 GPUs cannot split; 6 is the nearest count that they can.
    # neurons: 144 * 0.7 = 100.8, a multiple of lcm(8, 3) = 24 -> 96 (104 without the GPU count)
    assert {(s.attention_heads, s.kv_heads, s.mlp_neurons) for s in sizes} == {(6, 6, 96)}
    expected = _logits(model)
    model.save_pretrained(tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (plain.config.num_attention_heads, plain.config.intermediate_size) == (6, 96)
    assert torch.equal(_logits(plain), expected)
    with pytest.raises(ValueError, match="heads=True"):
        L1NormStructuredConfig(amount=0.3, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="positive integer"):
        L1NormStructuredConfig(amount=0.3, heads=True, tensor_parallel_size=0)


def test_head_counts_the_config_class_refuses_stay_in_the_record(token_ids, tmp_path, caplog):
    """LlamaConfig insists that hidden_size divides by num_attention_heads, even with head_dim given."""
    model = _eight_head_llama(64)
    _prune_for_three_gpus(model, token_ids)
    export = standard_export(model)
    assert not export.standard and "LlamaConfig" in export.reason
    expected = _logits(model)
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["num_attention_heads"], saved["intermediate_size"]) == (8, 144)
    assert not saved_config_is_standard(saved)
    assert torch.equal(_logits(AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out").eval()), expected)
