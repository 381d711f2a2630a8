"""Sparsity patterns: parsing, mask selection from scores, and checks on weights.

A pattern says which weights of a row may be removed together:

* ``"unstructured"``: any ``floor(sparsity * in_features)`` weights of each output row.
* ``"N:M"`` (``"2:4"``, ``"4:8"``): in every group of ``M`` consecutive input weights of a
  row, at most ``N`` stay non-zero, so exactly ``M - N`` are pruned.

All masks here are boolean tensors that are ``True`` where a weight is *pruned*.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import PatternWidthError

_NM_RE = re.compile(r"^\s*(\d{1,6})\s*:\s*(\d{1,6})\s*$")  # bounded: no 5000-digit int() on hostile input


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern; ``n``/``m`` are set for N:M patterns only."""

    kind: str  # "unstructured" or "nm"
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.kind == "nm"

    @property
    def implied_sparsity(self) -> float | None:
        """The sparsity an N:M pattern fixes, ``None`` for unstructured."""
        return 1.0 - self.n / self.m if self.is_nm else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def parse_pattern(text: str) -> Pattern:
    """Parse ``"unstructured"`` or ``"N:M"``; raise ``ValueError`` naming the fix otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"pattern must be a string such as 'unstructured' or '2:4', got {text!r}")
    if text.strip().lower() == "unstructured":
        return Pattern("unstructured")
    match = _NM_RE.match(text)
    if match is None:
        raise ValueError(
            f"pattern {text!r} is not understood: use 'unstructured' or 'N:M' with integers, "
            "for example '2:4' (2 of every 4 weights kept) or '4:8'"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if m < 2 or not 0 < n < m:
        raise ValueError(
            f"pattern {text!r} is malformed: N:M needs 0 < N < M and M >= 2 "
            "(N weights kept in every group of M), for example '2:4'"
        )
    return Pattern("nm", n, m)


def check_width(pattern: Pattern, in_features: int, module_name: str) -> None:
    """Raise if an N:M pattern's M does not divide a weight's input width."""
    if pattern.is_nm and in_features % pattern.m != 0:
        raise PatternWidthError(
            f"pattern {pattern} cannot be applied to {module_name}: its input width {in_features} "
            f"is not a multiple of M={pattern.m}. Exclude this module with `targets`, or choose an "
            "M that divides every targeted width"
        )


def prune_count(sparsity: float, width: int) -> int:
    """Number of weights pruned in a row of ``width`` at ``sparsity`` (rounded down)."""
    return int(sparsity * width + 1e-9)


def lowest_per_row(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the ``count`` lowest scores in each row (``True`` = prune)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count > 0:
        index = torch.topk(scores, count, dim=1, largest=False, sorted=False).indices  # order unused: 2x faster
        mask.scatter_(1, index, True)
    return mask


def lowest_per_group(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask: in each group of ``m`` consecutive columns, prune the ``m - n`` lowest."""
    rows, cols = scores.shape
    grouped = scores.reshape(rows, cols // m, m)
    index = torch.topk(grouped, m - n, dim=2, largest=False).indices
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    mask.scatter_(2, index, True)
    return mask.reshape(rows, cols)


def mask_from_scores(scores: torch.Tensor, pattern: Pattern, sparsity: float) -> torch.Tensor:
    """Choose the pruned entries of a weight from importance scores (low = pruned)."""
    if pattern.is_nm:
        return lowest_per_group(scores, pattern.n, pattern.m)
    return lowest_per_row(scores, prune_count(sparsity, scores.shape[1]))


def satisfies_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive input weights has at most ``n`` non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    nonzero = (weight.reshape(rows, cols // m, m) != 0).sum(dim=2)
    return bool((nonzero <= n).all())
