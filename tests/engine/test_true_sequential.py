"""Where a layer's later operators take their statistics: the pruned earlier operators, or the dense layer."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_model

from hf_prune import PruningConfig, SparseGPTConfig, WandaConfig
from hf_prune.errors import PruningConfigError
from hf_prune.walker.layout import DecoderLayout

ATTENTION_INPUTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def _masks(model) -> dict[str, torch.Tensor]:
    layout = DecoderLayout(model)
    return {f"{index}.{name}": (layout.layers[index].get_submodule(name).weight == 0)
            for index in range(len(layout)) for name in (*ATTENTION_INPUTS, "self_attn.o_proj", "mlp.down_proj")}


def _pruned_masks(dense, config: PruningConfig, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(dense)
    model.prune(config, calibration_data=token_ids)
    return _masks(model)


@pytest.mark.parametrize("config_cls", [WandaConfig, SparseGPTConfig])
def test_dense_statistics_match_split_batches_and_differ_after_the_first_operators(config_cls, token_ids):
    """``true_sequential=False`` calibrates the whole layer on its dense pass: the same masks as summing the
    statistics over two batches. ``True`` gives q/k/v the same masks (same inputs) but o_proj and the MLP
    other ones, since they see the pruned q/k/v."""
    dense = tiny_model("llama")
    kwargs = {"sparsity": 0.5, "device": "cpu"}
    on_dense = _pruned_masks(dense, config_cls(**kwargs, true_sequential=False), token_ids)
    split = _pruned_masks(dense, config_cls(**kwargs, batch_size=4), token_ids)
    sequential = _pruned_masks(dense, config_cls(**kwargs, true_sequential=True), token_ids)
    for name, mask in on_dense.items():
        assert torch.equal(mask, split[name]), name
    assert all(torch.equal(on_dense[f"0.{name}"], sequential[f"0.{name}"]) for name in ATTENTION_INPUTS)
    assert not torch.equal(on_dense["0.self_attn.o_proj"], sequential["0.self_attn.o_proj"])
    assert not torch.equal(on_dense["0.mlp.down_proj"], sequential["0.mlp.down_proj"])


def test_defaults_and_validation():
    assert WandaConfig().true_sequential is None
    assert WandaConfig().resolved_true_sequential is True  # unstructured: measured better on pruned inputs
    assert WandaConfig(pattern="2:4").resolved_true_sequential is False  # N:M: measured better on the dense layer
    assert WandaConfig(pattern="2:4", true_sequential=True).resolved_true_sequential is True
    assert WandaConfig(true_sequential=False).resolved_true_sequential is False
    assert WandaConfig(batch_size=4, num_samples=8).true_sequential is None  # split batches: dense statistics
    with pytest.raises(PruningConfigError, match="true_sequential=True .* batch_size=4"):
        WandaConfig(true_sequential=True, batch_size=4, num_samples=8)
    with pytest.raises(PruningConfigError, match="true_sequential"):
        WandaConfig(true_sequential="yes")
    record = WandaConfig(true_sequential=False).to_dict()
    assert PruningConfig.from_dict(record).true_sequential is False
    del record["true_sequential"]  # a record saved before the field existed still loads
    assert PruningConfig.from_dict(record).true_sequential is None


def test_wanda_n_m_calibrates_on_the_dense_layer_by_default(token_ids):
    dense = tiny_model("llama")
    default = _pruned_masks(dense, WandaConfig(pattern="2:4", device="cpu"), token_ids)
    on_dense = _pruned_masks(dense, WandaConfig(pattern="2:4", device="cpu", true_sequential=False), token_ids)
    sequential = _pruned_masks(dense, WandaConfig(pattern="2:4", device="cpu", true_sequential=True), token_ids)
    assert all(torch.equal(mask, on_dense[name]) for name, mask in default.items())
    assert not all(torch.equal(mask, sequential[name]) for name, mask in default.items())


def test_dense_layer_passes_run_few_samples_per_forward_on_cpu(token_ids, monkeypatch):
    """Calibrated on the dense layer, a layer runs twice over all samples; on the CPU each forward takes as many
    samples as keep the widest block temporary within ``CPU_CHUNK_BYTES`` (so both passes reuse heap memory), and
    the masks are those of that batch size given explicitly."""
    from hf_prune.engine import chunking
    from hf_prune.engine.chunking import dense_pass_samples

    dense = tiny_model("llama")
    width = dense.config.intermediate_size * 4  # float32 bytes per token of the widest temporary (the MLP's)
    monkeypatch.setattr(chunking, "CPU_CHUNK_BYTES", 2 * token_ids.shape[1] * width)  # two samples' worth
    layout = DecoderLayout(dense)
    hidden = torch.zeros(token_ids.shape[0], token_ids.shape[1], dense.config.hidden_size)
    assert dense_pass_samples(layout, hidden) == 2 < token_ids.shape[0]

    model = copy.deepcopy(dense)
    seen: list[int] = []
    handle = DecoderLayout(model).layers[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    model.prune(WandaConfig(sparsity=0.5, device="cpu", true_sequential=False), calibration_data=token_ids)
    handle.remove()
    # the capture of layer 0's inputs calls it once per sample; then two passes of two samples per forward
    assert max(seen) == 2 and seen.count(2) == 2 * (token_ids.shape[0] // 2), seen
    explicit = _pruned_masks(dense, WandaConfig(sparsity=0.5, device="cpu", batch_size=2), token_ids)
    assert all(torch.equal(mask, explicit[name]) for name, mask in _masks(model).items())
