"""Accumulators for what methods learn from an operator's inputs on calibration data."""

from __future__ import annotations

from enum import Enum

import torch


class StatKind(Enum):
    """What the engine collects for an operator, from least to most expensive."""

    NONE = 0
    NORMS = 1  # squared column norms of X: O(in) memory
    GRAM = 2  # X Xᵀ: O(in²) memory, includes the norms as its diagonal


class InputStatistics:
    """Running sums over the rows (tokens) of an operator's input ``X`` (tokens x in), in fp32."""

    def __init__(self, in_features: int, kind: StatKind, device: torch.device) -> None:
        self.kind = kind
        self.tokens = 0
        self._squares = torch.zeros(in_features, dtype=torch.float32, device=device) if kind is StatKind.NORMS else None
        self._gram = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if kind is StatKind.GRAM else None
        )

    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().flatten(0, -2).to(torch.float32)  # also for zero-width inputs
        self.tokens += x.shape[0]
        if self._gram is not None:
            self._gram.addmm_(x.t(), x)
        elif self._squares is not None:
            self._squares += x.square().sum(dim=0)

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
        return self._gram
