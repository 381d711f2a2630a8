"""Calibration is checked against the model before anything runs: context length, vocabulary, UTF-8."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import hf_prune.modeling as modeling
from hf_prune import CalibrationError, WandaConfig, evaluate_perplexity


class ByteTokenizer:
    """One token per byte, folded into the tiny vocabulary unless ``fold`` is off."""

    def __init__(self, fold: bool = True) -> None:
        self.fold = fold

    def __call__(self, text, **kwargs):
        return {"input_ids": [b % VOCAB if self.fold else b for b in text.encode("utf-8")]}


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("calibration text that is long enough for several windows. " * 100)
    return path


@pytest.fixture
def no_pruning(monkeypatch):
    """Fail the test if the engine starts: every check must come before it."""

    def engine(*args, **kwargs):
        raise AssertionError("the pruning engine ran before the calibration was checked")

    monkeypatch.setattr(modeling, "prune_model", engine)


def _untouched(model) -> bool:
    return model.pruning_report().overall == 0.0 and not model.is_pruned


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])  # learned positions (IndexError) and rotary (silent)
def test_seq_len_beyond_the_context_is_refused_before_running(family, text_file, no_pruning):
    model = tiny_model(family)  # 128 positions
    with pytest.raises(CalibrationError, match=r"seq_len=256 is longer than the model's context of 128"):
        model.prune(WandaConfig(seq_len=256, num_samples=2, device="cpu"), calibration_data=str(text_file),
                    tokenizer=ByteTokenizer())
    with pytest.raises(CalibrationError, match="context of 128"):
        model.prune(WandaConfig(device="cpu"), calibration_data=torch.zeros(2, 129, dtype=torch.long))
    assert _untouched(model)


def test_seq_len_equal_to_the_context_is_fine(text_file):
    model = tiny_model("gpt2")
    model.prune(WandaConfig(seq_len=128, num_samples=2, device="cpu"), calibration_data=str(text_file),
                tokenizer=ByteTokenizer())
    assert model.is_pruned


@pytest.mark.parametrize("bad_id", [VOCAB, VOCAB + 1000, -1])
def test_token_ids_outside_the_vocabulary_are_refused(bad_id, no_pruning):
    model = tiny_model("gpt2")
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    ids[2, 5] = bad_id
    with pytest.raises(CalibrationError, match=rf"id {bad_id}, outside the model's vocabulary \[0, {VOCAB}\)"):
        model.prune(WandaConfig(device="cpu"), calibration_data=ids)
    assert _untouched(model)


def test_a_tokenizer_of_another_model_is_caught(text_file, no_pruning):
    model = tiny_model("llama")
    with pytest.raises(CalibrationError, match="tokenizer or the token ids do not belong to this model"):
        model.prune(WandaConfig(seq_len=32, num_samples=2, device="cpu"), calibration_data=str(text_file),
                    tokenizer=ByteTokenizer(fold=False))
    assert _untouched(model)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_non_utf8_file_is_a_calibration_error(tmp_path, suffix, no_pruning):
    path = tmp_path / f"latin1{suffix}"
    text = "caf\u00e9 cr\u00e8me " * 200
    path.write_bytes((text if suffix == ".txt" else '{"text": "' + text + '"}\n').encode("latin-1"))
    model = tiny_model("llama")
    with pytest.raises(CalibrationError, match=rf"latin1{suffix} is not UTF-8 text.*convert it"):
        model.prune(WandaConfig(seq_len=32, num_samples=2, device="cpu"), calibration_data=str(path),
                    tokenizer=ByteTokenizer())
    assert _untouched(model)


def test_evaluation_checks_the_context_and_the_text(tmp_path, text_file):
    model = tiny_model("gpt2")
    with pytest.raises(CalibrationError, match="longer than the model's context"):
        evaluate_perplexity(model, ByteTokenizer(), str(text_file), seq_len=256)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("\u00e9t\u00e9 ".encode("latin-1") * 100)
    with pytest.raises(CalibrationError, match="not UTF-8"):
        evaluate_perplexity(model, ByteTokenizer(), str(latin), seq_len=16)
    assert evaluate_perplexity(model, ByteTokenizer(), str(text_file), seq_len=128, max_windows=1) > 1
