"""One-pass pruning with attention and MLP run in chunks gives the result of running them whole."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import FAMILIES, tiny_model

import hf_prune.engine.chunking as block_chunking
import hf_prune.engine.layer_pass as layer_pass
from hf_prune import SparseGPTConfig, WandaConfig
from hf_prune.walker.layout import DecoderLayout


@contextlib.contextmanager
def _whole_blocks(*args, **kwargs):
    yield


def _first_input(layout: DecoderLayout, kind: str) -> str:
    spec = layout.spec
    return spec.mlp_in[0] if kind == "mlp" else (spec.qkv or spec.q)


def _prune(family: str, config, token_ids, monkeypatch, chunked: bool):
    """Prune a tiny model; also return the most tokens its first attention and MLP projections
    (and RMSNorms, where it has them) saw at once."""
    model = tiny_model(family)
    seq = token_ids.shape[1]
    monkeypatch.setattr(block_chunking, "CHUNK_TOKENS", 2 * seq)  # at most 2 samples per chunk
    monkeypatch.setattr(block_chunking, "CPU_CHUNK_BYTES", 2 * seq * model.config.hidden_size * 4)
    if not chunked:
        monkeypatch.setattr(layer_pass, "chunked_blocks", _whole_blocks)
    layout = DecoderLayout(model)
    largest: dict[str, list[int]] = {"attention": [], "mlp": []}
    modules = {kind: layout.submodule(0, _first_input(layout, kind)) for kind in largest}
    norms = [child for child in layout.layers[0].children() if type(child).__name__.endswith("RMSNorm")]
    if norms:  # a norm's chunks bypass its hooks: record the calls of its class's forward
        seen_by_norms = largest["norm"] = []
        norm_forward = type(norms[0]).forward

        def recording_forward(self, x, *args, **kwargs):
            seen_by_norms.append(x.shape[:2].numel())  # (samples, tokens, ...): qwen3 also norms per head
            return norm_forward(self, x, *args, **kwargs)

        monkeypatch.setattr(type(norms[0]), "forward", recording_forward)
    handles = [
        modules[kind].register_forward_pre_hook(
            lambda module, inputs, seen=seen: seen.append(inputs[0].shape[:-1].numel()))
        for kind, seen in largest.items() if kind != "norm"
    ]
    model.prune(config, calibration_data=token_ids)
    for handle in handles:
        handle.remove()
    return model, {kind: max(seen) for kind, seen in largest.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_chunked_blocks_prune_like_whole_blocks(family, method, token_ids, monkeypatch):
    make = {"wanda": WandaConfig, "sparsegpt": SparseGPTConfig}[method]
    config = make(sparsity=0.5, device="cpu")
    chunked, chunked_batch = _prune(family, config, token_ids, monkeypatch, chunked=True)
    monkeypatch.undo()
    whole, whole_batch = _prune(family, config, token_ids, monkeypatch, chunked=False)
    tokens, seq = token_ids.numel(), token_ids.shape[1]
    assert set(whole_batch.values()) == {tokens}
    inline_mlp = "." not in DecoderLayout(whole).spec.mlp_out  # OPT: fc1/fc2 inline in the layer
    if inline_mlp:
        assert chunked_batch.pop("mlp") == tokens
    assert all(seq <= seen <= 2 * seq for seen in chunked_batch.values()), chunked_batch
    assert ("norm" in chunked_batch) == (family not in ("opt", "gpt2", "gpt_neox"))  # LayerNorm families
    chunked_state, whole_state = chunked.state_dict(), whole.state_dict()
    for name, weight in whole_state.items():
        assert torch.equal(chunked_state[name] == 0, weight == 0), f"{name}: different mask"
        torch.testing.assert_close(chunked_state[name], weight, rtol=1e-4, atol=1e-5, msg=name)
    probe = token_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(chunked(probe).logits, whole(probe).logits, rtol=1e-4, atol=1e-4)


def test_cpu_chunks_fit_the_byte_budget(token_ids, monkeypatch):
    """On the CPU a chunk's widest temporary stays within ``CPU_CHUNK_BYTES`` (whole samples)."""
    seq = token_ids.shape[1]
    model = tiny_model("llama")  # hidden 64, intermediate 128
    layout = DecoderLayout(model)
    monkeypatch.setattr(block_chunking, "CPU_CHUNK_BYTES", 3 * seq * 128 * 4)  # 3 samples of MLP activations
    seen: dict[str, list[int]] = {"mlp": [], "attention": []}
    for kind, name in (("mlp", layout.spec.mlp_out), ("attention", layout.spec.o)):
        layout.submodule(0, name).register_forward_pre_hook(
            lambda module, inputs, seen=seen[kind]: seen.append(inputs[0].shape[0]))
    model.prune(WandaConfig(sparsity=0.5, device="cpu"), calibration_data=token_ids)
    # first one sample probes that the block returns its output projection's output, then the chunks
    assert seen["mlp"] == [1, 3, 3, 2]  # 8 samples, 3 per chunk: the MLP is 128 wide
    assert seen["attention"] == [1, 6, 2]  # the attention is 64 wide: twice the samples per chunk


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_block_that_scales_its_output_runs_whole(method, token_ids, monkeypatch):
    """Falcon-H1's MLP multiplies its down projection's output: chunking it would drop the factor."""
    make = {"wanda": WandaConfig, "sparsegpt": SparseGPTConfig}[method]
    results = []
    for chunked in (True, False):
        monkeypatch.undo()
        if not chunked:
            monkeypatch.setattr(layer_pass, "chunked_blocks", _whole_blocks)
        model = tiny_model("falcon_h1")
        for layer in DecoderLayout(model).layers:
            layer.feed_forward.gate_multiplier, layer.feed_forward.down_multiplier = 1.5, 0.5
        model.prune(make(sparsity=0.5, device="cpu"), calibration_data=token_ids)
        results.append(model)
    chunked_state, whole_state = results[0].state_dict(), results[1].state_dict()
    for name, weight in whole_state.items():
        torch.testing.assert_close(chunked_state[name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_batched_statistics_do_not_chunk(token_ids, monkeypatch):
    """With ``batch_size`` set the run is two-pass and the blocks run as transformers wrote them."""
    model, largest = _prune("llama", WandaConfig(sparsity=0.5, device="cpu", batch_size=4), token_ids, monkeypatch,
                            chunked=True)
    assert largest == {"attention": 4 * token_ids.shape[1], "mlp": 4 * token_ids.shape[1],
                       "norm": 4 * token_ids.shape[1]}


def test_only_per_sample_arguments_are_split():
    """Tensors with one row per sample are cut to the chunk; shared ones (positions, 1-D) pass whole."""
    samples = 4
    hidden = torch.randn(samples, 3, 8)
    cos = torch.randn(1, 3, 2)
    cache_position = torch.arange(samples)  # 1-D, even when its length equals the sample count
    mask = torch.zeros(samples, 1, 3, 3)
    call = {"hidden_states": hidden, "position_embeddings": (cos, cos), "cache_position": cache_position,
            "attention_mask": mask, "use_cache": False, "past_key_values": None}
    assert block_chunking._splittable(tuple(call.values()))
    part = block_chunking._take_samples(call, samples, 1, 3)
    assert torch.equal(part["hidden_states"], hidden[1:3]) and torch.equal(part["attention_mask"], mask[1:3])
    assert part["position_embeddings"][0] is cos and part["cache_position"] is cache_position
    assert part["use_cache"] is False and part["past_key_values"] is None


def test_a_kv_cache_keeps_the_block_whole():
    from transformers import DynamicCache

    assert not block_chunking._splittable((torch.zeros(2, 2), DynamicCache()))
