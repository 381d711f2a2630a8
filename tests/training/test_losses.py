"""The chunked losses of distillation: values and gradients equal the unchunked ones, chunk logits only."""

import pytest
import torch

from hf_prune.training.losses import chunked_distillation_losses, kl_divergence


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_kl_equals_unchunked(temperature, chunk_size):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=gen, requires_grad=True)
    teacher_hidden = torch.randn(3, 11, 16, generator=gen)
    head = torch.nn.Linear(16, 50)
    teacher_head = torch.nn.Linear(16, 50)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 8:] = 0
    reference = kl_divergence(head(hidden), teacher_head(teacher_hidden), temperature, mask)
    (expected,) = torch.autograd.grad(reference, hidden)
    losses = chunked_distillation_losses(hidden, teacher_hidden, head, teacher_head, temperature=temperature,
                                         chunk_size=chunk_size, mask=mask)
    (grad,) = torch.autograd.grad(losses.loss, hidden)
    assert losses.tokens == 30
    torch.testing.assert_close(losses.kl, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7)


def test_chunked_lm_loss_is_the_shifted_cross_entropy():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, 30, generator=gen)
    labels = torch.randint(0, 30, (2, 9), generator=gen)
    labels[0, 4] = -100
    losses = chunked_distillation_losses(logits, logits.clone(), temperature=1.0, chunk_size=5, labels=labels)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 30), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(losses.lm, expected)
    assert float(losses.kl) == pytest.approx(0.0, abs=1e-6)  # the same distributions


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logits_given_as_inputs_are_left_as_they_were(temperature):
    """Without heads the inputs are the logits themselves; the chunks work in place on their own tensors only."""
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(2, 6, 20, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 6, 20, generator=gen)
    labels = torch.randint(0, 20, (2, 6), generator=gen)
    saved_student, saved_teacher = student.detach().clone(), teacher.clone()
    losses = chunked_distillation_losses(student, teacher, temperature=temperature, chunk_size=4, labels=labels,
                                         kl_weight=0.5, lm_weight=0.5)
    losses.loss.backward()
    assert torch.equal(student.detach(), saved_student) and torch.equal(teacher, saved_teacher)
    torch.testing.assert_close(losses.kl, kl_divergence(saved_student, saved_teacher, temperature), rtol=1e-5,
                               atol=1e-6)


def test_kl_chunks_hold_only_chunk_logits():
    """Only [chunk x vocab] logits are alive at once: a head that records its output sizes sees chunks."""
    seen = []
    linear = torch.nn.Linear(8, 1000)

    def head(rows):
        out = linear(rows)
        seen.append(out.shape[0])
        return out

    hidden = torch.randn(4, 64, 8, requires_grad=True)
    losses = chunked_distillation_losses(hidden, torch.randn(4, 64, 8), head, head, chunk_size=32)
    losses.loss.backward()
    assert max(seen) == 32


def reference_losses(hidden, teacher_hidden, head, teacher_head, temperature, mask, labels):
    """Unchunked KL and shifted cross-entropy through plain autograd."""
    logits = head(hidden)
    kl = kl_divergence(logits, teacher_head(teacher_hidden).detach(), temperature, mask)
    targets = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)  # a masked position predicts nothing
    lm = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return kl, lm


@pytest.mark.parametrize("temperature", [1.0, 2.0])  # at T = 1 the KL and the CE share one softmax
@pytest.mark.parametrize("chunk_size", [1, 6, 10_000])
def test_mixed_loss_gradients_reach_the_rows_and_the_head_as_plain_autograd_does(chunk_size, temperature):
    gen = torch.Generator().manual_seed(2)
    embed = torch.nn.Embedding(40, 12)
    head = torch.nn.Linear(12, 40, bias=True)
    head.weight = embed.weight  # tied, as most small models are: the head's weight is used upstream too
    teacher_head = torch.nn.Linear(12, 40)
    ids = torch.randint(0, 40, (2, 9), generator=gen)
    labels = ids.clone()
    labels[0, 3] = -100
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 7:] = 0
    labels[mask == 0] = -100  # as the Trainer's labels of padding are
    teacher_hidden = torch.randn(2, 9, 12, generator=gen)
    kl_weight, lm_weight = 0.7, 0.3
    params = [embed.weight, head.bias]

    hidden = embed(ids) * 1.5
    kl, lm = reference_losses(hidden, teacher_hidden, head, teacher_head, temperature, mask, labels)
    expected = torch.autograd.grad(kl_weight * kl + lm_weight * lm + hidden.pow(2).mean(), params)

    hidden = embed(ids) * 1.5
    losses = chunked_distillation_losses(hidden, teacher_hidden, head, teacher_head, temperature=temperature,
                                         chunk_size=chunk_size, mask=mask, labels=labels, kl_weight=kl_weight,
                                         lm_weight=lm_weight)
    grads = torch.autograd.grad(losses.loss + hidden.pow(2).mean(), params)
    torch.testing.assert_close(losses.kl, kl.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.lm, lm.detach(), rtol=1e-5, atol=1e-6)
    for grad, reference in zip(grads, expected):
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6)
    assert teacher_head.weight.grad is None


def test_backward_recomputes_no_logits_and_scales_with_the_loss():
    calls = []
    linear = torch.nn.Linear(8, 30)

    def head(rows):
        calls.append(torch.is_grad_enabled())
        return linear(rows)

    hidden = torch.randn(2, 16, 8, requires_grad=True)
    teacher_hidden = torch.randn(2, 16, 8)
    losses = chunked_distillation_losses(hidden, teacher_hidden, head, head, chunk_size=8)
    before_backward = len(calls)
    (0.25 * losses.loss).backward()
    assert len(calls) == before_backward  # the backward pass ran no head
    reference = kl_divergence(linear(hidden), linear(teacher_hidden).detach())
    expected = torch.autograd.grad(0.25 * reference, hidden)[0]
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-4, atol=1e-7)


def test_without_gradients_the_values_are_the_same():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 10, 8, generator=gen)
    teacher_hidden = torch.randn(2, 10, 8, generator=gen)
    labels = torch.randint(0, 30, (2, 10), generator=gen)
    head = torch.nn.Linear(8, 30)
    with torch.no_grad():
        plain = chunked_distillation_losses(hidden, teacher_hidden, head, head, chunk_size=4, labels=labels,
                                            kl_weight=0.5, lm_weight=0.5)
    tracked = chunked_distillation_losses(hidden.clone().requires_grad_(True), teacher_hidden, head, head,
                                          chunk_size=4, labels=labels, kl_weight=0.5, lm_weight=0.5)
    for field in ("kl", "lm", "loss"):
        torch.testing.assert_close(getattr(plain, field), getattr(tracked, field).detach())
    assert tracked.loss.requires_grad and not tracked.kl.requires_grad
