"""LLM-Barber's exact swap search on a single weight with correlated inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_prune.methods.barber.swaps import swap_search
from hf_prune.methods.patterns import satisfies_nm

ROWS, COLS = 12, 32


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dense weight, correlated inputs ``X`` (tokens x in) and their Gram matrix."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(400, COLS, generator=generator, dtype=torch.float64)
    x = x @ torch.randn(COLS, COLS, generator=generator, dtype=torch.float64)  # correlated columns
    weight = torch.randn(ROWS, COLS, generator=generator, dtype=torch.float64)
    return weight, x, x.t() @ x


def _wanda_start(weight: torch.Tensor, x: torch.Tensor, group: int | None) -> torch.Tensor:
    """Wanda's mask (``|W| * ||X_j||``, half of each row or each group of ``group``) applied to ``weight``."""
    score = weight.abs() * x.norm(dim=0)
    size = group or COLS
    grouped = score.view(ROWS, -1, size)
    lowest = grouped.topk(size // 2, dim=-1, largest=False).indices
    mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, lowest, True).view(ROWS, COLS)
    return weight.masked_fill(mask, 0.0)


def _output_error(pruned: torch.Tensor, dense: torch.Tensor, x: torch.Tensor) -> float:
    """``||(Ŵ - W) Xᵀ||²``, straight from the activations."""
    return float(((pruned - dense) @ x.t()).square().sum())


@pytest.mark.parametrize("group", [None, 4, 8])
def test_swaps_lower_the_output_error_and_keep_counts_and_pattern(group):
    dense, x, gram = _problem()
    start = _wanda_start(dense, x, group)
    outcome = swap_search(start.clone(), dense, gram, group, max_swaps=50)
    after = outcome.weight
    assert outcome.swaps > 0
    assert outcome.error_before == pytest.approx(_output_error(start, dense, x), rel=1e-9)
    assert outcome.error_after == pytest.approx(_output_error(after, dense, x), rel=1e-9)
    assert outcome.error_after < 0.9 * outcome.error_before
    assert torch.equal((after == 0).sum(dim=1), (start == 0).sum(dim=1))
    if group:
        assert satisfies_nm(after, group // 2, group)


def test_each_swap_lowers_the_error():
    """More allowed swaps never raise the error: the search is monotone, swap by swap."""
    dense, x, gram = _problem(1)
    start = _wanda_start(dense, x, None)
    errors = [swap_search(start.clone(), dense, gram, None, max_swaps=k).error_after for k in range(8)]
    assert errors[0] == pytest.approx(_output_error(start, dense, x), rel=1e-9)
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors


def test_zero_swaps_changes_nothing():
    dense, x, gram = _problem(2)
    start = _wanda_start(dense, x, 4)
    outcome = swap_search(start.clone(), dense, gram, 4, max_swaps=0)
    assert torch.equal(outcome.weight, start) and outcome.swaps == 0


def test_one_swap_is_the_best_pair_of_each_row_for_2_4():
    """In 2:4 every (grow, drop) pair of a group is compared exactly, so one swap per row is the best one."""
    dense, x, gram = _problem(3)
    start = _wanda_start(dense, x, 4)
    after = swap_search(start.clone(), dense, gram, 4, max_swaps=1).weight
    for row in range(ROWS):
        best = _output_error(start[row:row + 1], dense[row:row + 1], x)
        for group in range(COLS // 4):
            cols = range(group * 4, group * 4 + 4)
            pruned = [c for c in cols if start[row, c] == 0]
            kept = [c for c in cols if start[row, c] != 0]
            for grow, drop in itertools.product(pruned, kept):
                candidate = start[row].clone()
                candidate[drop] = 0.0
                residual = (candidate - dense[row]) @ gram  # optimal value of the grown weight, given the drop
                candidate[grow] = -residual[grow] / gram[grow, grow]
                best = min(best, _output_error(candidate.unsqueeze(0), dense[row:row + 1], x))
        assert _output_error(after[row:row + 1], dense[row:row + 1], x) == pytest.approx(best, rel=1e-9), row


def test_group_size_must_divide_the_width():
    dense, x, gram = _problem()
    with pytest.raises(ValueError, match="does not divide"):
        swap_search(dense.clone(), dense, gram, 5, max_swaps=1)
