"""Batched FISTA for FISTAPruner's layer-wise problem (arXiv 2408.03728), from Gram statistics.

For one Linear with dense weight ``W`` (out x in), ``X`` its input in the dense model and
``X̂`` its input once the earlier operators of the same decoder layer are pruned (in x tokens):

    min_Ŵ  F(Ŵ) = f(Ŵ) + λ‖Ŵ‖₁,   f(Ŵ) = ½‖ŴX̂ − WX‖²_F = Σ_rows ½ŵGŵᵀ − ŵ·b + ½c

with ``G = X̂X̂ᵀ``, ``B = W X X̂ᵀ`` (rows ``b``) and ``c = ‖wX‖²``. Only ``G``, ``B`` and ``c``
enter, so an iteration costs one ``(out x in) @ (in x in)`` product whatever the token count.
Rows are independent problems: all of them are solved at once, each with its own λ.

* Solver: monotone FISTA (MFISTA, Beck & Teboulle 2009) with step ``1/L``,
  ``L = λ_max(G)`` (power iteration), soft-thresholding as the proximal step. The
  monotone variant keeps the accelerated rate and never lets a row's objective rise (plain
  FISTA may oscillate). ``G X`` products are carried along linearly, so the objective of
  every iterate is known without extra matrix products.
* Preconditioning: the solver runs in coordinates scaled by ``d_j = sqrt(G_jj)``
  (``v = w·d``), where the l1 term becomes ``λ Σ|v_j|/d_j`` — the same problem and the same
  minimiser, much better conditioned when input channels have very different norms.
* Exact sparsity: the FISTA solution is rounded to exactly the target (the ``k`` largest
  ``|w|`` of each row, or the N largest of every M). With N:M this projection is not
  convex: the l1 term knows nothing of groups, so the result is a heuristic, not an optimum.
* λ is not hand-set: for each row, bisection on ``log λ`` so that the error added by the
  final rounding is a fixed share ``ξ`` of the rounded error,
  ``(f(round(Ŵ)) − f(Ŵ)) / f(round(Ŵ)) = ξ`` (the paper's ``ξ = 0.3``). Small λ leaves a
  dense solution that rounding damages; large λ prunes too much before rounding. Each
  bisection step restarts FISTA from the previous solution.
* Of all rounded candidates (the warm start included) each row keeps the one with the
  lowest ``f``, then a few monotone FISTA iterations with λ = 0 on that fixed support
  re-fit the kept weights. The result is therefore never worse than the warm start.

Degenerate inputs: an operator whose inputs are all zero (``G = 0``) cannot change the
layer's output, so its warm start is returned as it is; rank-deficient ``G`` needs no
fallback (nothing is inverted, the l1 term keeps the problem well posed; ``ridge`` adds
``δ·mean(diag G)`` to make it strongly convex, as a pull towards the dense weights);
NaN/Inf statistics or a diverging solve raise ``ValueError`` rather than return NaN. A
kept weight whose input channel is always zero (its gradient is exactly zero), or where
too few tokens already give an exact fit, may stay at 0: such a row ends sparser than
asked, never denser (as with SparseGPT, which zeroes dead channels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import LambdaSearchError
from ..patterns import Pattern, mask_from_scores

_TINY = 1e-30




@dataclass
class SolverSettings:
    """How hard the solver works.

    ``max_iters``/``tol``: FISTA iterations per λ trial, stopped early once every row's step
    ``‖z − y‖`` is below ``tol`` times ``‖z‖``. ``lambda_steps``: bisection steps on ``log λ``
    over ``[lambda_range · λ_max, λ_max]`` (``λ_max`` zeroes the row). ``error_share``: the
    target ``ξ``. ``refine_iters``: λ = 0 iterations on the final support. ``strict``: raise
    ``LambdaSearchError`` when a row's search never brackets ``ξ`` instead of keeping its
    best candidate.
    """

    max_iters: int = 30
    tol: float = 1e-4
    error_share: float = 0.3
    lambda_steps: int = 8
    lambda_range: float = 1e-4
    refine_iters: int = 30
    precondition: bool = True
    ridge: float = 0.0
    strict: bool = False
    dtype: torch.dtype = torch.float32


@dataclass
class SolveResult:
    """The pruned weight, the warm start's and the final error per row, and the rows whose λ search
    never bracketed the requested error share."""

    weight: torch.Tensor
    warm_error: torch.Tensor
    error: torch.Tensor
    unreachable: int


def soft_threshold(u: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``sign(u) · max(|u| − threshold, 0)``, the proximal map of the (weighted) l1 norm."""
    return u.sign() * (u.abs() - threshold).clamp_min_(0.0)


