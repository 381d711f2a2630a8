"""SparseGPT's solver against a plain column-by-column statement of the algorithm."""

from __future__ import annotations

import pytest
import torch

from hf_prune import SparseGPTConfig
from hf_prune.engine.statistics import InputStatistics, StatKind
from hf_prune.methods import sparsegpt
from hf_prune.methods.patterns import parse_pattern, prune_count, satisfies_nm
from hf_prune.methods.sparsegpt import inverse_hessian_factor, sparsegpt_prune


def _textbook(weight: torch.Tensor, gram: torch.Tensor, sparsity: float, pattern_text: str, block: int) -> torch.Tensor:
    """One column at a time on the (out, in) weight: choose what to prune (an N:M group when
    its first column is reached; for unstructured, each row's remaining quota among the lowest
    saliencies of all columns ahead), then spread each pruned weight's error over the columns
    to its right through the upper Cholesky factor of H⁻¹."""
    pattern = parse_pattern(pattern_text)
    upper, dead = inverse_hessian_factor(gram, 0.01)
    w = weight.clone()
    w[:, dead] = 0
    rows, cols = w.shape
    diag = torch.diagonal(upper)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    remaining = [prune_count(sparsity, cols)] * rows
    for start in range(0, cols, block):
        end = min(start + block, cols)
        if not pattern.is_nm:
            saliency = (w[:, start:] / diag[start:]) ** 2
            for r in range(rows):
                order = torch.sort(saliency[r], stable=True).indices[: remaining[r]]
                chosen = order[order < end - start] + start
                pruned[r, chosen] = True
                remaining[r] -= len(chosen)
        for j in range(start, end):
            if pattern.is_nm and (j - start) % pattern.m == 0:
                group = (w[:, j:j + pattern.m] / diag[j:j + pattern.m]) ** 2
                lowest = group.topk(pattern.m - pattern.n, dim=1, largest=False).indices + j
                pruned[torch.arange(rows).unsqueeze(1), lowest] = True
            error = torch.where(pruned[:, j], w[:, j] / diag[j], torch.zeros(()))
            w[:, j:] -= torch.outer(error, upper[j, j:])
    return w.masked_fill(pruned, 0.0)


def _problem(out: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.eye(width) + 0.2 * torch.randn(width, width, generator=gen)
    x = torch.randn(4 * width, width, generator=gen) @ mixing
    x[:, 3] = 0  # a dead input
    return torch.randn(out, width, generator=gen), x.t() @ x


@pytest.mark.parametrize("pattern_text", ["unstructured", "2:4", "4:8"])
def test_solver_matches_the_column_by_column_algorithm(pattern_text):
    weight, gram = _problem(out=24, width=40, seed=1)  # 40 columns: blocks of 16, 16 and 8
    expected = _textbook(weight, gram, 0.5, pattern_text, block=16)
    result = sparsegpt_prune(weight.clone(), gram, 0.5, parse_pattern(pattern_text), 16, 0.01)
    assert torch.equal(result == 0, expected == 0)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-5)
    assert torch.all((result == 0).sum(dim=1) == 20)
    if pattern_text != "unstructured":
        pattern = parse_pattern(pattern_text)
        assert satisfies_nm(result, pattern.n, pattern.m)


def test_operators_sharing_an_input_factor_its_hessian_once(monkeypatch):
    calls = []
    real = sparsegpt.inverse_hessian_factor
    monkeypatch.setattr(sparsegpt, "inverse_hessian_factor", lambda *a: calls.append(1) or real(*a))
    weight, _ = _problem(out=8, width=32, seed=2)
    stats = InputStatistics(32, StatKind.GRAM, torch.device("cpu"))
    stats.update(torch.randn(64, 32))
    pruner = SparseGPTConfig(device="cpu").make_pruner()
    q = pruner.prune_weight(weight.clone(), stats, 0.5)
    k = pruner.prune_weight(weight.clone(), stats, 0.5)
    assert len(calls) == 1 and torch.equal(q, k)
    stats.update(torch.randn(64, 32))  # more tokens: the old factor no longer holds
    pruner.prune_weight(weight.clone(), stats, 0.5)
    assert len(calls) == 2
