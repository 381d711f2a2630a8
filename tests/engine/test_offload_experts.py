"""A mixture-of-experts model pruned under accelerate offloading equals the one pruned in memory."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from hf_prune import AutoPrunedModelForCausalLM, SparseGPTConfig, WandaConfig
from hf_prune.engine.offload import is_offloaded, materialized_bytes, read_parameter

BUDGET = 2 * 2**20  # bytes of weights on the (CPU) device; the model holds ~7 MiB


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    config = Qwen3MoeConfig(vocab_size=96, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=32, moe_intermediate_size=64, num_experts=16,
                            num_experts_per_tok=2, max_position_embeddings=128)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("moe-source")
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def _weights(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, _ in model.named_parameters():
        owner, _, attr = name.rpartition(".")
        out[name] = read_parameter(model.get_submodule(owner), attr).detach().clone()
    return out


@pytest.mark.parametrize("config", [WandaConfig(sparsity=0.5, pattern="2:4"), SparseGPTConfig(sparsity=0.5)],
                         ids=["wanda-2:4", "sparsegpt"])
def test_offloaded_experts_are_pruned_as_in_memory(source, config, tmp_path):
    ids = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))
    reference = AutoPrunedModelForCausalLM.from_pretrained(source, dtype=torch.float32, pruning_config=config,
                                                           calibration_data=ids)
    model = AutoPrunedModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, device_map="auto", max_memory={"cpu": BUDGET},
        offload_folder=str(tmp_path / "offload"))
    assert is_offloaded(model)
    assert any(where == "disk" for name, where in model.hf_device_map.items() if "layers" in name)
    resident = materialized_bytes(model)
    model.prune(config, calibration_data=ids)
    assert materialized_bytes(model) == resident  # the offloaded layers went back to their store

    expected, got = _weights(reference), _weights(model)
    for name, tensor in expected.items():
        if config.method == "wanda":
            assert torch.equal(tensor, got[name]), name
        else:  # weights read from a memory map take other CPU kernel paths: last-bit differences feed the updates
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-3, msg=name)
    assert model.config.pruning_config["experts"] == reference.config.pruning_config["experts"]
    assert model.pruning_report().per_module == reference.pruning_report().per_module

    model.save_pretrained(tmp_path / "saved", model_card=False)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, got[name]), name