def largest_eigenvalue(matrix: torch.Tensor, iters: int = 100, rtol: float = 1e-6) -> float:
    """Largest eigenvalue of a symmetric PSD matrix by power iteration (deterministic start)."""
    n = matrix.shape[0]
    index = torch.arange(n, device=matrix.device, dtype=matrix.dtype)
    vector = 1.0 + 0.5 * torch.sin(index)
    vector = vector / vector.norm()
    value = 0.0
    for _ in range(iters):
        product = matrix @ vector
        new_value = float(vector @ product)
        norm = product.norm()
        if not torch.isfinite(norm) or float(norm) <= 0:
            return max(new_value, 0.0)
        vector = product / norm
        if abs(new_value - value) <= rtol * abs(new_value):
            value = new_value
            break
        value = new_value
    return value


def keep_mask(scores: torch.Tensor, pattern: Pattern, sparsity: float) -> torch.Tensor:
    """``True`` where a weight is kept: the largest scores of each row (or of each N:M group)."""
    return ~mask_from_scores(scores, pattern, sparsity)


class QuadraticProblem:
    """``f`` of every row of one operator, in the solver's (scaled) coordinates.

    ``gram`` is ``X̂X̂ᵀ``, ``target`` is ``B = W X X̂ᵀ``, ``const`` is ``‖wX‖²`` per row.
    ``dense`` (the original weight) is needed only with ``ridge > 0``.
    """

    def __init__(self, gram: torch.Tensor, target: torch.Tensor, const: torch.Tensor,
                 settings: SolverSettings, dense: torch.Tensor | None = None, name: str = "operator") -> None:
        for label, tensor in (("X̂X̂ᵀ", gram), ("W X X̂ᵀ", target), ("‖WX‖²", const)):
            if not torch.isfinite(tensor).all():
                raise ValueError(
                    f"the calibration statistics {label} of {name} hold NaN/Inf, so FISTA cannot run; load the "
                    "model in float32 (dtype=torch.float32) and check the calibration data"
                )
        dtype = settings.dtype
        gram = gram.to(dtype)
        target = target.to(dtype)
        const = const.to(torch.float64)
        diag = torch.diagonal(gram).clamp_min(0.0)
        self.degenerate = bool(diag.max() <= 0)
        if settings.ridge > 0 and not self.degenerate:
            if dense is None:
                raise ValueError("ridge > 0 needs the dense weight")
            delta = settings.ridge * diag.mean()
            gram = gram.clone()
            gram.diagonal().add_(delta)
            dense = dense.to(dtype)
            target = target + delta * dense
            const = const + float(delta) * dense.double().square().sum(dim=1)
            diag = torch.diagonal(gram)
        if settings.precondition:
            scale = diag.sqrt()
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        else:
            scale = torch.ones_like(diag)
        self.scale = scale
        self.gram = gram / scale.unsqueeze(0) / scale.unsqueeze(1)
        self.target = target / scale.unsqueeze(0)
        self.const = const
        self.lipschitz = 0.0 if self.degenerate else 1.02 * largest_eigenvalue(self.gram)
        self.name = name
        self.dtype = dtype

    def to_scaled(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to(self.dtype) * self.scale

    def from_scaled(self, v: torch.Tensor) -> torch.Tensor:
        return v / self.scale

    def error(self, v: torch.Tensor, vg: torch.Tensor) -> torch.Tensor:
        """``f`` per row (float64) from ``v`` and ``v @ G``."""
        quad = (v * vg).sum(dim=1, dtype=torch.float64)
        lin = (v * self.target).sum(dim=1, dtype=torch.float64)
        return (0.5 * quad - lin + 0.5 * self.const).clamp_min(0.0)

    def l1(self, v: torch.Tensor) -> torch.Tensor:
        """``‖w‖₁`` per row (float64), with ``w = v / d``."""
        return (v.abs() / self.scale).sum(dim=1, dtype=torch.float64)

    def lambda_max(self) -> torch.Tensor:
        """Per row, the smallest λ whose solution is all zero: ``max_j |b_j|``."""
        return (self.target * self.scale).abs().amax(dim=1).to(torch.float64)


def fista(problem: QuadraticProblem, v: torch.Tensor, lam: torch.Tensor | None, iters: int, tol: float,
          keep: torch.Tensor | None = None,
          history: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Monotone FISTA from ``v`` (scaled coordinates); returns ``(v, v @ G, iterations run)``.

    ``lam``: per-row λ (original units), ``None`` for a plain least-squares fit; ``keep``: a
    fixed support (entries outside stay zero). ``history`` receives ``Σ_rows F`` after each
    iteration (non-increasing: MFISTA only accepts a point that does not raise a row's ``F``).
    """
    gram, target = problem.gram, problem.target
    step = 1.0 / problem.lipschitz
    if lam is not None:
        lam64 = lam.to(torch.float64)
        threshold = (lam.to(v.dtype).unsqueeze(1) * step) / problem.scale.unsqueeze(0)
    else:
        lam64 = None
        threshold = None
    keep_f = keep.to(v.dtype) if keep is not None else None
    if keep_f is not None:
        v = v * keep_f

    def objective(point: torch.Tensor, point_g: torch.Tensor) -> torch.Tensor:
        value = problem.error(point, point_g)
        return value + lam64 * problem.l1(point) if lam64 is not None else value

    x = v
    xg = x @ gram
    fx = objective(x, xg)
    y, yg = x, xg
    t = 1.0
    done = 0
    for _ in range(iters):
        done += 1
        u = y - step * (yg - target)
        z = soft_threshold(u, threshold) if threshold is not None else u
        if keep_f is not None:
            z = z * keep_f
        zg = z @ gram
        fz = objective(z, zg)
        accept = (fz <= fx).unsqueeze(1)
        x_new = torch.where(accept, z, x)
        xg_new = torch.where(accept, zg, xg)
        fx = torch.minimum(fz, fx)
        # the prox-gradient step length ‖z − y‖ (relative): zero exactly at a minimiser
        moved = (z - y).norm(dim=1) <= tol * z.norm(dim=1).clamp_min(_TINY)
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        a, b = t / t_new, (t - 1.0) / t_new
        y = x_new + a * (z - x_new) + b * (x_new - x)
        yg = xg_new + a * (zg - xg_new) + b * (xg_new - xg)
        x, xg, t = x_new, xg_new, t_new
        if history is not None:
            history.append(float(fx.sum()))
        if bool(moved.all()):
            break
    return x, xg, done


def solve(problem: QuadraticProblem, warm: torch.Tensor, pattern: Pattern, sparsity: float,
          settings: SolverSettings) -> SolveResult:
    """FISTAPruner's search for one operator: λ bisection, rounding, best candidate, re-fit.

    ``warm`` is an exactly sparse ``(out, in)`` starting point (Wanda, SparseGPT, magnitude...).
    Returns a weight with exactly the requested sparsity per row (or the N:M pattern).
    """
    rows = warm.shape[0]
    device = warm.device
    warm_keep = keep_mask(warm.abs(), pattern, sparsity)
    v = problem.to_scaled(warm) * warm_keep
    if problem.degenerate:
        return SolveResult(problem.from_scaled(v).float(), problem.const / 2, problem.const / 2, 0)
    vg = v @ problem.gram
    best_v, best_keep = v, warm_keep
    best_error = warm_error = problem.error(v, vg)
    lam_max = problem.lambda_max().clamp_min(_TINY)
    log_hi = lam_max.log()
    log_lo = log_hi + math.log(settings.lambda_range)
    saw_dense = torch.zeros(rows, dtype=torch.bool, device=device)
    saw_sparse = torch.zeros_like(saw_dense)
    for _ in range(settings.lambda_steps):
        log_mid = 0.5 * (log_lo + log_hi)
        lam = log_mid.exp()
        v, vg, _ = fista(problem, v, lam, settings.max_iters, settings.tol)
        keep = keep_mask(problem.from_scaled(v).abs(), pattern, sparsity)
        rounded = v * keep
        rounded_g = rounded @ problem.gram
        rounded_error = problem.error(rounded, rounded_g)
        share = (rounded_error - problem.error(v, vg)) / rounded_error.clamp_min(_TINY)
        too_dense = share > settings.error_share
        saw_dense |= too_dense
        saw_sparse |= ~too_dense
        log_lo = torch.where(too_dense, log_mid, log_lo)
        log_hi = torch.where(too_dense, log_hi, log_mid)
        better = rounded_error < best_error
        best_error = torch.where(better, rounded_error, best_error)
        best_v = torch.where(better.unsqueeze(1), rounded, best_v)
        best_keep = torch.where(better.unsqueeze(1), keep, best_keep)
    unreachable = int((~(saw_dense & saw_sparse)).sum()) if settings.lambda_steps else 0
    if unreachable and settings.strict:
        raise LambdaSearchError(
            f"{problem.name}: the λ search could not bring the share of error added by rounding to "
            f"error_share={settings.error_share} for {unreachable} of {rows} rows (the share stayed on one side "
            f"for every λ in [{settings.lambda_range:g}, 1] x λ_max). Use another error_share, more lambda_steps, "
            "or strict_lambda=False to keep each row's best rounded candidate"
        )
    final, final_g, _ = fista(problem, best_v, None, settings.refine_iters, settings.tol, keep=best_keep)
    error = problem.error(final, final_g)
    weight = (problem.from_scaled(final) * best_keep).float()
    if not torch.isfinite(weight).all():
        raise ValueError(
            f"FISTA diverged on {problem.name} (non-finite weights); try solver_dtype='float64' or check the "
            "calibration data"
        )
    return SolveResult(weight, warm_error, error, unreachable)
