"""What a pruning method implements for the sequential engine.

The engine owns models, data and devices. A method sees one decoder layer at a time:
it says which input statistics each operator needs, then returns the pruned weight of
each operator once those statistics are complete. Methods that act on a whole layer
(structured ones) override ``finish_layer`` instead; ``start_layer`` sees the dense layer
first (to keep a dense copy of a block, say). Methods that decide over the whole model
(depth pruning: which decoder layers to remove) override ``finish_model``, called once after
the last layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..engine.forward import model_logits, run_layer
from ..engine.statistics import InputStatistics, StatKind
from .patterns import check_width, mask_from_scores

if TYPE_CHECKING:
    from ..config import PruningConfig
    from ..engine.capture import LayerCall
    from ..walker.layout import DecoderLayout, Operator


@dataclass
class LayerContext:
    """One decoder layer as the engine hands it to a method.

    ``inputs`` are the calibration hidden states entering the layer (``[n, seq, hidden]``,
    on ``device``), ``call`` the layer's other arguments (masks, rotary tables), ``targets``
    the operators to prune, ``sparsity`` this layer's target, and ``stats`` the input
    statistics collected during the pass (empty in ``start_layer``). ``outputs`` are the layer's
    outputs from that pass (``None`` in ``start_layer`` and when no pass ran); with operators
    pruned inside the pass they are the pruned layer's outputs, else the dense layer's.
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
    outputs: torch.Tensor | None = None

    def run(self, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's outputs for ``hidden`` (default: ``inputs``), batch by batch, without grad."""
        if self.call is None:
            raise ValueError("this layer was pruned without calibration data, so it cannot be run")
        return run_layer(self.layer, self.inputs if hidden is None else hidden, self.call, self.batch_size)


@dataclass
class ModelContext:
    """The whole model as the engine hands it to a method after the last layer (``finish_model``).

    ``input_ids`` are the calibration token ids (``[n, seq]``, CPU; ``None`` for data-free
    methods), ``batch_size`` the samples to run through the whole model at once (the config's
    ``batch_size``, else 1: a whole-model forward holds ``seq x vocab`` logits per sample).
    """

    layout: DecoderLayout
    input_ids: torch.Tensor | None
    device: torch.device
    batch_size: int

    def logits(self, input_ids: torch.Tensor, skip: tuple[int, ...] | list[int] = ()) -> torch.Tensor:
        """The model's fp32 logits (CPU) for ``input_ids`` with the decoder layers ``skip`` bypassed
        (each hands its input on unchanged, as if removed). The model runs where it is placed."""
        return model_logits(self.layout.model, self.layout.layers, input_ids, skip)


class LayerPruner(ABC):
    """The contract between the engine and a pruning method, one decoder layer at a time.

    The engine owns the model, the calibration data and the devices; a method never loads a
    model, tokenizes, or walks the network. For every decoder layer the engine:

    1. puts the layer on the device (onloading it from accelerate's store when offloaded) and
       calls :meth:`start_layer` with the dense layer;
    2. runs the calibration hidden states through it with a forward pre-hook on every
       targeted operator, summing the statistics :meth:`statistics_kind` asks for;
    3. if :attr:`prunes_operators`, replaces each operator's weight by
       :meth:`prune_operator`'s result: inside the pass, as soon as the operator's statistics
       are complete, when all samples go through at once (so later operators see the pruned
       earlier ones), else after the pass;
    4. calls :meth:`finish_layer`, where layer-wide methods (structured ones, FISTA, LLM-Barber)
       act, and recomputes the layer's outputs if anything changed after the pass;
    5. hands the outputs to the next layer (or, with :attr:`layers_take_dense_inputs`, the
       dense model's outputs) and puts the layer back;

    and once every layer was visited, calls :meth:`finish_model`, where a method may change the
    model as a whole (remove decoder layers). The engine reports which layers are left.

    Attributes:
        config (`PruningConfig`): the method's configuration.
        pattern (`Pattern`): the parsed sparsity pattern (unstructured or N:M).
        prunes_operators (`bool`, class attribute): whether the engine prunes each targeted
            operator through :meth:`prune_operator`. ``False`` for methods that change the
            layer as a whole in :meth:`finish_layer`.
        layers_take_dense_inputs (`bool`): whether every layer is pruned from the hidden
            states of the *dense* model rather than from the outputs of the already-pruned
            layers before it. Layers are then independent, and the engine spreads them over
            :attr:`worker_devices` and ``torchrun`` ranks.
        worker_devices (`list[str]` or `None`): devices to spread independent layers over;
            ``None`` lets the engine choose (every visible GPU, else the main device).
        observes_expert_outputs (`bool`, class attribute): whether the engine calls
            :meth:`observe_expert_output` with every routed expert's output during the
            statistics pass (mixture-of-experts layers; expert pruning scores experts from it).
        record_entries (`dict`): entries the method adds to the pruning record
            (``config.json["pruning_config"]``), keyed by record key, set while it runs. Each key
            must be listed in ``hf_prune.config.RECORD_KEYS`` (and validated in
            ``checkpoint.record``), or the saved record is refused on load.
    """

    prunes_operators: bool = True
    layers_take_dense_inputs: bool = False
    worker_devices: list[str] | None = None
    observes_expert_outputs: bool = False

    def __init__(self, config: PruningConfig) -> None:
        self.config = config
        self.pattern = config.parsed_pattern
        #: expert slice name -> calibration tokens its statistics counted (methods that use statistics)
        self.expert_tokens: dict[str, int] = {}
        #: expert slices pruned by magnitude because their expert got fewer tokens than the floor
        self.expert_fallbacks: set[str] = set()
        self.record_entries: dict = {}

    def validate_layout(self, layout: DecoderLayout) -> None:
        """Raise before any work if the model as a whole cannot take this method (shapes only:
        ``layout.model`` may be a skeleton on the meta device)."""
        return None

    def observe_expert_output(self, module: nn.Module, expert: int, gates: torch.Tensor | None,
                              output: torch.Tensor) -> None:
        """With :attr:`observes_expert_outputs`: expert ``expert`` of the experts ``module`` produced
        ``output`` (``[tokens, hidden]``, before its gate) for the tokens routed to it, whose router gate
        values are ``gates`` (``[tokens]``; ``None`` when the inputs already carry them, as in Llama 4)."""
        return None

    def statistics_kind(self, op: Operator) -> StatKind:
        """Which input statistics to collect for ``op`` (none by default)."""
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

    def finish_model(self, context: ModelContext) -> None:
        """Called once after every decoder layer was visited, with the whole model.

        For decisions across layers (which layers to remove, say). It may remove decoder layers
        (``hf_prune.surgery.layers.remove_layers``); the engine finds which remain by identity.
        """
        return None

    def prune_in_place(self, op: Operator, stats: InputStatistics | None, sparsity: float,
                       device: torch.device) -> None:
        """Prune ``op``'s weight in fp32 on ``device`` and write it back in place: the one place the
        engine replaces an operator's weight.

        An expert's slice whose statistics count fewer tokens than ``config.expert_token_floor``
        (or none: the expert was never routed a calibration token) is pruned by magnitude, in
        the same pattern and sparsity; ``expert_tokens`` and ``expert_fallbacks`` keep track.
        """
        weight = op.read_weight().to(device=device, dtype=torch.float32).clone()
        if op.expert is not None and self.statistics_kind(op) is not StatKind.NONE:
            tokens = stats.tokens if stats is not None else 0
            self.expert_tokens[op.name] = tokens
            if tokens < max(1, getattr(self.config, "expert_token_floor", 1)):
                self.expert_fallbacks.add(op.name)
                op.write_weight(weight.masked_fill_(mask_from_scores(weight.abs(), self.pattern, sparsity), 0.0))
                return
        op.write_weight(self.prune_operator(op, weight, stats, sparsity))
