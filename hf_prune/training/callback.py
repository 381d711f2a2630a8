"""Fine-tuning a pruned model with ``transformers.Trainer`` without losing its zeros.

One optimizer step is enough to fill the zeros of a pruned model back in: the gradient of a
pruned weight is not zero, and Adam's momentum keeps moving it. ``SparsityCallback`` keeps
every pruned weight at exactly zero:

* ``on_pre_optimizer_step`` (after gradient accumulation and clipping, before
  ``optimizer.step()``): the gradients of pruned entries are set to zero, so Adam's moments of
  those entries stay zero (at the first step, optimizer state that already exists, from
  ``resume_from_checkpoint`` say, is zeroed at the pruned entries too);
* ``on_optimizer_step`` (right after ``optimizer.step()``): the masks are applied to the
  weights again, which undoes anything the optimizer did to them anyway (state restored from
  elsewhere, weight decay, custom update rules).

By default (single process) the callback zeroes pruned gradients as backward accumulates
them instead, so that gradient clipping and the logged ``grad_norm`` count only the weights
being trained.
Gradient accumulation needs nothing special (Trainer calls both events once per optimizer
step); with fp16 the step may be skipped on overflow, and re-applying the masks is harmless.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from ..walker.layout import unwrap_model
from .masks import SparsityMasks, check_pruned_weights, pruning_record

logger = logging.get_logger(__name__)


class SparsityCallback(TrainerCallback):
    """Keeps a pruned model's pruned weights at exactly zero while ``Trainer`` trains it.

    Args:
        model: the model to be trained; if omitted, the masks are built from the model the
            Trainer passes at ``on_train_begin``. Build the callback after any freezing
            (LoRA), since only trainable weights get masks.
        pattern: override the record's pattern (``"unstructured"`` or ``"N:M"``).
        mask_in_backward: zero pruned gradients while backward accumulates them (once per
            micro-batch) rather than once before the step, so clipping and the logged gradient
            norm see only kept weights. Single process only: under multi-process data
            parallelism the gradients are zeroed before the step.
        store_nm: keep bool masks for N:M patterns too (1 byte per weight, faster steps)
            instead of recomputing them from the weights.

    ``masks`` is the ``SparsityMasks`` in use, ``steps`` the optimizer steps seen and
    ``seconds`` the time spent zeroing gradients and re-applying masks (hooks included).

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[SparsityCallback(model)])
    """

    def __init__(self, model: nn.Module | None = None, pattern: str | None = None,
                 mask_in_backward: bool = True, store_nm: bool = False) -> None:
        self.pattern = pattern
        self.mask_in_backward = mask_in_backward
        self.store_nm = store_nm
        self.masks: SparsityMasks | None = None
        if model is not None:
            self.masks = SparsityMasks.from_model(model, pattern, store_nm=store_nm)
        self.steps = 0
        self._state_cleared = False

    @property
    def seconds(self) -> float:
        return self.masks.seconds if self.masks is not None else 0.0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise NotImplementedError(
                "SparsityCallback works on whole (unsharded) parameters; DeepSpeed ZeRO and FSDP shard them. "
                "Train with a single device or DDP, or run without the callback and prune again afterwards"
            )
        if model is None and self.masks is None:
            raise ValueError("SparsityCallback got no model: pass it as SparsityCallback(model) or use it in a Trainer")
        if model is not None and (self.masks is None or not self.masks.owns(model)):
            self.masks = SparsityMasks.from_model(model, self.pattern, store_nm=self.store_nm)
        masks = self.masks
        self._state_cleared = False
        if not len(masks):
            logger.info("SparsityCallback: no trainable pruned weights (dense, structurally shrunk or frozen): "
                        "nothing to keep")
            return
        masks.apply()
        if self.mask_in_backward and getattr(args, "world_size", 1) == 1:
            masks.register_gradient_hooks()
        logger.info("SparsityCallback: keeping the zeros of %d weights (%s; %.1f MiB of stored masks)",
                    len(masks), masks.pattern, masks.memory_bytes / 2**20)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              optimizer: Any = None, **kwargs: Any) -> None:
        if self.masks is None or not len(self.masks):
            return
        if not self.masks.hooks_registered:
            self.masks.zero_gradients()
        if not self._state_cleared and optimizer is not None:
            self.masks.clear_optimizer_state(optimizer)
            self._state_cleared = True

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kwargs: Any) -> None:
        if self.masks is not None:
            self.masks.apply()
            self.steps += 1

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.masks is None:
            return
        self.masks.remove_gradient_hooks()
        broken = self.masks.violations()
        if broken:  # only possible if something wrote to the weights outside the optimizer step
            logger.warning("%d pruned entries were not zero at the end of training (written outside the optimizer "
                           "step?); the masks were applied again", broken)
            self.masks.apply()
        if self.steps:
            logger.info("SparsityCallback: %d steps, %.3fs per step in the callback", self.steps,
                        self.seconds / self.steps)


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool = False, dtype: torch.dtype | None = None,
                         pattern: str | None = None, mask_in_backward: bool = True,
                         store_nm: bool = False) -> SparsityCallback:
    """Get a pruned model ready for ``Trainer`` and return the ``SparsityCallback`` to pass it.

    Checks that the weights still match the pruning record (raises
    ``PruningRecordMismatchError`` otherwise), optionally casts the floating-point parameters
    to ``dtype`` (keep float32 for fp16/bf16 mixed precision: zeros stay zeros in any dtype),
    turns off the generation cache, switches to train mode and optionally enables gradient
    checkpointing. Freeze parameters (or add a LoRA adapter) before calling this: only
    trainable weights get masks.
    """
    base = unwrap_model(model)
    record = pruning_record(base)
    if record is not None:
        check_pruned_weights(base)
    else:
        logger.warning("the model has no pruning record: every exact zero of its decoder weights will be kept at zero")
    if dtype is not None:
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch dtype such as torch.float32, got {dtype}")
        model.to(dtype=dtype)
    if getattr(base, "config", None) is not None and hasattr(base.config, "use_cache"):
        base.config.use_cache = False
    if gradient_checkpointing:
        options = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # the name in recent transformers 5.x
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    model.train()
    return SparsityCallback(model, pattern=pattern, mask_in_backward=mask_in_backward, store_nm=store_nm)
