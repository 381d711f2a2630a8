"""Recovering a pruned model's quality by distillation from its dense teacher.

The student (the pruned model) is trained to match the teacher's next-token distribution:

* **KL on the logits**: forward KL ``KL(p_teacher || p_student)`` of the distributions at
  temperature ``T``, scaled by ``T²`` (so the gradient's size does not depend on ``T``),
  averaged over the tokens the attention mask keeps;
* optionally **hidden states**: the mean squared error between each student decoder layer's
  output and the output of the teacher layer it came from, divided by the mean square of the
  teacher's (so layers with large activations do not dominate). After depth pruning the
  student's layer ``i`` is the teacher's ``structure.kept_layers[i]`` of the pruning record;
* optionally mixed with the **LM loss**: ``(1 - lm_weight) * KL + lm_weight * CE``.

Memory: the logits are never materialised for the whole batch. Both models are run up to
their last hidden state; the KL (and the LM loss) are then computed over chunks of
``chunk_size`` tokens, each chunk applying the LM heads, so only ``[chunk x vocab]`` logits of
each model exist at once (``losses.chunked_distillation_losses``). The gradient of each chunk is
taken as soon as its loss is known, so the backward pass recomputes nothing: a 150k-vocabulary model
never holds ``[tokens x vocab]`` (let alone twice). Before the first step each model's
"hidden state -> LM head" path is checked against its own ``forward`` on one sequence; a
model whose forward transforms the logits in a way hf_prune does not know (beyond Gemma's
soft-capping, Cohere's ``logit_scale`` and Granite's ``logits_scaling``) falls back to full
logits, with a warning.

The teacher runs in eval mode under ``torch.no_grad`` on its own device (``teacher_device``,
or where it is when accelerate dispatched or offloaded it with ``device_map``); only the
student's parameters are trained. The zeros of an unstructured or N:M student are kept by
``SparsityCallback``; a structurally shrunk or depth-pruned student keeps its shapes since
training never changes them; a LoRA adapter is merged back with
``merge_lora_keep_sparsity``.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from ..walker.discovery import find_decoder_layers
from ..walker.layout import unwrap_model
from .losses import (
    DEFAULT_CHUNK_SIZE,
    chunked_distillation_losses,
    hidden_state_loss,
)
from .masks import pruning_record

logger = logging.get_logger(__name__)

# --------------------------------------------------------------------------- running the models


def _text_config(model: nn.Module) -> Any:
    config = unwrap_model(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class LogitsPath:
    """How to get a model's last hidden states and turn rows of them into logits.

    ``features(...)`` runs the model's backbone (``model.base_model``) only, ``head(rows)``
    applies the LM head and the logit transforms of the family's forward. ``full=True``
    (a model whose forward does something else) runs the whole model and ``head`` is the
    identity.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        base = unwrap_model(model)
        self.base = base
        self.backbone = getattr(base, "base_model", None)
        self.output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        config = _text_config(model)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.scale = getattr(config, "logit_scale", None)  # Cohere multiplies
        self.divide = getattr(config, "logits_scaling", None)  # Granite divides
        self.full = self.backbone is None or self.backbone is base or self.output is None
        self.checked = False

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        if self.full:
            return rows
        if self.output.weight.device.type != "meta":  # offloaded by accelerate: its hook moves the input
            rows = rows.to(self.output.weight.device)
        logits = self.output(rows)
        if isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool):
            logits = logits * self.scale
        if isinstance(self.divide, (int, float)) and not isinstance(self.divide, bool):
            logits = logits / self.divide
        if isinstance(self.softcap, (int, float)) and self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.full:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    @torch.no_grad()
    def check(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, name: str) -> None:
        """Compare ``head(features)`` with the model's own logits on one sequence; fall back to full logits."""
        if self.checked or self.full:
            self.checked = True
            return
        self.checked = True
        was_training = self.model.training
        self.model.eval()
        try:
            ids = input_ids[:1]
            mask = attention_mask[:1] if attention_mask is not None else None
            reference = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            ours = self.head(self.features(ids, mask)).float().to(reference.device)
        finally:
            self.model.train(was_training)
        tolerance = 1e-3 * max(float(reference.abs().max()), 1.0)
        if ours.shape != reference.shape or not torch.allclose(ours, reference, rtol=1e-3, atol=tolerance):
            logger.warning("the %s's logits are not its LM head applied to its last hidden state (a logit transform "
                           "hf_prune does not know); distilling with its full logits, which holds [tokens x vocab]",
                           name)
            self.full = True


