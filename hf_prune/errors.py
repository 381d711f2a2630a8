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


class PruningConfigError(HfPruneError, ValueError):
    """A pruning configuration field has the wrong type or an out-of-range value; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class PruningRecordError(HfPruneError, ValueError):
    """A checkpoint's pruning record (``config.json["pruning_config"]``) is malformed: wrong types,
    missing entries or nested too deep. The record was edited or does not come from hf_prune."""


class SaveDirectoryError(HfPruneError, ValueError):
    """``save_pretrained`` refuses the target: it is the source model's folder, or not a folder."""


class SurgeryIndexError(HfPruneError, IndexError):
    """Units to keep are out of range, a mask of the wrong length, or not integers or booleans."""


class ModelNotFoundError(HfPruneError, FileNotFoundError):
    """``--model`` / ``from_pretrained`` names neither an existing local path nor a loadable hub model."""


class OutputDirectoryError(SaveDirectoryError):
    """The output directory is the source model's directory, or holds files that would be overwritten."""


class PatternWidthError(HfPruneError, ValueError):
    """An N:M pattern's M does not divide the input width of a targeted operator."""


class MissingTokenizerError(HfPruneError, ValueError):
    """A model directory holds no tokenizer, and one is needed (calibration or evaluation text)."""
