"""Windowed perplexity, the papers' protocol."""

from __future__ import annotations

import math

import pytest
import torch
from test_calibration import ByteTokenizer
from tiny_models import tiny_model

from hf_prune import CalibrationError, evaluate_perplexity


def test_matches_a_direct_computation(tmp_path):
    model = tiny_model("llama")
    text = "perplexity is exp of the mean loss. " * 10
    ids = torch.tensor(ByteTokenizer()(text)["input_ids"])
    seq_len = 32
    windows = ids.numel() // seq_len
    losses = []
    with torch.no_grad():
        for i in range(windows):
            chunk = ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0)
            losses.append(model(chunk, labels=chunk).loss.item())
    expected = math.exp(sum(losses) / len(losses))
    assert evaluate_perplexity(model, ByteTokenizer(), text, seq_len) == pytest.approx(expected, rel=1e-5)
    path = tmp_path / "eval.txt"
    path.write_text(text)
    assert evaluate_perplexity(model, ByteTokenizer(), str(path), seq_len, batch_size=3) == pytest.approx(
        expected, rel=1e-5
    )
    first = math.exp(losses[0])
    assert evaluate_perplexity(model, ByteTokenizer(), text, seq_len, max_windows=1) == pytest.approx(first, rel=1e-5)


def test_too_short_text():
    with pytest.raises(CalibrationError, match="fewer than one window of seq_len=64"):
        evaluate_perplexity(tiny_model("llama"), ByteTokenizer(), "short", 64)
