"""Calibration inputs: token ids, strings, files, dataset names; what was used is recorded."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from hf_prune import CalibrationError, WandaConfig
from hf_prune.data.calibration import BUNDLED_C4, build_calibration, load_text, tokenize_windows


class ByteTokenizer:
    """One token per byte, folded into the tiny vocabulary; needs no download."""

    def __call__(self, text, **kwargs):
        return {"input_ids": [b % VOCAB for b in text.encode("utf-8")]}


def test_windows_are_seeded_non_overlapping_and_recorded():
    text = "".join(chr(65 + i % 26) for i in range(1000))
    first = tokenize_windows(text, ByteTokenizer(), 5, 100, seed=3, source="test")
    again = tokenize_windows(text, ByteTokenizer(), 5, 100, seed=3, source="test")
    other = tokenize_windows(text, ByteTokenizer(), 5, 100, seed=4, source="test")
    assert first.input_ids.shape == (5, 100)
    assert torch.equal(first.input_ids, again.input_ids)
    assert not torch.equal(first.input_ids, other.input_ids)
    assert first.record == {"source": "test", "num_samples": 5, "seq_len": 100, "seed": 3, "tokens_available": 1000}


def test_fewer_windows_than_asked_warns_and_uses_what_there_is():
    calibration = tokenize_windows("x" * 250, ByteTokenizer(), 8, 100, seed=0, source="short")
    assert calibration.input_ids.shape == (2, 100)
    assert calibration.record["num_samples"] == 2


@pytest.mark.parametrize("kind", ["txt", "jsonl", "strings"])
def test_text_sources(kind, tmp_path):
    texts = ["The first document. " * 20, "A second one. " * 20]
    if kind == "txt":
        path = tmp_path / "calib.txt"
        path.write_text("\n\n".join(texts))
        data = str(path)
    elif kind == "jsonl":
        path = tmp_path / "calib.jsonl"
        path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
        data = str(path)
    else:
        data = texts
    calibration = build_calibration(data, ByteTokenizer(), "c4", num_samples=4, seq_len=64, seed=0)
    assert calibration.input_ids.shape == (4, 64)
    assert calibration.record["source"] in ("file:calib.txt", "file:calib.jsonl", "2 strings")


def test_bad_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no text key"}\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2 needs a string field 'text'"):
        load_text(path)


def test_c4_falls_back_to_bundled_sample_offline(monkeypatch):
    import hf_prune.data.calibration as calibration

    def unreachable(name, split):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(calibration, "_hub_dataset_text", unreachable)
    text, source = load_text("c4")
    assert text == BUNDLED_C4.read_text(encoding="utf-8")
    assert "bundled" in source
    with pytest.raises(CalibrationError, match="local .txt/.jsonl"):
        load_text("wikitext2")


def test_override_is_recorded_in_the_model(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "mine.txt"
    path.write_text("some calibration text, " * 200)
    model.prune(WandaConfig(num_samples=4, seq_len=32, device="cpu", calibration="c4"),
                calibration_data=str(path), tokenizer=ByteTokenizer())
    record = model.config.pruning_config
    assert record["calibration"] == "c4"  # the config's spec, as given
    assert record["calibration_used"]["source"] == "file:mine.txt"
    assert record["calibration_used"]["num_samples"] == 4


def test_magnitude_needs_no_calibration():
    from hf_prune import MagnitudeConfig

    model = tiny_model("gpt2")
    model.prune(MagnitudeConfig(sparsity=0.25, device="cpu"))
    assert model.pruning_report().overall == pytest.approx(0.25)
    assert model.config.pruning_config["calibration_used"] is None
