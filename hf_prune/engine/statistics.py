"""Accumulators for what methods learn from an operator's inputs on calibration data."""

from __future__ import annotations

from enum import Enum

import torch


class StatKind(Enum):
    """What the engine collects for an operator, from least to most expensive."""

    NONE = 0
    NORMS = 1  # squared column norms of X: O(in) memory
    GRAM = 2  # X Xᵀ: O(in²) memory, includes the norms as its diagonal


#: Elements squared at a time for column norms: a buffer that stays in cache is several
#: times faster than squaring a [tokens, in] activation whole.
SQUARE_BLOCK_ELEMENTS = 1 << 18


def _add_column_squares(total: torch.Tensor, x: torch.Tensor) -> None:
    """``total += (x * x).sum(dim=0)`` for a 2-D ``x``, a block of rows at a time."""
    rows = max(1, SQUARE_BLOCK_ELEMENTS // max(1, x.shape[1]))
    if x.device.type != "cpu" or x.shape[0] <= rows:  # on a GPU one kernel beats many small ones
        total += x.square().sum(dim=0)
        return
    buffer = torch.empty((rows, x.shape[1]), dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], rows):
        block = x[start:start + rows]
        squares = buffer[:block.shape[0]]
        torch.mul(block, block, out=squares)
        total += squares.sum(dim=0)


def add_upper_gram(total: torch.Tensor, x: torch.Tensor, block: int = 192) -> None:
    """Add ``xᵀ x`` to the blocks of ``total`` on and above the diagonal (about 60% of the work of
    the whole product); the blocks below keep their old values, see :func:`mirror_upper`."""
    width = x.shape[1]
    blocks = max(1, min(8, width // block))
    edges = [round(i * width / blocks) for i in range(blocks + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        total[lo:hi, lo:].addmm_(x[:, lo:hi].T, x[:, lo:])


def mirror_upper(matrix: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Make a square ``matrix`` exactly symmetric from its upper triangle, in place, a block of
    columns at a time: no temporary is larger than one ``block x block`` diagonal block."""
    width = matrix.shape[0]
    for lo in range(0, width, block):
        hi = min(lo + block, width)
        diagonal = matrix[lo:hi, lo:hi]
        diagonal.copy_(torch.triu(diagonal) + torch.triu(diagonal, diagonal=1).T)
        matrix[hi:, lo:hi].copy_(matrix[lo:hi, hi:].T)
    return matrix


class InputStatistics:
    """Running sums over the rows (tokens) of an operator's input ``X`` (tokens x in), in fp32."""

    def __init__(self, in_features: int, kind: StatKind, device: torch.device) -> None:
        self.kind = kind
        self.tokens = 0
        self._lower_stale = False  # the Gram matrix's lower triangle lags behind its upper one
        self._squares = torch.zeros(in_features, dtype=torch.float32, device=device) if kind is StatKind.NORMS else None
        self._gram = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if kind is StatKind.GRAM else None
        )

    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().flatten(0, -2).to(torch.float32)  # also for zero-width inputs
        self.tokens += x.shape[0]
        if self._gram is not None:
            add_upper_gram(self._gram, x)
            self._lower_stale = True
        elif self._squares is not None:
            _add_column_squares(self._squares, x)

    @property
    def squared_norms(self) -> torch.Tensor:
        """``||X_j||²`` per input column."""
        if self._gram is not None:
            return torch.diagonal(self._gram).clone()
        if self._squares is None:
            raise ValueError("no input statistics were collected for this operator")
        return self._squares

    @property
    def column_norms(self) -> torch.Tensor:
        return self.squared_norms.sqrt()

    @property
    def gram(self) -> torch.Tensor:
        """``X Xᵀ`` (in x in), summed over tokens."""
        if self._gram is None:
            raise ValueError("this operator's Gram matrix was not collected (StatKind.GRAM is needed)")
        if self._lower_stale:
            mirror_upper(self._gram)
            self._lower_stale = False
        return self._gram
