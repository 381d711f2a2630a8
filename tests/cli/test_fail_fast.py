"""hf-prune prune reports every mistake it can see before any long pass: one line, and no forward pass run.

Each test patches the decoder layers' forward, the engine and perplexity to raise if called: the error
must come from the checks that run on the config, the shapes and the texts alone.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import save_tiny

from hf_prune.cli import main


class LongPassStarted(AssertionError):
    pass


@pytest.fixture
def no_long_pass(monkeypatch):
    """Any decoder-layer forward, pruning run or perplexity pass fails the test."""

    def refuse(*args, **kwargs):
        raise LongPassStarted("a long pass started before the error was reported")

    monkeypatch.setattr(transformers.models.qwen3.modeling_qwen3.Qwen3DecoderLayer, "forward", refuse)
    monkeypatch.setattr("hf_prune.modeling.prune_model", refuse)
    monkeypatch.setattr("hf_prune.data.evaluation.evaluate_perplexity", refuse)


@pytest.fixture
def tiny(tmp_path):
    source = save_tiny(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text("calibration and evaluation text for the command line. " * 80)
    return source, text


def _prune(source, text, *extra):
    return main(["prune", "--model", str(source), "--calibration", str(text), "--num-samples", "4",
                 "--seq-len", "64", "--device", "cpu", "--eval-text", str(text), "--eval-seq-len", "64", *extra])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("hf-prune: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_pattern_that_does_not_divide_a_width_is_reported_before_the_dense_perplexity(tiny, no_long_pass, capsys):
    source, text = tiny
    assert _prune(source, text, "--pattern", "2:5") == 2
    line = _one_line_error(capsys)
    assert "pattern 2:5" in line and "input width 64 is not a multiple of M=5" in line


def test_empty_calibration_file_is_reported_before_any_pass(tiny, tmp_path, no_long_pass, capsys):
    source, text = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert _prune(source, text, "--calibration-data", str(empty)) == 2
    assert "has 0 tokens, fewer than one sample of seq_len=64" in _one_line_error(capsys)


def test_calibration_text_shorter_than_one_window_is_reported_before_any_pass(tiny, tmp_path, no_long_pass, capsys):
    source, text = tiny
    short = tmp_path / "short.txt"
    short.write_text("too few words")
    assert _prune(source, text, "--calibration", str(short)) == 2
    assert "fewer than one sample of seq_len=64" in _one_line_error(capsys)


def test_output_equal_to_the_model_directory_is_refused_even_with_overwrite(tiny, no_long_pass, capsys):
    source, text = tiny
    before = {p.name: p.stat().st_mtime_ns for p in source.iterdir()}
    assert _prune(source, text, "--output", str(source), "--overwrite") == 2
    assert "the directory this model was loaded from" in _one_line_error(capsys)
    assert {p.name: p.stat().st_mtime_ns for p in source.iterdir()} == before


def test_targets_matching_nothing_are_reported_before_any_pass(tiny, no_long_pass, capsys):
    source, text = tiny
    assert _prune(source, text, "--targets", "attn.query") == 2
    assert "match no Linear" in _one_line_error(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_missing_gpu_is_reported_before_any_pass(tiny, no_long_pass, capsys):
    source, text = tiny
    assert main(["prune", "--model", str(source), "--calibration", str(text), "--num-samples", "4", "--seq-len",
                 "64", "--device", "cuda:0", "--eval-text", str(text), "--eval-seq-len", "64"]) == 2
    assert "no CUDA GPU is visible" in _one_line_error(capsys)


def test_missing_evaluation_file_is_reported_before_any_pass(tiny, tmp_path, no_long_pass, capsys):
    source, text = tiny
    assert main(["prune", "--model", str(source), "--calibration", str(text), "--num-samples", "4", "--seq-len",
                 "64", "--device", "cpu", "--eval-text", str(tmp_path / "wiki_sampel.txt")]) == 2
    assert "wiki_sampel.txt: no such file" in _one_line_error(capsys)


def test_evaluation_text_shorter_than_one_window_is_reported_before_any_pass(tiny, no_long_pass, capsys):
    source, text = tiny
    assert _prune(source, text, "--eval-seq-len", "100000") == 2
    assert "fewer than one window of seq_len=100000" in _one_line_error(capsys)


def test_missing_local_model_path_is_one_line(no_long_pass, tmp_path, capsys):
    missing = tmp_path / "nonexistent" / "model"
    assert main(["prune", "--model", str(missing)]) == 2
    line = _one_line_error(capsys)
    assert f"model path {missing} does not exist" in line


def test_missing_hub_like_model_says_what_was_tried(no_long_pass, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert main(["eval", "--model", "someone/no-such-model-here", "--eval-text", "wikitext2"]) == 2
    line = _one_line_error(capsys)
    assert "someone/no-such-model-here is not a local directory" in line and "HF_HUB_OFFLINE" in line


def test_folder_without_a_tokenizer_says_how_to_add_one(tiny, tmp_path, no_long_pass, capsys):
    source, text = tiny
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((source / name).read_bytes())
    assert _prune(bare, text) == 2
    line = _one_line_error(capsys)
    assert "holds no tokenizer" in line and "tokenizer.save_pretrained" in line


def test_pattern_is_checked_on_the_loaded_model_when_no_skeleton_can_be_built(tiny, no_long_pass, monkeypatch,
                                                                               capsys):
    def no_skeleton(*args, **kwargs):
        raise RuntimeError("this config cannot be built on the meta device")

    monkeypatch.setattr("hf_prune.modeling.AutoPrunedModelForCausalLM.from_config", no_skeleton)
    source, text = tiny
    assert _prune(source, text, "--pattern", "2:5") == 2
    assert "not a multiple of M=5" in _one_line_error(capsys)
