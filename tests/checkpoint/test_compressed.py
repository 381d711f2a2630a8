"""Compressed checkpoints (values + bitmask): bit-exact round trips, size, atomicity, loud failures."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers
from tiny_models import VOCAB, tiny_model

import hf_prune.checkpoint.compressed as compressed_module
from hf_prune import AutoPrunedModelForCausalLM, L1NormStructuredConfig, MagnitudeConfig
from hf_prune.checkpoint.compressed import (
    CompressedCheckpointError,
    checkpoint_bytes,
    compress_tensor,
    decompress_tensor,
    pack_bits,
    unpack_bits,
)


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_exact(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    want, got = expected.state_dict(), actual.state_dict()
    assert set(want) == set(got)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(_bytes(got[name]), _bytes(tensor)), f"{name} differs after the round trip"


def test_bit_packing_matches_numpy_little_order():
    mask = torch.rand(1003, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == 126
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), bitorder="little"))
    assert torch.equal(unpack_bits(packed, mask.numel()), mask)


def test_tensor_round_trip_keeps_negative_zero_and_nan():
    weight = torch.tensor([[0.0, -0.0, 1.5, float("nan")], [0.0, 0.0, -2.0, 0.0]], dtype=torch.float16)
    values, packed, shape = compress_tensor(weight)
    assert values.numel() == 4 and shape.tolist() == [2, 4]  # -0.0 and NaN are stored, +0.0 is not
    assert torch.equal(_bytes(decompress_tensor(values, packed, shape)), _bytes(weight))
    with pytest.raises(CompressedCheckpointError, match="damaged"):
        decompress_tensor(values[:-1], packed, shape)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, family, pattern, dtype):
    model = tiny_model(family).to(dtype)
    model.prune(MagnitudeConfig(sparsity=0.5, pattern=pattern))
    op = "model.layers.0.mlp.down_proj" if family == "llama" else "transformer.h.0.mlp.c_proj"
    weight = model.get_submodule(op).weight.data
    weight.view(-1)[(weight.view(-1) == 0).nonzero()[0]] = -0.0  # a negative zero must come back negative
    model.save_pretrained(tmp_path / "c", compressed=True, model_card=False)

    files = sorted(os.listdir(tmp_path / "c"))
    assert "compressed.safetensors" in files and not any(f.startswith("model") for f in files)
    record = json.loads((tmp_path / "c" / "config.json").read_text())["pruning_config"]
    layout = record["compressed"]
    assert layout["format"] == "bitmask" and layout["files"] == {"compressed.safetensors": "model.safetensors"}
    assert layout["compressed_tensors"] >= 2 * 6  # every pruned operator of both layers

    loaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "c")
    assert loaded.dtype == dtype
    assert_bit_exact(model, loaded)
    assert "compressed" not in loaded.config.pruning_config  # a later dense save must not claim compression
    assert str(loaded.name_or_path) == str(tmp_path / "c")
    # same outputs as the same model saved dense and reloaded (a cast model's rotary buffers differ from fresh ones)
    model.save_pretrained(tmp_path / "dense", model_card=False)
    dense = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "dense")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, loaded(ids).logits)


def test_sharded_checkpoint_round_trip_and_dense_resave(tmp_path):
    model = tiny_model("qwen2").to(torch.float16)
    model.prune(MagnitudeConfig(sparsity=0.6))
    model.save_pretrained(tmp_path / "c", compressed=True, max_shard_size="40KB", model_card=False)
    files = sorted(os.listdir(tmp_path / "c"))
    shards = [f for f in files if f.startswith("compressed-") and f.endswith(".safetensors")]
    assert len(shards) > 1 and "compressed.safetensors.index.json" in files
    assert not any(f.startswith("model") for f in files)
    loaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "c")
    assert_bit_exact(model, loaded)

    loaded.save_pretrained(tmp_path / "dense", model_card=False)  # dense again: plain transformers reads it
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert "compressed" not in plain.config.pruning_config
    assert_bit_exact(model, plain)


def test_file_size_at_half_sparsity_fp16(tmp_path):
    """50% unstructured fp16: compressed files at most 0.6x the dense files (weights dominate the headers)."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoPrunedModelForCausalLM.from_config(config).to(torch.float16).eval()
    model.prune(MagnitudeConfig(sparsity=0.5))
    model.save_pretrained(tmp_path / "dense", model_card=False)
    model.save_pretrained(tmp_path / "c", compressed=True, model_card=False)
    ratio = checkpoint_bytes(tmp_path / "c") / checkpoint_bytes(tmp_path / "dense")
    layout = json.loads((tmp_path / "c" / "config.json").read_text())["pruning_config"]["compressed"]
    pruned = layout["compressed_tensor_bytes"]
    print(f"compressed/dense file size {ratio:.4f}; pruned weights {pruned['stored'] / pruned['dense']:.4f}")
    assert ratio <= 0.6
    assert pruned["stored"] / pruned["dense"] <= 0.5 + 1 / 16 + 1e-3  # half the values plus one bit per weight
    assert_bit_exact(model, AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "c"))


