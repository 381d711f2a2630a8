"""The accumulators behind every method: blocked column norms and upper-triangle Gram matrices."""

from __future__ import annotations

import pytest
import torch

from hf_prune.engine.layer_pass import check_finite
from hf_prune.engine.statistics import SQUARE_BLOCK_ELEMENTS, InputStatistics, StatKind, add_upper_gram, mirror_upper
from hf_prune.errors import NonFiniteActivationError


def test_column_norms_of_many_tokens_match_the_direct_sum():
    torch.manual_seed(0)
    width = 96
    rows = 3 * SQUARE_BLOCK_ELEMENTS // width + 17  # several blocks and a partial one
    stats = InputStatistics(width, StatKind.NORMS, torch.device("cpu"))
    first, second = torch.randn(rows, width) * 3, torch.randn(5, 7, width)
    stats.update(first)
    stats.update(second)
    expected = first.square().sum(0) + second.flatten(0, 1).square().sum(0)
    torch.testing.assert_close(stats.squared_norms, expected, rtol=1e-5, atol=1e-3)
    assert stats.tokens == rows + 35


@pytest.mark.parametrize("width", [8, 191, 576, 1600])
def test_gram_from_upper_blocks_is_the_exact_symmetric_product(width):
    torch.manual_seed(width)
    stats = InputStatistics(width, StatKind.GRAM, torch.device("cpu"))
    batches = [torch.randn(2, 33, width, dtype=torch.float64).float() for _ in range(3)]
    for batch in batches:
        stats.update(batch)
    x = torch.cat([b.flatten(0, 1) for b in batches]).double()
    gram = stats.gram
    assert torch.equal(gram, gram.T)
    torch.testing.assert_close(gram.double(), x.T @ x, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(stats.squared_norms.double(), (x * x).sum(0), rtol=1e-5, atol=1e-3)
    stats.update(batches[0])  # a later batch updates the lower triangle too when read again
    torch.testing.assert_close(stats.gram.double(), x.T @ x + batches[0].flatten(0, 1).double().T
                               @ batches[0].flatten(0, 1).double(), rtol=1e-5, atol=1e-3)


def test_upper_gram_leaves_the_lower_blocks_alone():
    x = torch.randn(40, 600)
    total = torch.zeros(600, 600)
    add_upper_gram(total, x)
    assert torch.count_nonzero(torch.tril(total, diagonal=-200)) == 0  # below the diagonal blocks: untouched
    torch.testing.assert_close(mirror_upper(total), x.T @ x, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("width", [7, 8, 10])
def test_mirror_copies_the_upper_triangle_exactly_block_by_block(width):
    matrix = torch.randn(width, width)
    expected = torch.triu(matrix) + torch.triu(matrix, diagonal=1).T
    assert torch.equal(mirror_upper(matrix, block=4), expected)


def test_finite_check_sees_nan_and_inf_but_not_a_large_finite_sum():
    big = torch.full((4, 8, 16), 3e38)  # every entry finite, their sum overflows
    check_finite(big, 0, torch.float32)
    for bad in (float("nan"), float("inf"), -float("inf")):
        hidden = torch.randn(4, 8, 16)
        hidden[2, 3, 5] = bad
        with pytest.raises(NonFiniteActivationError, match="layer 3 produced NaN/Inf"):
            check_finite(hidden, 3, torch.float32)