@contextmanager
def capture_layer_outputs(model: nn.Module, indices: list[int]) -> Iterator[list[torch.Tensor | None]]:
    """Record the outputs of the decoder layers ``indices`` while the block runs (in that order)."""
    _, layers = find_decoder_layers(unwrap_model(model))
    outputs: list[torch.Tensor | None] = [None] * len(indices)
    handles = []
    for slot, index in enumerate(indices):
        def hook(module: nn.Module, args: Any, output: Any, slot: int = slot) -> None:
            outputs[slot] = output[0] if isinstance(output, (tuple, list)) else output

        handles.append(layers[index].register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _layer_count(model: nn.Module) -> int:
    return len(find_decoder_layers(unwrap_model(model))[1])


def default_layer_map(student: nn.Module, teacher: nn.Module) -> dict[int, int]:
    """Student decoder layer -> teacher decoder layer for the hidden-state loss.

    A depth-pruned student's pruning record names the dense index of each kept layer
    (``structure.kept_layers``); a student with as many layers as the teacher maps each layer
    to itself. Raises ``ValueError`` otherwise, asking for ``layer_map``.
    """
    students, teachers = _layer_count(student), _layer_count(teacher)
    structure = (pruning_record(student) or {}).get("structure") or {}
    kept = structure.get("kept_layers")
    if isinstance(kept, list) and len(kept) == students:
        if max(kept, default=-1) >= teachers:
            raise ValueError(f"the student's pruning record says its layers are the teacher's {kept}, but the teacher "
                             f"has {teachers} decoder layers: is it the model the student was pruned from?")
        return {i: int(k) for i, k in enumerate(kept)}
    if students == teachers:
        return {i: i for i in range(students)}
    raise ValueError(f"the student has {students} decoder layers and the teacher {teachers}, and the student's pruning "
                     "record does not say which teacher layers it kept; pass layer_map={student_layer: teacher_layer}")


def check_pair(student: nn.Module, teacher: nn.Module) -> None:
    """Raise ``ValueError`` if the teacher cannot teach the student: another vocabulary, shared weights."""
    if student is teacher or unwrap_model(student) is unwrap_model(teacher):
        raise ValueError("the teacher is the student itself; load the dense model separately as the teacher")
    s_head = unwrap_model(student).get_output_embeddings()
    t_head = unwrap_model(teacher).get_output_embeddings()
    s_vocab = s_head.weight.shape[0] if s_head is not None else _text_config(student).vocab_size
    t_vocab = t_head.weight.shape[0] if t_head is not None else _text_config(teacher).vocab_size
    if s_vocab != t_vocab:
        raise ValueError(f"the student predicts {s_vocab} tokens and the teacher {t_vocab}: distillation on the logits "
                         "needs the same vocabulary (the teacher must be the model the student was pruned from, or "
                         "share its tokenizer)")
    student_storage = {p.data_ptr() for p in student.parameters() if p.device.type != "meta"}
    if any(p.data_ptr() in student_storage for p in teacher.parameters() if p.device.type != "meta"):
        raise ValueError("the teacher shares weights with the student (pruning in place changed both?); load a "
                         "separate copy of the dense model as the teacher")


# --------------------------------------------------------------------------- the Trainer


@dataclass
class DistillationConfig:
    """How the student learns from the teacher.

    Args:
        temperature: ``T`` of the KL on the logits (scaled by ``T²``).
        lm_weight: ``α`` in ``(1 - α) * KL + α * LM loss``; 0 distils only, 1 is plain
            fine-tuning (the teacher then serves the hidden-state loss only, and without one
            it does not run at all).
        hidden_weight: weight of the hidden-state loss added to that (0: not computed).
        layer_map: student decoder layer -> teacher decoder layer for the hidden-state loss
            (default: ``default_layer_map``, from the pruning record after depth pruning).
        chunk_size: tokens per chunk of the KL.
        teacher_device: where the teacher runs (``"cuda:1"``, ``"cpu"``...); default the
            student's device, unless accelerate placed the teacher (``hf_device_map``).
    """

    temperature: float = 1.0
    lm_weight: float = 0.0
    hidden_weight: float = 0.0
    layer_map: dict[int, int] | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    teacher_device: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")
        if isinstance(self.lm_weight, bool) or not isinstance(self.lm_weight, (int, float)) \
                or not 0 <= self.lm_weight <= 1:
            raise ValueError(f"lm_weight must be in [0, 1] (the share of the LM loss), got {self.lm_weight!r}")
        if isinstance(self.hidden_weight, bool) or not isinstance(self.hidden_weight, (int, float)) \
                or not 0 <= self.hidden_weight < math.inf:
            raise ValueError(f"hidden_weight must be a non-negative number, got {self.hidden_weight!r}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {self.chunk_size!r}")
        if self.layer_map is not None:
            if not isinstance(self.layer_map, dict) or not self.layer_map or not all(
                    isinstance(k, int) and isinstance(v, int) and k >= 0 and v >= 0 for k, v in self.layer_map.items()):
                raise ValueError("layer_map must map student layer indices to teacher layer indices (non-negative "
                                 f"integers), got {self.layer_map!r}")

    @property
    def uses_teacher(self) -> bool:
        """Whether any part of the loss needs the teacher (plain fine-tuning, ``lm_weight=1`` with no
        hidden-state loss, does not)."""
        return self.lm_weight < 1 or self.hidden_weight > 0


class DistillationTrainer(Trainer):
    """``transformers.Trainer`` that trains the model (the student) to match a teacher.

    Args:
        teacher: the dense model the student was pruned from (same vocabulary).
        distillation: a ``DistillationConfig`` (default: KL at ``T = 1`` only).
        *args, **kwargs: as ``Trainer``. Pass ``callbacks=[SparsityCallback(model)]`` (see
            ``prepare_for_training``) to keep a sparse student's zeros.

    The loss is ``(1 - lm_weight) * KL + lm_weight * LM + hidden_weight * hidden``; the logged
    ``distill_kl``, ``distill_lm`` and ``distill_hidden`` are its parts averaged since the
    last log. The dataset's items need ``input_ids`` (and ``labels`` when ``lm_weight > 0``).

    Example::

        trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=data,
                                      callbacks=[prepare_for_training(student)])
        train_output = trainer.train()
    """

    def __init__(self, *args: Any, teacher: nn.Module, distillation: DistillationConfig | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.distillation = distillation or DistillationConfig()
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean: Trainer divides by the
        self.model_accepts_loss_kwargs = False  # accumulation steps (the second line for older transformers)
        check_pair(self.model, teacher)
        self.teacher = teacher
        self._place_teacher()
        self.teacher.eval()
        self._student_path = LogitsPath(self.model)
        self._teacher_path = LogitsPath(teacher)
        self.layer_map: dict[int, int] | None = None
        if self.distillation.hidden_weight > 0:
            self.layer_map = dict(self.distillation.layer_map or default_layer_map(self.model, teacher))
            self._check_layer_map()
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, PerplexityCallback):
                callback.trainer = self

    def _place_teacher(self) -> None:
        placed = getattr(self.teacher, "hf_device_map", None)
        if self.distillation.teacher_device is not None:
            if placed and len(set(placed.values())) > 1:
                raise ValueError("the teacher is spread over devices by accelerate (hf_device_map); leave "
                                 "teacher_device unset")
            self.teacher.to(self.distillation.teacher_device)
        elif not placed:
            self.teacher.to(self.args.device)

    def _check_layer_map(self) -> None:
        students, teachers = _layer_count(self.model), _layer_count(self.teacher)
        assert self.layer_map is not None
        bad = {k: v for k, v in self.layer_map.items() if k >= students or v >= teachers}
        if bad:
            raise ValueError(f"layer_map {bad} names layers the models lack (student {students}, teacher {teachers} "
                             "decoder layers)")
        s_hidden = getattr(_text_config(self.model), "hidden_size", None)
        t_hidden = getattr(_text_config(self.teacher), "hidden_size", None)
        if s_hidden != t_hidden:
            raise ValueError(f"the hidden-state loss compares states of the same width; the student's are {s_hidden} "
                             f"wide and the teacher's {t_hidden}. Set hidden_weight=0")

    def _teacher_inputs(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        device = unwrap_model(self.teacher).get_input_embeddings().weight.device
        return tensor.to(device) if device.type != "meta" else tensor

    def distillation_losses(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The parts of the loss on one batch: ``kl``, ``lm`` (if weighted), ``hidden`` (if weighted), ``loss``."""
        config = self.distillation
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        labels = inputs.get("labels") if config.lm_weight > 0 else None
        if config.lm_weight > 0 and labels is None:
            labels = input_ids.masked_fill(attention_mask == 0, -100) if attention_mask is not None else input_ids
        if not self._student_path.checked:
            self._student_path.check(input_ids, attention_mask, "student")
            if config.uses_teacher:
                self._teacher_path.check(self._teacher_inputs(input_ids), self._teacher_inputs(attention_mask),
                                         "teacher")
        map_items = sorted((self.layer_map or {}).items())
        teacher_hidden = None
        with capture_layer_outputs(self.teacher, [t for _, t in map_items]) as teacher_states, torch.no_grad():
            if config.uses_teacher:  # plain fine-tuning (lm_weight=1, no hidden loss) never runs the teacher
                teacher_hidden = self._teacher_path.features(self._teacher_inputs(input_ids),
                                                             self._teacher_inputs(attention_mask))
        if config.lm_weight == 1:  # the KL weighs nothing: its LM heads and softmaxes are not computed
            teacher_hidden = None
        with capture_layer_outputs(model, [s for s, _ in map_items]) as student_states:
            student_hidden = self._student_path.features(input_ids, attention_mask)
        losses = chunked_distillation_losses(
            student_hidden, teacher_hidden, self._student_path.head, self._teacher_path.head,
            temperature=config.temperature, chunk_size=config.chunk_size, mask=attention_mask, labels=labels,
            kl_weight=1 - config.lm_weight, lm_weight=config.lm_weight,
        )
        parts = {"kl": losses.kl} if teacher_hidden is not None else {}
        loss = losses.loss
        if losses.lm is not None:
            parts["lm"] = losses.lm
        if map_items:
            parts["hidden"] = hidden_state_loss(student_states, teacher_states, attention_mask)  # type: ignore[arg-type]
            loss = loss + config.hidden_weight * parts["hidden"]
        parts["loss"] = loss
        return parts

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> AbstractContextManager:
        """The mixed-precision context of ``bf16=True`` / ``fp16=True`` around the loss.

        Accelerate applies mixed precision by wrapping the model's ``forward``; the distillation loss runs
        the student's backbone and LM head directly (so that its logits exist a chunk at a time), which
        that wrapper never sees. Without this, ``bf16=True`` would silently train in float32.
        """
        return self.accelerator.autocast() if self.accelerator.native_amp else nullcontext()

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """The distillation loss of one micro-batch (a mean over its tokens)."""
        parts = self.distillation_losses(model, inputs)
        if model.training:
            for key, value in parts.items():
                if key != "loss":
                    self._sums[key] = self._sums.get(key, 0.0) + float(value.detach())
                    self._counts[key] = self._counts.get(key, 0) + 1
        loss = parts["loss"]
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's log, with the loss's parts averaged since the last one."""
        if "loss" in logs:
            for key, total in self._sums.items():
                logs[f"distill_{key}"] = round(total / max(self._counts[key], 1), 6)
            self._sums.clear()
            self._counts.clear()
        super().log(logs, start_time)


class PerplexityCallback(TrainerCallback):
    """Measures the model's perplexity every ``every`` optimizer steps and logs it (``eval_perplexity``).

    ``history`` holds ``(step, perplexity)`` and ``seconds`` the time the measurements took. A
    ``DistillationTrainer`` given this callback logs through ``Trainer.log`` (progress bar,
    ``report_to`` integrations); otherwise the value is logged with transformers' logger and
    added to ``state.log_history``.
    """

    def __init__(self, tokenizer: Any, text: Any, every: int, seq_len: int = 512, max_windows: int | None = 16) -> None:
        if every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        self.tokenizer = tokenizer
        self.text = text
        self.every = every
        self.seq_len = seq_len
        self.max_windows = max_windows
        self.history: list[tuple[int, float]] = []
        self.seconds = 0.0  # spent measuring, inside the Trainer's runtime
        self.trainer: Trainer | None = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None or state.global_step % self.every:
            return
        from ..data.evaluation import evaluate_perplexity

        start = time.perf_counter()
        value = evaluate_perplexity(unwrap_model(model), self.tokenizer, self.text, self.seq_len, self.max_windows)
        self.seconds += time.perf_counter() - start
        self.history.append((state.global_step, value))
        if self.trainer is not None:
            self.trainer.log({"eval_perplexity": round(value, 4)})
        else:
            state.log_history.append({"eval_perplexity": round(value, 4), "step": state.global_step})
            logger.info("step %d: perplexity %.3f", state.global_step, value)


# --------------------------------------------------------------------------- measuring and the convenience


@torch.no_grad()
def evaluate_kl(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor, batch_size: int = 1,
                chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """Mean per-token ``KL(teacher || student)`` (temperature 1, nats) on token windows ``[n, seq]``."""
    check_pair(student, teacher)
    student_path, teacher_path = LogitsPath(student), LogitsPath(teacher)
    s_device = unwrap_model(student).get_input_embeddings().weight.device
    t_device = unwrap_model(teacher).get_input_embeddings().weight.device
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    total, tokens = 0.0, 0
    try:
        for start in logging.tqdm(range(0, input_ids.shape[0], batch_size), desc="KL to the teacher", unit="batch",
                                  leave=False):
            batch = input_ids[start:start + batch_size]
            if not student_path.checked:
                student_path.check(batch.to(s_device), None, "student")
                teacher_path.check(batch.to(t_device), None, "teacher")
            losses = chunked_distillation_losses(
                student_path.features(batch.to(s_device), None), teacher_path.features(batch.to(t_device), None),
                student_path.head, teacher_path.head, temperature=1.0, chunk_size=chunk_size,
            )
            total += float(losses.kl) * losses.tokens
            tokens += losses.tokens
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return total / max(tokens, 1)


@dataclass
class DistillationResult:
    """What ``distill`` did: the trained model and the measurements before and after.

    ``kl_*`` is the mean per-token KL to the teacher (temperature 1) on ``kl_windows``
    windows of the evaluation text (of the training text when none was given);
    ``perplexity_*`` is measured on the evaluation text, ``None`` without one;
    ``train_seconds`` is the training's wall time (``Trainer``'s ``train_runtime``), without
    the measurements before and after nor the perplexities taken every ``eval_every`` steps
    (``eval_seconds``).
    """

    model: nn.Module = field(repr=False)
    steps: int
    tokens: int
    kl_before: float
    kl_after: float
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    train_losses: list[float] = field(default_factory=list)
    perplexity_history: list[tuple[int, float]] = field(default_factory=list)
    merge: dict[str, Any] | None = None
    train_seconds: float | None = None
    eval_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("model")
        return values

    def __str__(self) -> str:
        text = f"distilled {self.steps} steps ({self.tokens:,} tokens): KL to the teacher {self.kl_before:.4f} -> " \
               f"{self.kl_after:.4f}"
        if self.perplexity_before is not None and self.perplexity_after is not None:
            text += f", perplexity {self.perplexity_before:.3f} -> {self.perplexity_after:.3f}"
        return text


def _training_seconds(runtime: float | None, tracker: PerplexityCallback | None) -> float | None:
    """The Trainer's runtime less the perplexity measurements taken during training."""
    if runtime is None:
        return None
    return max(runtime - (tracker.seconds if tracker is not None else 0.0), 0.0)


def training_windows(data: Any, tokenizer: Any, seq_len: int, count: int) -> list[dict[str, torch.Tensor]]:
    """Causal-LM examples of ``seq_len`` tokens from ``data``: token ids ``[n, seq]``, a list of such
    dicts, or text (a dataset name such as ``"c4-sample"``, a file, strings, raw text), cut into
    non-overlapping windows (at most ``count``)."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise ValueError(f"token ids must be [samples, seq_len], got shape {tuple(data.shape)}")
        windows = data[:count].long()
    elif isinstance(data, (list, tuple)) and data and all(isinstance(d, dict) for d in data):
        return list(data[:count])
    else:
        if tokenizer is None:
            raise ValueError("text training data needs the tokenizer: pass tokenizer=")
        from ..data.evaluation import evaluation_windows

        windows = evaluation_windows(tokenizer, data, seq_len, count)
    return [{"input_ids": w, "labels": w.clone()} for w in windows]


def record_distillation(model: nn.Module, entry: dict[str, Any]) -> dict[str, Any] | None:
    """Store what distillation did in the model's pruning record (``pruning_config["distillation"]``).

    ``save_pretrained`` then writes it to config.json and the model card's "Recovery" section.
    Returns the stored entry, or ``None`` for a model without a pruning record.
    """
    from ..checkpoint.record import check_distillation_entry

    record = pruning_record(model)
    if record is None:
        logger.info("the student has no pruning record; the distillation is not recorded")
        return None
    clean = {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in entry.items()}  # 6 significant digits
    check_distillation_entry(clean, ".distillation")
    record["distillation"] = clean
    return clean


def _teacher_name(teacher: nn.Module) -> str:
    """The teacher as the record may name it: its hub id when known, else a path-free name."""
    from ..checkpoint.provenance import describe_source, public_source_name

    try:
        model = describe_source(unwrap_model(teacher)).get("model")
    except Exception:  # noqa: BLE001 - naming is best effort
        model = None
    if model:
        return str(model)
    name = str(getattr(unwrap_model(teacher), "name_or_path", "") or "")
    return public_source_name(name)[:200] if name else "unknown"


def distill(student: nn.Module, teacher: nn.Module, data: Any, tokenizer: Any = None, *, steps: int = 100,
            seq_len: int = 512, batch_size: int = 4, gradient_accumulation_steps: int = 1,
            learning_rate: float = 5e-5, weight_decay: float = 0.0, warmup_steps: int = 0,
            temperature: float = 1.0, lm_weight: float = 0.0, hidden_weight: float = 0.0,
            layer_map: dict[int, int] | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
            teacher_device: str | None = None, eval_text: Any = None, eval_every: int | None = None,
            eval_seq_len: int = 512, eval_windows: int | None = 16, kl_windows: int = 8, lora: bool = False,
            lora_rank: int = 16, logging_steps: int = 10, seed: int = 0, output_dir: str | None = None,
            training_args: dict[str, Any] | None = None, record: bool = True,
            teacher_name: str | None = None) -> DistillationResult:
    """Train a pruned ``student`` against its dense ``teacher`` and measure the recovery.

    Args:
        student: the pruned model (any kind: unstructured, N:M, structurally shrunk,
            depth-pruned); trained in place (with ``lora=True``, through an adapter merged back
            keeping the zeros: the returned ``result.model`` is then the merged model).
        teacher: the dense model it was pruned from; never trained.
        data: training text (``"c4-sample"``, a file, strings, raw text), token ids
            ``[n, seq]`` or a list of ``{"input_ids", "labels"}`` dicts.
        tokenizer: needed for text data and ``eval_text``.
        steps: optimizer steps; each sees ``batch_size * gradient_accumulation_steps``
            sequences of ``seq_len`` tokens (the windows are reused when the data runs out).
        temperature, lm_weight, hidden_weight, layer_map, chunk_size, teacher_device: see
            ``DistillationConfig``.
        eval_text: text for perplexity before, after and every ``eval_every`` steps, and for
            the KL before/after (on its first ``kl_windows`` windows).
        lora: train a LoRA adapter of rank ``lora_rank`` instead of the weights themselves.
        training_args: more ``TrainingArguments`` fields (they win over the ones set here), e.g.
            ``{"bf16": True}`` for bfloat16 mixed precision: float32 weights, bfloat16 matmuls in the
            student's and the teacher's forward and the LM heads (on a GPU, or a CPU with AMX or
            AVX-512 BF16, about twice as fast). The record names it (``mixed_precision``).
        record: store the recovery in the pruning record (``pruning_config["distillation"]``),
            which ``save_pretrained`` writes to config.json and the model card.
        teacher_name: how the record names the teacher (default its hub id when known).

    Returns:
        a ``DistillationResult``: the model, KL to the teacher and perplexity before and after.
    """
    from .callback import prepare_for_training
    from .masks import check_pruned_weights

    if steps < 1:
        raise ValueError(f"steps must be a positive number, got {steps}")
    config = DistillationConfig(temperature=temperature, lm_weight=lm_weight, hidden_weight=hidden_weight,
                                layer_map=layer_map, chunk_size=chunk_size, teacher_device=teacher_device)
    check_pair(student, teacher)
    if config.hidden_weight > 0 and config.layer_map is None:
        config.layer_map = default_layer_map(student, teacher)  # fails now, not after the first measurements
    needed = steps * batch_size * gradient_accumulation_steps
    train_data = training_windows(data, tokenizer, seq_len, needed)
    if len(train_data) < needed:
        logger.warning("the training data holds %d windows of %d tokens; %d steps need %d, so windows are seen more "
                       "than once", len(train_data), seq_len, steps, needed)
    if eval_text is not None:
        if tokenizer is None:
            raise ValueError("eval_text needs the tokenizer: pass tokenizer=")
        from ..data.evaluation import evaluation_windows

        kl_ids = evaluation_windows(tokenizer, eval_text, eval_seq_len, kl_windows)
    else:
        kl_ids = torch.stack([example["input_ids"] for example in train_data[:kl_windows]])

    def perplexity(model: nn.Module) -> float | None:
        if eval_text is None:
            return None
        from ..data.evaluation import evaluate_perplexity

        return evaluate_perplexity(model, tokenizer, eval_text, eval_seq_len, eval_windows)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not getattr(student, "hf_device_map", None):
        student.to(device)
    if not getattr(teacher, "hf_device_map", None):
        teacher.to(teacher_device or device)
    kl_before = evaluate_kl(student, teacher, kl_ids, chunk_size=chunk_size)
    perplexity_before = perplexity(student)
    logger.info("before distillation: KL to the teacher %.4f%s", kl_before,
                f", perplexity {perplexity_before:.3f}" if perplexity_before is not None else "")

    trained = student
    if lora:
        from .lora import apply_lora

        trained = apply_lora(student, r=lora_rank, lora_alpha=2 * lora_rank)
    sparsity = prepare_for_training(trained)
    callbacks: list[TrainerCallback] = [sparsity]
    tracker = None
    if eval_every and eval_text is not None:
        tracker = PerplexityCallback(tokenizer, eval_text, eval_every, eval_seq_len, eval_windows)
        callbacks.append(tracker)
    with tempfile.TemporaryDirectory(prefix="hf-prune-distill-") as scratch:
        arguments = dict(
            output_dir=output_dir or scratch, use_cpu=device.type == "cpu", report_to=[], max_steps=steps,
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
            learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=min(warmup_steps, steps - 1),
            lr_scheduler_type="linear", logging_steps=logging_steps, save_strategy="no", seed=seed,
            dataloader_num_workers=0, remove_unused_columns=False,
        )
        arguments.update(training_args or {})
        trainer = DistillationTrainer(model=trained, args=TrainingArguments(**arguments), train_dataset=train_data,
                                      callbacks=callbacks, teacher=teacher, distillation=config)
        train_output = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    merge = None
    model = trained
    if lora:
        from .lora import merge_lora_keep_sparsity

        model, report = merge_lora_keep_sparsity(trained, sample_data=kl_ids[:2])
        merge = report.to_dict()
    model.eval()
    check_pruned_weights(model)
    kl_after = evaluate_kl(model, teacher, kl_ids, chunk_size=chunk_size)
    perplexity_after = perplexity(model)
    result = DistillationResult(
        model=model, steps=steps, tokens=needed * len(train_data[0]["input_ids"]), kl_before=kl_before,
        kl_after=kl_after, perplexity_before=perplexity_before, perplexity_after=perplexity_after,
        train_losses=losses, perplexity_history=list(tracker.history) if tracker else [], merge=merge,
        train_seconds=_training_seconds(train_output.metrics.get("train_runtime"), tracker),
        eval_seconds=tracker.seconds if tracker else 0.0,
    )
    logger.info("%s", result)
    if record:
        from ..checkpoint.provenance import describe_text

        precision = getattr(trainer.args, "mixed_precision", None)  # "bf16" with bf16=True, "no" without

        record_distillation(model, {
            "teacher": (teacher_name or _teacher_name(teacher))[:200],
            "data": "token ids" if isinstance(data, torch.Tensor) or (
                isinstance(data, (list, tuple)) and data and isinstance(data[0], dict)) else describe_text(data),
            "steps": steps, "tokens": result.tokens, "seq_len": len(train_data[0]["input_ids"]),
            "learning_rate": float(learning_rate), "temperature": float(temperature),
            "lm_weight": float(lm_weight), "hidden_weight": float(hidden_weight), "lora": bool(lora),
            "mixed_precision": None if precision in (None, "no") else precision,
            "kl_before": kl_before, "kl_after": kl_after,
            "kl_data": describe_text(eval_text) if eval_text is not None else "training windows",
            "eval_dataset": describe_text(eval_text) if eval_text is not None else None,
            "eval_seq_len": eval_seq_len if eval_text is not None else None,
            "eval_windows": eval_windows if eval_text is not None else None,
            "perplexity_before": perplexity_before, "perplexity_after": perplexity_after,
        })
    return result
