"""Each method on one layer with correlated inputs: the better methods reconstruct better."""

from __future__ import annotations

import pytest
import torch

from hf_prune.engine.statistics import InputStatistics, StatKind
from hf_prune.methods.patterns import mask_from_scores, parse_pattern, satisfies_nm
from hf_prune.methods.sparsegpt import sparsegpt_prune
from hf_prune.methods.wanda import wanda_scores


def _correlated_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=gen) / width**0.5
    scales = torch.logspace(-1, 1, width)[torch.randperm(width, generator=gen)]  # uneven channel norms
    return (torch.randn(tokens, width, generator=gen) @ mixing + 0.3 * torch.randn(tokens, 1, generator=gen)) * scales


@pytest.mark.parametrize("pattern_text", ["unstructured", "2:4"])
def test_sparsegpt_beats_wanda_beats_magnitude(pattern_text):
    torch.manual_seed(0)
    width, out = 64, 48
    x = _correlated_inputs(2048, width, seed=3)
    weight = torch.randn(out, width)
    pattern = parse_pattern(pattern_text)
    norms = InputStatistics(width, StatKind.NORMS, torch.device("cpu"))
    gram = InputStatistics(width, StatKind.GRAM, torch.device("cpu"))
    norms.update(x)
    gram.update(x)

    magnitude = weight.masked_fill(mask_from_scores(weight.abs(), pattern, 0.5), 0)
    wanda = weight.masked_fill(mask_from_scores(wanda_scores(weight, norms), pattern, 0.5), 0)
    sparsegpt = sparsegpt_prune(weight.clone(), gram.gram, 0.5, pattern, block_size=16, dampening=0.01)

    def error(pruned: torch.Tensor) -> float:
        return float(torch.linalg.norm(x @ weight.t() - x @ pruned.t()))

    for pruned in (magnitude, wanda, sparsegpt):
        assert torch.all((pruned == 0).sum(dim=1) == width // 2)
        if pattern.is_nm:
            assert satisfies_nm(pruned, 2, 4)
    assert error(sparsegpt) < error(wanda) < error(magnitude)


def test_sparsegpt_singular_hessian_is_damped_not_nan():
    width = 32
    x = torch.randn(8, width)  # rank 8 < 32: singular Gram
    x[:, 5] = 0  # a dead input
    gram = x.t() @ x
    pruned = sparsegpt_prune(torch.randn(16, width), gram, 0.5, parse_pattern("unstructured"), 8, 0.01)
    assert torch.isfinite(pruned).all()
    assert torch.all(pruned[:, 5] == 0)
    assert torch.all((pruned == 0).sum(dim=1) >= width // 2)
