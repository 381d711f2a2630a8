"""What a pruning method implements for the sequential engine.

The engine owns models, data and devices. A method sees one decoder layer at a time:
it says which input statistics each operator needs, then returns the pruned weight of
each operator once those statistics are complete. Methods that act on a whole layer
(structured ones) override ``finish_layer`` instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from ..patterns import check_width
from ..statistics import InputStatistics, StatKind

if TYPE_CHECKING:
    from ..architectures import DecoderLayout, Operator
    from ..config import PruningConfig


class LayerPruner(ABC):
    """Base class of every method's algorithm."""

    #: whether operators are pruned during the layer's forward pass (as soon as their
    #: statistics are complete) rather than after it in ``finish_layer``.
    prunes_operators: bool = True

    def __init__(self, config: PruningConfig) -> None:
        self.config = config
        self.pattern = config.parsed_pattern

    def statistics_kind(self, op: Operator) -> StatKind:
        """Which input statistics to collect for ``op``."""
        return StatKind.NONE

    def validate(self, op: Operator) -> None:
        """Raise before any work if ``op`` cannot take this method's pattern."""
        check_width(self.pattern, op.in_features, op.name)

    def prune_operator(
        self, op: Operator, weight: torch.Tensor, stats: InputStatistics | None, sparsity: float
    ) -> torch.Tensor:
        """Return the pruned ``(out, in)`` fp32 weight of ``op`` (``weight`` may be modified)."""
        return self.prune_weight(weight, stats, sparsity)

    @abstractmethod
    def prune_weight(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: float) -> torch.Tensor:
        """Prune one ``(out, in)`` fp32 weight given its input statistics."""

    def finish_layer(self, layout: DecoderLayout, index: int, stats: dict[str, InputStatistics]) -> bool:
        """Called after a layer's statistics pass. Return True if the layer was changed."""
        return False
