"""Exact swap search: move a mask one (grow, drop) pair per row at a time while its output error falls.

For an operator ``y = W x`` pruned to ``Ŵ``, the output error over the calibration inputs
``X`` is, row by row, ``e H eᵀ`` with ``e = Ŵ_row − W_row`` and ``H = X Xᵀ`` (the Gram
matrix of the operator's input, here in the pruned model). Changing one entry ``j`` by
``δ`` changes it by ``2 δ g_j + δ² H_jj`` (``g = e H``), and a pair of changes adds the
cross term ``2 δ_j δ_k H_jk``; these are exact, not approximations. Every row repeatedly
takes the pair (grow a pruned weight, drop a kept one; within one group of M for N:M)
that lowers its error most, until none lowers it or ``max_swaps`` is reached, so each
row keeps its count of pruned weights and every N:M group its pattern.

A grown weight gets the value that is optimal given the drop (``−(g_j − w_k H_jk) / H_jj``),
a one-coordinate least-squares step; the other weights keep their values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Best grow and drop candidates per group whose pairs are compared exactly each step.
CANDIDATES = 4


@dataclass
class SwapOutcome:
    """The rebuilt weight and what the search did to it."""

    weight: torch.Tensor
    swaps: int  # pairs swapped, all rows together
    grown: int  # weights pruned at the start and kept at the end (fewer than swaps when a swap undid another)
    error_before: float  # sum over rows of e H eᵀ
    error_after: float


def swap_search(weight: torch.Tensor, dense: torch.Tensor, gram: torch.Tensor, group_size: int | None,
                max_swaps: int, relative_tol: float = 1e-6) -> SwapOutcome:
    """Swap pruned and kept entries of ``weight`` (zeros = pruned) while each row's output error falls.

    ``dense`` is the weight before pruning, ``gram`` the ``(in, in)`` Gram matrix of the
    operator's input; ``group_size`` is M for an N:M pattern (swaps stay inside a group),
    ``None`` for unstructured. Works in place on ``weight`` and returns it in the outcome.
    """
    rows, cols = weight.shape
    size = group_size or cols
    if cols % size:
        raise ValueError(f"group size {size} does not divide the {cols} input columns")
    groups = cols // size
    gram = gram.to(device=weight.device, dtype=weight.dtype)
    diagonal = torch.diagonal(gram).clamp_min(torch.finfo(weight.dtype).tiny)
    pruned = weight == 0
    pruned_at_start = pruned.clone()
    half_gradient = (weight - dense) @ gram  # g = e H, per row
    error_before = _row_errors(weight, dense, half_gradient)
    tolerance = relative_tol * error_before.abs()
    active = torch.arange(rows, device=weight.device)
    swaps = 0
    group_start = (torch.arange(groups, device=weight.device) * size).view(1, groups, 1)
    most_pruned = int(pruned.view(rows, groups, size).sum(dim=-1).max()) if weight.numel() else 0
    grow_pick, drop_pick = min(CANDIDATES, most_pruned), min(CANDIDATES, size - most_pruned)  # 2 x 2 for 2:4
    if grow_pick == 0 or drop_pick == 0:
        max_swaps = 0
    for _ in range(max_swaps):
        if active.numel() == 0:
            break
        if active.numel() == rows:  # no copies while every row still improves
            w, g, p = weight, half_gradient, pruned
        else:
            w, g, p = weight[active], half_gradient[active], pruned[active]
        # best single changes: grow j to its optimal value (gain g_j²/H_jj), drop k (w_k² H_kk − 2 w_k g_k)
        grow_gain = (g * g / diagonal).masked_fill_(~p, -1.0)
        drop_cost = (w * w * diagonal - 2 * w * g).masked_fill_(p, torch.inf)
        grow_top = grow_gain.view(-1, groups, size).topk(grow_pick, dim=-1).indices + group_start
        drop_top = drop_cost.view(-1, groups, size).topk(drop_pick, dim=-1, largest=False).indices + group_start
        n = active.numel()
        grow_cols, drop_cols = grow_top.view(n, -1), drop_top.view(n, -1)
        g_grow = g.gather(1, grow_cols).view(n, groups, grow_pick, 1)
        w_drop = w.gather(1, drop_cols).view(n, groups, 1, drop_pick)
        cross = gram[grow_top.unsqueeze(-1), drop_top.unsqueeze(-2)]  # (n, groups, grow_pick, drop_pick)
        shifted = g_grow - w_drop * cross  # g_j once w_k is zero
        change = drop_cost.gather(1, drop_cols).view(n, groups, 1, drop_pick) - shifted * shifted / diagonal[
            grow_top
        ].unsqueeze(-1)
        valid = p.gather(1, grow_cols).view(n, groups, grow_pick, 1) & ~p.gather(1, drop_cols).view(
            n, groups, 1, drop_pick
        )
        valid &= shifted != 0  # a grown weight whose best value is 0 would stay pruned
        change = change.masked_fill_(~valid, torch.inf).view(n, -1)
        best, where = change.min(dim=1)
        improving = best < -tolerance[active]
        if not bool(improving.any()):
            break
        where, local = where[improving], improving.nonzero().squeeze(1)
        row = active[local]
        pairs = grow_pick * drop_pick
        group, pair = where // pairs, where % pairs
        grown = grow_top[local, group, pair // drop_pick]
        dropped = drop_top[local, group, pair % drop_pick]
        drop_value = weight[row, dropped]
        grow_value = -(half_gradient[row, grown] - drop_value * gram[grown, dropped]) / diagonal[grown]
        weight[row, grown] = grow_value
        weight[row, dropped] = 0.0
        pruned[row, grown] = False
        pruned[row, dropped] = True
        half_gradient[row] += grow_value.unsqueeze(1) * gram[grown] - drop_value.unsqueeze(1) * gram[dropped]
        swaps += row.numel()
        active = row
    error_after = _row_errors(weight, dense, half_gradient)  # g was kept up to date swap by swap
    grown = int((pruned_at_start & ~pruned).sum())
    return SwapOutcome(weight, swaps, grown, float(error_before.sum()), float(error_after.sum()))


def _row_errors(weight: torch.Tensor, dense: torch.Tensor, half_gradient: torch.Tensor) -> torch.Tensor:
    """``e H eᵀ`` per row, from ``g = e H``."""
    return ((weight - dense) * half_gradient).sum(dim=1)
