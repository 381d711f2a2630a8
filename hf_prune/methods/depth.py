"""Depth pruning: remove whole decoder layers chosen on calibration data.

The engine's sequential pass gives every layer's input and output hidden states on the
calibration tokens; nothing is changed per layer. Once every layer was seen
(``finish_model``), the layers are scored and the chosen ones removed
(``hf_prune.surgery.layers.remove_layers``): the result is an ordinary, shallower model of its
family, whose config (``num_hidden_layers``, ``layer_types``) describes it by itself.

Scores (``score``):

* ``"angular"`` (Gromov et al., arXiv 2403.17887): for the block of ``n`` consecutive layers
  starting at ``l``, the angular distance ``arccos(cos(x_l, x_{l+n})) / π`` between the hidden
  states entering the block and leaving it, averaged over sampled calibration tokens; the
  block with the smallest distance is removed (one contiguous block).
* ``"block-influence"`` (ShortGPT, arXiv 2403.03853): ``1 − cos(x_l, x_{l+1})`` of each layer,
  averaged over all calibration tokens; the ``n`` layers with the smallest are removed.
* ``"skip-loss"`` / ``"skip-kl"`` (as in Minitron, arXiv 2407.14679): the increase of the
  calibration language-modelling loss, or the KL divergence from the full model's next-token
  distribution, when that one layer is bypassed in the whole model; the ``n`` layers with the
  smallest are removed. Costs one forward of the whole model per layer on ``score_samples``
  calibration samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers.utils import logging

from ..config import PruningConfig
from ..engine.statistics import InputStatistics, StatKind
from ..errors import PruningConfigError
from ..surgery.layers import remove_layers
from ..walker.layout import Operator
from .base import LayerContext, LayerPruner, ModelContext

logger = logging.get_logger(__name__)

SCORES = ("angular", "block-influence", "skip-loss", "skip-kl")
#: measured on SmolLM2-135M, 9 of 30 layers (README): within 5% of skip-kl's perplexity at 1/11 of its time,
#: one layer at a time on the device; angular's contiguous block was 1.6x worse
DEFAULT_SCORE = "block-influence"
DEFAULT_AMOUNT = 0.25


@dataclass
class DepthConfig(PruningConfig):
    """Remove whole decoder layers, chosen on calibration data.

    Args:
        amount: share of the decoder layers removed, in [0, 1) (rounded to the nearest count);
            default 0.25 unless ``num_layers`` is given. ``sparsity`` mirrors it.
        num_layers: exact number of decoder layers removed (instead of ``amount``).
        score: how layers are chosen: ``"block-influence"`` (default: the layers whose output is
            closest in angle to their input), ``"angular"`` (the contiguous block whose input and
            output differ least in angle), ``"skip-loss"`` or ``"skip-kl"`` (the layers whose
            removal changes the calibration loss or the output distribution least); see the
            module docstring. Measured on SmolLM2-135M (9 of 30 layers removed, README):
            skip-kl 87.7, block-influence 91.8, angular 145.5 perplexity, skip-kl taking 11x
            the time of block-influence.
        score_tokens: calibration positions sampled (with ``seed``) to measure angular
            distances between non-adjacent layers; every position is used for adjacent ones.
        score_samples: calibration samples the whole model is run on, once per layer, for the
            ``skip-*`` scores.

    The pruned model keeps its layer widths; its config's ``num_hidden_layers`` and per-layer
    lists (``layer_types``) describe the kept layers, so plain transformers and vLLM load it.
    """

    method: ClassVar[str] = "depth"
    paper: ClassVar[str] = "https://arxiv.org/abs/2403.17887"

    sparsity: float | None = None
    amount: float | None = None
    num_layers: int | None = None
    score: str = DEFAULT_SCORE
    score_tokens: int = 8192
    score_samples: int = 16

    def __post_init__(self) -> None:
        self._check_types()  # amount, sparsity and num_layers are compared before the shared checks run
        self._resolve_amount("num_layers", 0, "layers removed", "decoder layers", DEFAULT_AMOUNT)
        if self.pattern != "unstructured":
            raise PruningConfigError(
                "pattern", f"pattern={self.pattern!r} does not apply to depth pruning, which removes whole layers; "
                "prune again afterwards with e.g. WandaConfig(pattern='2:4')"
            )
        super().__post_init__()
        if self.score not in SCORES:
            raise PruningConfigError("score", f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        for name in ("score_tokens", "score_samples"):
            value = getattr(self, name)
            if value < 1:
                raise PruningConfigError(name, f"{name} must be a positive integer, got {value!r}")
        if self.targets is not None:
            raise PruningConfigError("targets", "depth pruning removes whole decoder layers; leave targets unset")
        if self.owl is not None:
            raise PruningConfigError("owl", "owl sets unstructured per-layer sparsities and does not apply to depth "
                                     "pruning")

    def layers_to_remove(self, layers: int) -> int:
        """How many of ``layers`` decoder layers this config removes."""
        count = self.num_layers if self.num_layers is not None else math.floor(layers * self.amount + 0.5)
        if count >= layers:
            raise ValueError(
                f"removing {count} of the model's {layers} decoder layers would leave none; lower amount/num_layers"
            )
        return count


def cosine_per_token(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """``cos(x, y)`` of every position (fp32, flattened), one sample at a time."""
    return torch.cat([F.cosine_similarity(x.float(), y.float(), dim=-1, eps=1e-8).reshape(-1)
                      for x, y in zip(inputs, outputs)])


def angular_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean of ``arccos(cos(x_t, y_t)) / π`` over the rows ``t`` of two ``[tokens, hidden]`` tensors."""
    cos = F.cosine_similarity(x.float(), y.float(), dim=-1, eps=1e-8).clamp(-1.0, 1.0)
    return (torch.arccos(cos) / math.pi).mean()


