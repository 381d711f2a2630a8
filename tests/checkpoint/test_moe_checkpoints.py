"""Checkpoints of pruned mixture-of-experts models: compressed, verified on load, carded."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import VOCAB, tiny_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from hf_prune import AutoPrunedModelForCausalLM, PruningRecordMismatchError, WandaConfig


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_compressed_moe_checkpoint_reloads_bit_exact(family, token_ids, tmp_path):
    model = tiny_model(family)
    model.prune(WandaConfig(pattern="2:4", device="cpu"), calibration_data=token_ids)
    model.save_pretrained(tmp_path / "dense")
    model.save_pretrained(tmp_path / "compressed", compressed=True)
    layout = json.loads((tmp_path / "compressed" / "config.json").read_text())["pruning_config"]["compressed"]
    assert layout and not list((tmp_path / "compressed").glob("model*.safetensors"))
    reloaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "compressed")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    for name, tensor in plain.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    card = (tmp_path / "compressed" / "README.md").read_text()
    assert "Routed experts: 8 experts in 2 mixture-of-experts blocks" in card
    dense_files = sum(p.stat().st_size for p in (tmp_path / "dense").glob("*.safetensors"))
    compressed_files = sum(p.stat().st_size for p in (tmp_path / "compressed").glob("*.safetensors"))
    assert compressed_files < dense_files


def test_expert_zeros_filled_in_are_caught_on_load(token_ids, tmp_path):
    model = tiny_model("mixtral")
    model.prune(WandaConfig(pattern="2:4", device="cpu"), calibration_data=token_ids)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2].add_(0.01)  # one expert loses its zeros
    PreTrainedModel.save_pretrained(model, tmp_path / "changed")  # transformers' own save: no check
    with pytest.raises(PruningRecordMismatchError, match=r"model.layers.1.mlp.experts.down_proj.2"):
        AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "changed")
    probe = torch.randint(0, VOCAB, (1, 8))
    loaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "changed", verify_pruning=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe).logits, model(probe).logits, rtol=0, atol=1e-6)