def test_plain_transformers_refuses_compressed_checkpoint(tmp_path):
    model = tiny_model("llama")
    model.prune(MagnitudeConfig(sparsity=0.5))
    model.save_pretrained(tmp_path / "c", compressed=True, model_card=False)
    with pytest.raises(OSError, match="model.safetensors"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c")


def test_structured_model_saved_compressed_reloads(tmp_path):
    model = tiny_model("llama")
    model.prune(L1NormStructuredConfig(amount=0.5, device="cpu"))
    model.save_pretrained(tmp_path / "shrunk", compressed=True, model_card=False)
    reloaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "shrunk")
    assert reloaded.model.layers[0].mlp.down_proj.in_features == 64
    assert_bit_exact(model, reloaded)

    model.prune(MagnitudeConfig(sparsity=0.5))  # unstructured on top of the shrunk layers: now compressible
    model.save_pretrained(tmp_path / "both", compressed=True, model_card=False)
    layout = json.loads((tmp_path / "both" / "config.json").read_text())["pruning_config"]["compressed"]
    assert layout["compressed_tensors"] > 0
    assert_bit_exact(model, AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "both"))


def test_failed_compression_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama")
    model.prune(MagnitudeConfig(sparsity=0.5))

    def broken(tensor):
        raise OSError("disk full")

    monkeypatch.setattr(compressed_module, "compress_tensor", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "out", compressed=True, model_card=False)
    assert os.listdir(tmp_path) == []


def test_compressed_save_needs_a_pruned_model_and_never_overwrites_source(tmp_path):
    with pytest.raises(ValueError, match="prune first"):
        tiny_model("llama").save_pretrained(tmp_path / "x", compressed=True)
    model = tiny_model("llama")
    model.prune(MagnitudeConfig(sparsity=0.5))
    model.save_pretrained(tmp_path / "c", compressed=True, model_card=False)
    loaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match="refusing to save"):
        loaded.save_pretrained(tmp_path / "c", compressed=True)


def test_card_of_a_compressed_checkpoint_counts_dense_parameters_and_names_the_loader(tmp_path):
    from hf_prune.card.facts import read_checkpoint

    model = tiny_model("llama")
    model.prune(MagnitudeConfig(sparsity=0.5))
    model.save_pretrained(tmp_path / "dense")
    model.save_pretrained(tmp_path / "c", compressed=True)
    dense, packed = read_checkpoint(tmp_path / "dense"), read_checkpoint(tmp_path / "c")
    assert packed.parameters == dense.parameters
    assert packed.weight_bytes < dense.weight_bytes
    card = (tmp_path / "c" / "README.md").read_text()
    assert "plain `AutoModelForCausalLM` finds no `model.safetensors`" in card
    assert "AutoPrunedModelForCausalLM.from_pretrained" in card
    assert "do not shrink" not in card and "do not shrink" in (tmp_path / "dense" / "README.md").read_text()