def best_block(states: list[torch.Tensor], count: int) -> tuple[int, list[float]]:
    """Start of the ``count`` consecutive layers whose input ``states[l]`` and output ``states[l+count]``
    are closest in angle, and the distance of every start."""
    distances = [float(angular_distance(states[start], states[start + count]))
                 for start in range(len(states) - count)]
    return min(range(len(distances)), key=lambda start: (distances[start], start)), distances


class DepthPruner(LayerPruner):
    """Measures each layer during the engine's pass, removes the chosen layers in ``finish_model``."""

    prunes_operators = False

    def __init__(self, config: DepthConfig) -> None:
        super().__init__(config)
        self.config: DepthConfig = config
        self.block_influence: list[float] = []
        self.sampled_states: list[torch.Tensor] = []  # x_0 .. x_L at the sampled positions (CPU, fp32)
        self._positions: torch.Tensor | None = None
        #: the scores of the last run, per layer (or per block start for "angular")
        self.scores: list[float] = []

    def statistics_kind(self, op: Operator) -> StatKind:
        return StatKind.NONE

    def validate(self, op: Operator) -> None:
        return None

    def prune_weight(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: float) -> torch.Tensor:
        raise TypeError("depth pruning removes whole decoder layers in finish_model, not weights")

    def _sample(self, states: torch.Tensor) -> torch.Tensor:
        flat = states.reshape(-1, states.shape[-1])
        if self._positions is None:
            generator = torch.Generator().manual_seed(self.config.seed)
            count = min(self.config.score_tokens, flat.shape[0])
            self._positions = torch.randperm(flat.shape[0], generator=generator)[:count].sort().values
        return flat[self._positions.to(flat.device)].float().cpu()

    def finish_layer(self, context: LayerContext) -> bool:
        if self.config.score.startswith("skip-"):
            return False
        if context.inputs is None or context.outputs is None:
            raise ValueError("depth pruning needs calibration data: the layers' hidden states are compared")
        if self.config.score == "block-influence":
            self.block_influence.append(1.0 - float(cosine_per_token(context.inputs, context.outputs).mean()))
        else:
            if context.index == 0:
                self.sampled_states.append(self._sample(context.inputs))
            self.sampled_states.append(self._sample(context.outputs))
        return False

    def finish_model(self, context: ModelContext) -> None:
        layers = len(context.layout)
        count = self.config.layers_to_remove(layers)
        if self.config.score == "angular":
            start, self.scores = best_block(self.sampled_states, count) if count else (0, [])
            removed = list(range(start, start + count))
        else:
            if self.config.score == "block-influence":
                self.scores = self.block_influence
            else:
                self.scores = self._skip_scores(context)
            order = sorted(range(layers), key=lambda index: (self.scores[index], index))
            removed = sorted(order[:count])
        self.sampled_states.clear()
        logger.info("depth pruning (%s): removing decoder layers %s of %d; scores %s", self.config.score, removed,
                    layers, [round(s, 5) for s in self.scores])
        if removed:
            remove_layers(context.layout, [i for i in range(layers) if i not in set(removed)])

    def _skip_scores(self, context: ModelContext) -> list[float]:
        """Per layer: the calibration loss increase (``skip-loss``) or mean KL to the full model
        (``skip-kl``) when that layer alone is bypassed."""
        if context.input_ids is None:
            raise ValueError("depth pruning needs calibration data: the model is run with each layer bypassed")
        layers = len(context.layout)
        ids = context.input_ids[: self.config.score_samples]
        totals = torch.zeros(layers, dtype=torch.float64)
        tokens = 0
        batches = range(0, ids.shape[0], context.batch_size)
        for start in logging.tqdm(batches, desc="Scoring layers by skipping", unit="batch"):
            batch = ids[start:start + context.batch_size]
            labels = batch[:, 1:].reshape(-1)
            full = torch.log_softmax(context.logits(batch)[:, :-1].reshape(labels.numel(), -1), dim=-1)
            full_loss = F.nll_loss(full, labels, reduction="sum")
            for index in range(layers):
                skipped = torch.log_softmax(context.logits(batch, skip=[index])[:, :-1].reshape_as(full), dim=-1)
                if self.config.score == "skip-loss":
                    totals[index] += float(F.nll_loss(skipped, labels, reduction="sum") - full_loss)
                else:
                    totals[index] += float(F.kl_div(skipped, full, log_target=True, reduction="sum"))
            tokens += labels.numel()
        return (totals / max(tokens, 1)).tolist()
