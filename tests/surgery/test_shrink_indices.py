"""Public shrink helpers take index tensors and boolean masks correctly, and refuse other dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from hf_prune.errors import SurgeryIndexError
from hf_prune.surgery import shrink_attention, shrink_mlp
from hf_prune.walker.layout import DecoderLayout

KEEP = [3, 17, 64, 100, 127]


def _down_columns(model, index):
    return model.model.layers[index].mlp.down_proj.weight.detach().clone()


@pytest.mark.parametrize(
    "keep",
    [
        torch.tensor(KEEP),
        torch.tensor(KEEP, dtype=torch.int32),
        KEEP,
        np.array(KEEP),
        torch.isin(torch.arange(128), torch.tensor(KEEP)),  # a bool mask over the 128 neurons
        np.isin(np.arange(128), KEEP),
        [i in KEEP for i in range(128)],
    ],
    ids=["long", "int32", "list", "numpy", "bool-mask", "numpy-mask", "list-mask"],
)
def test_shrink_mlp_keeps_exactly_the_given_neurons(keep):
    model = tiny_model("llama")
    dense = _down_columns(model, 0)
    layout = DecoderLayout(model)
    removed = shrink_mlp(layout, 0, keep)
    assert removed == 128 - len(KEEP)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, dense[:, KEEP])


def test_a_bool_mask_is_not_read_as_the_indices_0_and_1():
    model = tiny_model("llama")
    dense = _down_columns(model, 0)
    mask = torch.zeros(128, dtype=torch.bool)
    mask[[5, 9, 120]] = True
    shrink_mlp(DecoderLayout(model), 0, mask)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, dense[:, [5, 9, 120]])


@pytest.mark.parametrize(
    ("keep", "match"),
    [
        (torch.tensor([0.0, 1.7, 2.2]), "floats are not rounded"),
        ([0.5, 3.0], "floats are not rounded"),
        (np.array([1.0, 2.0]), "floats are not rounded"),
        (torch.ones(64, dtype=torch.bool), "exactly 128 entries"),
        (torch.ones(2, 64, dtype=torch.bool), "exactly 128 entries"),
        ([0, 128], r"\[0, 128\)"),
        ([-1], r"\[0, 128\)"),
        ("abc", "integer indices or a boolean mask"),
        ([object()], "integer indices or a boolean mask"),
    ],
)
def test_other_keeps_are_refused_and_nothing_changes(keep, match):
    model = tiny_model("llama")
    dense = _down_columns(model, 0)
    with pytest.raises(SurgeryIndexError, match=match) as caught:
        shrink_mlp(DecoderLayout(model), 0, keep)
    assert isinstance(caught.value, IndexError)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, dense)


def test_shrink_attention_takes_a_bool_mask_of_kv_groups():
    model = tiny_model("llama")  # 4 query heads in 2 KV groups of 16-wide heads
    k_proj = model.model.layers[1].self_attn.k_proj.weight.detach().clone()
    removed = shrink_attention(DecoderLayout(model), 1, torch.tensor([False, True]))
    assert removed == 2
    assert torch.equal(model.model.layers[1].self_attn.k_proj.weight, k_proj[16:32])
    with pytest.raises(SurgeryIndexError, match="floats"):
        shrink_attention(DecoderLayout(model), 0, torch.tensor([1.0]))


def test_an_empty_keep_removes_every_neuron():
    model = tiny_model("llama")
    assert shrink_mlp(DecoderLayout(model), 0, []) == 128
    assert model.model.layers[0].mlp.down_proj.in_features == 0
