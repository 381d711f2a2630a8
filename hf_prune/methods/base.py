"""What a pruning method implements for the sequential engine.

The engine owns models, data and devices. A method sees one decoder layer at a time:
it says which input statistics each operator needs, then returns the pruned weight of
each operator once those statistics are complete. Methods that act on a whole layer
(structured ones) override ``finish_layer`` instead; ``start_layer`` sees the dense layer
first (to keep a dense copy of a block, say).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..patterns import check_width
from ..statistics import InputStatistics, StatKind

if TYPE_CHECKING:
    from ..architectures import DecoderLayout, Operator
    from ..capture import LayerCall
    from ..config import PruningConfig


@dataclass
class LayerContext:
    """One decoder layer as the engine hands it to a method.

    ``inputs`` are the calibration hidden states entering the layer (``[n, seq, hidden]``,
    on ``device``), ``call`` the layer's other arguments (masks, rotary tables), ``targets``
    the operators to prune, ``sparsity`` this layer's target, and ``stats`` the input
    statistics collected during the pass (empty in ``start_layer``).
    """

    layout: DecoderLayout
    index: int
    layer: nn.Module
    inputs: torch.Tensor | None
    call: LayerCall | None
    targets: list[Operator]
    sparsity: float
    device: torch.device
    batch_size: int
    stats: dict[str, InputStatistics] = field(default_factory=dict)

    def run(self, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's outputs for ``hidden`` (default: ``inputs``), batch by batch, without grad."""
        from ..layer_pass import run_layer

        if self.call is None:
            raise ValueError("this layer was pruned without calibration data, so it cannot be run")
        return run_layer(self.layer, self.inputs if hidden is None else hidden, self.call, self.batch_size)


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

    def start_layer(self, context: LayerContext) -> None:
        """Called with the layer on the device before its statistics pass (nothing pruned yet)."""
        return None

    def finish_layer(self, context: LayerContext) -> bool:
        """Called after the layer's statistics pass and operator pruning.

        Return True if the layer was changed here, so that the engine recomputes its outputs.
        """
        return False
