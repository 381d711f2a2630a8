"""One-pass pruning with the MLP run in chunks gives the result of running it whole."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import FAMILIES, tiny_model

import hf_prune.engine as engine
import hf_prune.mlp_chunking as mlp_chunking
from hf_prune import SparseGPTConfig, WandaConfig
from hf_prune.architectures import DecoderLayout


@contextlib.contextmanager
def _whole_mlp(*args, **kwargs):
    yield False


def _prune(family: str, config, token_ids, monkeypatch, chunked: bool):
    model = tiny_model(family)
    monkeypatch.setattr(mlp_chunking, "CHUNK_TOKENS", 2 * token_ids.shape[1])  # 2 samples per chunk
    if not chunked:
        monkeypatch.setattr(engine, "chunked_mlp", _whole_mlp)
    layout = DecoderLayout(model)
    largest: list[int] = []
    first_in = layout.submodule(0, layout.spec.mlp_in[0])
    handle = first_in.register_forward_pre_hook(lambda module, inputs: largest.append(inputs[0].shape[:-1].numel()))
    model.prune(config, calibration_data=token_ids)
    handle.remove()
    return model, max(largest)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_chunked_mlp_prunes_like_the_whole_mlp(family, method, token_ids, monkeypatch):
    make = {"wanda": WandaConfig, "sparsegpt": SparseGPTConfig}[method]
    config = make(sparsity=0.5, device="cpu")
    chunked, chunked_batch = _prune(family, config, token_ids, monkeypatch, chunked=True)
    monkeypatch.undo()
    whole, whole_batch = _prune(family, config, token_ids, monkeypatch, chunked=False)
    tokens = token_ids.numel()
    assert whole_batch == tokens
    inline_mlp = "." not in DecoderLayout(whole).spec.mlp_out  # OPT: fc1/fc2 inline in the layer
    assert chunked_batch == (tokens if inline_mlp else 2 * token_ids.shape[1])
    chunked_state, whole_state = chunked.state_dict(), whole.state_dict()
    for name, weight in whole_state.items():
        assert torch.equal(chunked_state[name] == 0, weight == 0), f"{name}: different mask"
        torch.testing.assert_close(chunked_state[name], weight, rtol=1e-4, atol=1e-5, msg=name)
    probe = token_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(chunked(probe).logits, whole(probe).logits, rtol=1e-4, atol=1e-4)


def test_batched_statistics_do_not_chunk(token_ids, monkeypatch):
    """With ``batch_size`` set the run is two-pass and the MLP runs as transformers wrote it."""
    model, largest = _prune("llama", WandaConfig(sparsity=0.5, device="cpu", batch_size=4), token_ids, monkeypatch,
                            chunked=True)
    assert largest == 4 * token_ids.shape[1]
