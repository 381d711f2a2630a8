"""The hf-prune command line on a tiny saved model."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import save_tiny
from transformers import AutoModelForCausalLM

from hf_prune.cli import main


@pytest.fixture
def saved_model(tmp_path):
    source = save_tiny(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text("calibration and evaluation text for the command line. " * 80)
    return source, text


def test_prune_then_eval(saved_model, tmp_path, capsys):
    source, text = saved_model
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(source), "--method", "sparsegpt", "--pattern", "2:4",
                 "--calibration", str(text), "--num-samples", "4", "--seq-len", "64", "--device", "cpu",
                 "--param", "block_size=32", "--eval-text", str(text), "--eval-seq-len", "64",
                 "--output", str(out), "--json"])
    assert code == 0
    printed = capsys.readouterr().out
    results = json.loads(printed[printed.index("{"):])
    assert results["sparsity"] == pytest.approx(0.5)
    assert results["perplexity_before"] > 1 and results["perplexity_after"] > 1
    record = json.loads((out / "config.json").read_text())["pruning_config"]
    assert record["method"] == "sparsegpt" and record["block_size"] == 32 and record["pattern"] == "2:4"
    assert (out / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == 0.5

    assert main(["eval", "--model", str(out), "--eval-text", str(text), "--eval-seq-len", "64"]) == 0
    assert "sparsity of decoder Linear weights: 0.5000" in capsys.readouterr().out


def test_bad_input_exits_with_a_message(saved_model, tmp_path, capsys):
    source, text = saved_model
    code = main(["prune", "--model", str(source), "--sparsity", "1.2", "--output", str(tmp_path / "never")])
    assert code == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    code = main(["prune", "--model", str(source), "--param", "nonsense=1", "--calibration", str(text)])
    assert code == 2
    assert "unknown field(s) ['nonsense']" in capsys.readouterr().err


def test_refuses_non_empty_output_without_overwrite(saved_model, tmp_path, capsys):
    source, text = saved_model
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["prune", "--model", str(source), "--calibration", str(text), "--output", str(other)]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err


def test_prune_offloaded_to_disk_under_a_memory_budget(saved_model, tmp_path):
    """--device-map/--max-memory/--offload-folder: layers beyond the budget go to disk and are pruned there,
    to the same weights as in memory."""
    source, text = saved_model
    common = ["prune", "--model", str(source), "--method", "wanda", "--calibration", str(text), "--num-samples", "4",
              "--seq-len", "64", "--device", "cpu"]
    assert main([*common, "--output", str(tmp_path / "in-memory")]) == 0
    offload = tmp_path / "offload"
    assert main([*common, "--device-map", "auto", "--max-memory", "cpu=120KB", "--offload-folder", str(offload),
                 "--output", str(tmp_path / "offloaded")]) == 0
    assert list((offload / "hf_prune_pruned").glob("model.layers.*.safetensors")), "no layer was offloaded"
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "in-memory").state_dict()
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "offloaded").state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_max_memory_needs_a_device_map(saved_model, capsys):
    source, text = saved_model
    with pytest.raises(SystemExit, match="--max-memory needs --device-map"):
        main(["prune", "--model", str(source), "--calibration", str(text), "--max-memory", "cpu=1GiB"])
    with pytest.raises(SystemExit, match="DEVICE=SIZE"):
        main(["prune", "--model", str(source), "--calibration", str(text), "--device-map", "auto",
              "--max-memory", "1GiB"])


def test_expert_pruning_from_the_command_line(tmp_path, capsys):
    source = save_tiny(tmp_path / "moe", family="mixtral")
    text = tmp_path / "text.txt"
    text.write_text("calibration text for routed experts on the command line. " * 80)
    out = tmp_path / "fewer-experts"
    code = main(["prune", "--model", str(source), "--method", "expert-pruning", "--param", "amount=0.5",
                 "--param", "score=reap", "--calibration", str(text), "--num-samples", "4", "--seq-len", "64",
                 "--device", "cpu", "--output", str(out), "--json"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "routed experts per MoE layer: 2 of 4 (num_local_experts in config.json)" in printed
    results = json.loads(printed[printed.index("{"):])
    assert results["routed_experts"] == [2, 4] and results["parameters_after"] < results["parameters_before"]
    model = AutoModelForCausalLM.from_pretrained(out)  # a standard checkpoint with fewer experts
    assert model.config.num_local_experts == 2 and model.model.layers[0].mlp.experts.down_proj.shape[0] == 2
    card = (out / "README.md").read_text()
    assert "## Experts removed per layer" in card and "| transformers (`AutoModelForCausalLM`) | yes |" in card


def test_depth_pruning_from_the_command_line(saved_model, tmp_path, capsys):
    source, text = saved_model
    out = tmp_path / "shallow"
    code = main(["prune", "--model", str(source), "--method", "depth", "--param", "num_layers=1",
                 "--param", "score=block-influence", "--calibration", str(text), "--num-samples", "4",
                 "--seq-len", "64", "--device", "cpu", "--output", str(out), "--json"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "decoder layers: 1 of 2" in printed
    results = json.loads(printed[printed.index("{"):])
    assert results["decoder_layers"] == [1, 2] and results["parameters_after"] < results["parameters_before"]
    model = AutoModelForCausalLM.from_pretrained(out)  # a standard, shallower checkpoint
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
