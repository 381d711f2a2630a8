"""The losses of distillation, computed over chunks of tokens so no model's logits exist whole.

* **KL on the logits**: forward KL ``KL(p_teacher || p_student)`` of the distributions at
  temperature ``T``, scaled by ``T²`` (so the gradient's size does not depend on ``T``),
  averaged over the tokens the attention mask keeps;
* the **LM loss**: next-token cross-entropy, averaged over the predicted tokens;
* **hidden states**: the mean squared error between matched decoder layer outputs, divided
  by the mean square of the teacher's.

``chunked_distillation_losses`` applies the LM heads ``chunk_size`` tokens at a time. While
gradients are recorded it takes each chunk's gradient as soon as the chunk's loss is known
(the gradient of both losses with respect to the logits has a closed form: ``T (q - p)`` for
the KL, ``softmax - one_hot`` for the cross-entropy) and pushes it through the student's LM
head right away. So no chunk's logits outlive the chunk, and the backward pass has nothing
to recompute: it only hands back the gradients already summed (those of the hidden states
fed to the head, and those of the head's own parameters).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: tokens per chunk of the KL: [chunk x vocab] fp32 logits of each model exist at once
DEFAULT_CHUNK_SIZE = 1024

Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DistillationLosses:
    """Means over the counted tokens: ``kl`` (times ``T²``; 0 without a teacher), ``lm`` (next-token
    cross-entropy, ``None`` when not asked for), their weighted sum ``loss``, and how many tokens
    each counted.

    While gradients are recorded only ``loss`` carries them (``kl`` and ``lm`` are its parts,
    detached, for logging); differentiate ``loss``.
    """

    kl: torch.Tensor
    lm: torch.Tensor | None
    loss: torch.Tensor
    tokens: int
    lm_tokens: int


def _identity(rows: torch.Tensor) -> torch.Tensor:
    return rows


def _shares_memory(tensor: torch.Tensor, other: torch.Tensor) -> bool:
    return tensor.untyped_storage().data_ptr() == other.untyped_storage().data_ptr()


def _trainable_leaves(output: torch.Tensor, rows: torch.Tensor) -> list[torch.Tensor]:
    """The tensors requiring grad that ``output`` was computed from, other than ``rows`` (the head's
    parameters: a tied embedding, a LoRA adapter's matrices...)."""
    leaves: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            if variable is not rows:
                leaves[id(variable)] = variable
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(leaves.values())


class _Chunks:
    """The loss of one call over its chunks: sums and, when asked, the gradient per chunk of logits."""

    def __init__(self, student_head: Head, teacher_head: Head, temperature: float, student_rows: torch.Tensor,
                 teacher_rows: torch.Tensor | None, targets: torch.Tensor, chunk_size: int, kl_weight: float,
                 lm_weight: float, with_lm: bool) -> None:
        self.student_head, self.teacher_head = student_head, teacher_head
        self.temperature = temperature
        self.student_rows, self.teacher_rows, self.targets = student_rows, teacher_rows, targets
        self.chunk_size = chunk_size
        self.with_lm = with_lm
        self.tokens = student_rows.shape[0]
        self.lm_tokens = int((targets != -100).sum())
        # d(loss)/d(per-token sums): the means' denominators and the weights folded in
        self.kl_scale = kl_weight * temperature**2 / max(self.tokens, 1)
        self.lm_scale = lm_weight / max(self.lm_tokens, 1)

    def spans(self) -> range:
        return range(0, self.tokens, self.chunk_size)

    def sums(self, logits: torch.Tensor, start: int, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor | None]:
        """Summed KL and cross-entropy of the chunk at ``start`` given its student ``logits``, and the gradient
        of ``kl_scale * KL + lm_scale * CE`` with respect to those logits (``None`` unless ``with_grad``).

        Works in place wherever the tensor is its own: on a CPU a new ``[chunk x vocab]`` tensor costs more
        (fresh pages from the system) than the arithmetic on it.
        """
        end = start + logits.shape[0]
        z = logits.detach().float()  # never written: the head's backward may need its output
        temperature = self.temperature
        kl = z.new_zeros(())
        lm = z.new_zeros(())
        grad = None
        student_log_probs = None  # log_softmax(z / T), when the KL needs it
        teacher_probs = None
        if self.teacher_rows is not None:
            with torch.no_grad():
                rows = self.teacher_rows[start:end]
                teacher_z = self.teacher_head(rows).to(z.device, torch.float32)
                if _shares_memory(teacher_z, rows):  # no head: the caller's logits, not ours to write
                    teacher_z = teacher_z.clone()
                if temperature != 1:
                    teacher_z.div_(temperature)
                teacher_log_probs = F.log_softmax(teacher_z, dim=-1)
                teacher_probs = torch.exp(teacher_log_probs, out=teacher_z)
            student_log_probs = F.log_softmax(z if temperature == 1 else z / temperature, dim=-1)
            kl = teacher_log_probs.sub_(student_log_probs).mul_(teacher_probs).sum()
            del teacher_log_probs
        targets = counted = log_probs = None
        shared = False  # the CE's log-softmax is the KL's (at T = 1)
        if self.with_lm:
            targets = self.targets[start:end].clamp_min(0)
            counted = self.targets[start:end] != -100
            shared = student_log_probs is not None and temperature == 1
            log_probs = student_log_probs if shared else F.log_softmax(z, dim=-1)
            lm = -(log_probs.gather(1, targets.unsqueeze(1)).squeeze(1) * counted).sum()
        if not with_grad:
            return kl, lm, None
        kl_coef = self.kl_scale / temperature if teacher_probs is not None else 0.0  # d KL / d z = (q - p) / T
        lm_coef = self.lm_scale if self.with_lm else 0.0  # d CE / d z = softmax(z) - one_hot, counted rows
        if teacher_probs is not None and kl_coef:
            grad = student_log_probs.exp_()
            if lm_coef and shared:  # softmax(z) serves both: (kl + lm * counted) * p - kl * q - lm * one_hot
                grad.mul_((kl_coef + lm_coef * counted).unsqueeze(1)).sub_(teacher_probs, alpha=kl_coef)
                grad[torch.arange(len(targets), device=z.device), targets] -= lm_coef * counted
                lm_coef = 0.0  # done
            else:
                grad.sub_(teacher_probs).mul_(kl_coef)
        if lm_coef:  # log_probs is still the CE's own (the KL's gradient, if any, did not take it)
            probs = log_probs.exp_()
            probs[torch.arange(len(targets), device=z.device), targets] -= 1
            probs.mul_(counted.unsqueeze(1) * lm_coef)
            grad = probs if grad is None else grad.add_(probs)
        if grad is None:
            grad = torch.zeros_like(z)
        return kl, lm, grad

    def values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed KL and cross-entropy over all chunks, without gradients."""
        kl_total = self.student_rows.new_zeros((), dtype=torch.float32)
        lm_total = kl_total.clone()
        with torch.no_grad():
            for start in self.spans():
                logits = self.student_head(self.student_rows[start:start + self.chunk_size])
                kl, lm, _ = self.sums(logits, start, with_grad=False)
                kl_total += kl
                lm_total += lm
        return kl_total, lm_total


class _ChunkedHeadLoss(torch.autograd.Function):
    """``kl_scale * KL + lm_scale * CE`` of the student rows through the head, its gradient summed chunk by chunk
    in the forward pass; backward scales what was summed."""

    @staticmethod
    def forward(ctx, chunks: _Chunks, rows: torch.Tensor, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows_grad = torch.zeros_like(rows)
        leaves_grad: list[torch.Tensor | None] = [None] * len(leaves)
        kl_total = rows.new_zeros((), dtype=torch.float32)
        lm_total = kl_total.clone()
        for start in chunks.spans():
            with torch.enable_grad():
                chunk_rows = rows[start:start + chunks.chunk_size].detach().requires_grad_(True)
                logits = chunks.student_head(chunk_rows)
            kl, lm, logits_grad = chunks.sums(logits, start, with_grad=True)
            kl_total += kl
            lm_total += lm
            grads = torch.autograd.grad(logits, [chunk_rows, *leaves], logits_grad.to(logits.dtype),
                                        allow_unused=True)
            del logits, logits_grad
            rows_grad[start:start + chunks.chunk_size] = grads[0]
            for index, grad in enumerate(grads[1:]):
                if grad is not None:
                    leaves_grad[index] = grad if leaves_grad[index] is None else leaves_grad[index].add_(grad)
        ctx.leaves_grad = leaves_grad
        ctx.save_for_backward(rows_grad)
        loss = kl_total * chunks.kl_scale + lm_total * chunks.lm_scale
        ctx.mark_non_differentiable(kl_total, lm_total)
        return loss, kl_total, lm_total

    @staticmethod
    def backward(ctx, loss_grad: torch.Tensor, *_: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (rows_grad,) = ctx.saved_tensors
        if loss_grad.numel() == 1 and float(loss_grad) == 1.0:  # the usual loss.backward(): nothing to scale
            return (None, rows_grad, *ctx.leaves_grad)
        leaves_grad = [None if grad is None else grad * loss_grad.to(grad.dtype) for grad in ctx.leaves_grad]
        return (None, rows_grad * loss_grad.to(rows_grad.dtype), *leaves_grad)


def chunked_distillation_losses(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor | None,
                                student_head: Head | None = None, teacher_head: Head | None = None, *,
                                temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                                mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                                kl_weight: float = 1.0, lm_weight: float = 1.0) -> DistillationLosses:
    """KL of the student to the teacher (and optionally the LM loss), ``chunk_size`` tokens at a time.

    Args:
        student_hidden: ``[batch, seq, hidden]`` last hidden states of the student (or its
            logits ``[batch, seq, vocab]`` with ``student_head=None``).
        teacher_hidden: the same for the teacher (may sit on another device: each chunk's
            teacher logits are computed there and moved to the student's device); ``None``:
            no KL (``kl`` is 0), the LM loss only.
        student_head, teacher_head: hidden state -> logits (the LM heads); ``None``: the
            inputs already are logits.
        temperature: ``T``; the KL is of ``softmax(z / T)`` and is multiplied by ``T²``.
        chunk_size: tokens per chunk; ``[chunk_size x vocab]`` fp32 logits of each model
            exist at once.
        mask: ``[batch, seq]``, nonzero for the tokens that count (default: all).
        labels: ``[batch, seq]`` token ids (``-100`` ignored), shifted inside as the causal
            LM loss does (position ``t`` predicts ``labels[t + 1]``); ``None``: no LM loss.
        kl_weight, lm_weight: ``loss = kl_weight * kl + lm_weight * lm``.

    Returns:
        ``DistillationLosses`` whose ``kl`` is ``T² * mean KL`` over the counted tokens, whose
        ``lm`` is the mean cross-entropy over the predicted tokens and whose ``loss`` is their
        weighted sum (the part to differentiate).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if teacher_hidden is not None and student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(f"the student's states {tuple(student_hidden.shape[:2])} and the teacher's "
                         f"{tuple(teacher_hidden.shape[:2])} cover different tokens")
    student_head = student_head or _identity
    teacher_head = teacher_head or _identity
    batch, seq = student_hidden.shape[:2]
    device = student_hidden.device
    student_rows = student_hidden.reshape(batch * seq, -1)
    teacher_rows = teacher_hidden.reshape(batch * seq, -1) if teacher_hidden is not None else None
    targets = torch.full((batch, seq), -100, dtype=torch.long, device=device)
    if labels is not None:
        targets[:, :-1] = labels[:, 1:].to(device)
    targets = targets.reshape(-1)
    if mask is not None:
        keep = mask.reshape(-1).to(device) != 0
        targets = targets.masked_fill(~keep, -100)
        index = keep.nonzero().squeeze(-1)
        student_rows = student_rows.index_select(0, index)
        if teacher_rows is not None:
            teacher_rows = teacher_rows.index_select(0, index.to(teacher_rows.device))
        targets = targets.index_select(0, index)
    if labels is None:
        lm_weight = 0.0
    if teacher_rows is None:
        kl_weight = 0.0
    chunks = _Chunks(student_head, teacher_head, float(temperature), student_rows, teacher_rows, targets, chunk_size,
                     kl_weight, lm_weight, with_lm=labels is not None)
    if torch.is_grad_enabled() and student_rows.requires_grad and chunks.tokens:
        with torch.enable_grad():
            probe_rows = student_rows[:1].detach().requires_grad_(True)
            leaves = _trainable_leaves(student_head(probe_rows), probe_rows)
        loss, kl_total, lm_total = _ChunkedHeadLoss.apply(chunks, student_rows, *leaves)
    else:
        kl_total, lm_total = chunks.values()
        loss = None
    kl_mean = kl_total * temperature**2 / max(chunks.tokens, 1)
    lm_mean = lm_total / max(chunks.lm_tokens, 1) if labels is not None else None
    if loss is None:
        loss = kl_weight * kl_mean + (lm_weight * lm_mean if lm_mean is not None else 0.0)
    return DistillationLosses(kl_mean, lm_mean, loss, chunks.tokens, chunks.lm_tokens)


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Unchunked reference: ``T² * mean over tokens of KL(softmax(z_t / T) || softmax(z_s / T))``."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().to(student.device) / temperature, dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(-1)
    if mask is not None:
        keep = mask.to(per_token.device) != 0
        return per_token[keep].mean() * temperature**2
    return per_token.mean() * temperature**2


def hidden_state_loss(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor],
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over layer pairs of ``mean((s - t)²) / mean(t²)`` over the counted tokens."""
    losses = []
    for student, teacher in zip(student_states, teacher_states):
        teacher = teacher.to(student.device, torch.float32)
        student = student.float()
        error = (student - teacher).pow(2).mean(-1)
        scale = teacher.pow(2).mean(-1)
        if mask is not None:
            keep = mask.to(student.device) != 0
            error, scale = error[keep], scale[keep]
        losses.append(error.mean() / scale.mean().clamp_min(1e-12))
    if not losses:
        raise ValueError("no layer pairs to compare")
    return torch.stack(losses).mean()
