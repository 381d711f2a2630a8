"""Every error hf_prune raises on purpose, in one place.

Each one subclasses ``HfPruneError`` (so a caller or the CLI can catch the library's own
errors in one clause) and the built-in exception it has always been (``ValueError`` for bad
input, ``RuntimeError`` for a failure while running), so existing ``except`` clauses keep
working.
"""

from __future__ import annotations


class HfPruneError(Exception):
    """Base class of the errors hf_prune raises on purpose; the message says what to change."""


class UnsupportedArchitectureError(HfPruneError, ValueError):
    """The layer walker cannot find decoder layers or prunable weights in this model."""


class UnsupportedOperatorError(HfPruneError, ValueError):
    """A pruning method cannot prune this kind of operator (e.g. one expert's slice of a fused
    expert weight); the message names the method, the operator and the ``targets`` that leave it out."""


class CalibrationError(HfPruneError, ValueError):
    """Calibration or evaluation text cannot be loaded or is unusable."""


class NonFiniteActivationError(HfPruneError, RuntimeError):
    """A layer produced NaN or Inf on calibration data."""


class PruningRecordMismatchError(HfPruneError, ValueError):
    """A checkpoint's weights do not match its pruning record (zeros filled in, wrong pattern)."""


class StructureMismatchError(PruningRecordMismatchError):
    """A checkpoint's layer shapes do not match the structure its record lists."""


class CompressedCheckpointError(HfPruneError, ValueError):
    """A compressed checkpoint is malformed, or a model cannot be saved compressed."""


class SparseKernelError(HfPruneError, RuntimeError):
    """No weight of the model could be moved to the 2:4 sparse kernels; ``report`` (a
    ``SparseKernelReport``) says why, per module."""

    def __init__(self, message: str, report: object) -> None:
        super().__init__(message)
        self.report = report


class LambdaSearchError(HfPruneError, ValueError):
    """FISTAPruner's lambda search did not bracket the requested error share (strict mode)."""
