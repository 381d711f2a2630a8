"""What hf-prune says: the last line of a structured or mixed run, --help and --help-params."""

from __future__ import annotations

import json
import re

import pytest
from tiny_models import save_tiny

from hf_prune.cli import main
from hf_prune.report import count_parameters


@pytest.fixture
def tiny(tmp_path):
    source = save_tiny(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text("calibration and evaluation text for the command line. " * 80)
    return source, text


def _pruned_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("pruned with"))


def test_structured_run_says_what_was_removed(tiny, tmp_path, capsys):
    source, _ = tiny
    out = tmp_path / "shrunk"
    assert main(["prune", "--model", str(source), "--method", "l1-norm-structured", "--sparsity", "0.5",
                 "--param", "heads=true", "--device", "cpu", "--output", str(out), "--json"]) == 0
    printed = capsys.readouterr().out
    line = _pruned_line(printed)
    # 2 layers of 128 neurons, half removed; 4 KV groups of 2 query heads, half removed
    assert "removed 50.0% of MLP neurons (128 of 256)" in line
    assert "4 of 8 attention heads" in line and "2 of 4 KV heads" in line
    from hf_prune import AutoPrunedModelForCausalLM

    after = count_parameters(AutoPrunedModelForCausalLM.from_pretrained(out))
    before = count_parameters(AutoPrunedModelForCausalLM.from_pretrained(source))
    assert f"parameters {before:,} -> {after:,}" in line
    assert "sparsity" not in line and "(unstructured)" not in line
    results = json.loads(printed[printed.index("{"):])
    assert results["structure"]["mlp_neurons"] == {"kept": 128, "dense": 256}
    assert results["structure"]["parameters_after"] == after


def test_mixed_run_shows_removal_and_sparsity(tiny, tmp_path, capsys):
    source, text = tiny
    shrunk = tmp_path / "shrunk"
    assert main(["prune", "--model", str(source), "--method", "l1-norm-structured", "--sparsity", "0.5",
                 "--device", "cpu", "--output", str(shrunk)]) == 0
    capsys.readouterr()
    assert main(["prune", "--model", str(shrunk), "--method", "wanda", "--pattern", "2:4",
                 "--calibration", str(text), "--num-samples", "4", "--seq-len", "64", "--device", "cpu"]) == 0
    line = _pruned_line(capsys.readouterr().out)
    assert line.startswith("pruned with wanda (2:4)")
    assert "removed 50.0% of MLP neurons (128 of 256)" in line
    assert "sparsity 0.5000 of the remaining decoder Linear weights" in line


def test_help_names_the_bundled_model_and_the_structured_meaning_of_sparsity(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--help"])
    assert exit_info.value.code == 0
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "SmolLM2-135M-Instruct" in text and "Q4_1" in text
    assert "share of MLP neurons removed" in text and "llm-rank" in text
    assert "--help-params" in text


def test_help_params_lists_a_methods_parameters_with_meaning_and_default(capsys, monkeypatch):
    monkeypatch.setattr("hf_prune.modeling.AutoPrunedModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("--help-params loaded a model"))
    assert main(["prune", "--method", "llm-rank", "--help-params"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^\s+gamma = \"auto\"$", text, re.M)
    assert re.search(r"^\s+score = \"centrality\"$", text, re.M)
    assert re.search(r"^\s+scope = \"chained\"$", text, re.M)
    assert "flows in from the previous nodes" in text  # from LLMRankConfig's docstring
    assert re.search(r"^\s+round_to = 8$", text, re.M)  # from StructuredConfig
    assert re.search(r"^\s+num_samples = 128 +\(--num-samples\)$", text, re.M)  # shared, with its flag


def test_help_params_without_a_method_lists_every_method(capsys):
    from hf_prune.methods.registry import METHODS

    assert main(["prune", "--help-params"]) == 0
    text = capsys.readouterr().out
    for name in METHODS:
        assert re.search(rf"^{re.escape(name)} \(", text, re.M), name
    assert re.search(r"^\s+block_size = 128$", text, re.M)
