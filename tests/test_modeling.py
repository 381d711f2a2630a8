"""save_pretrained writes the tokenizer the model came with, so a saved folder is a complete model."""

from __future__ import annotations

from tiny_models import save_tiny, tiny_model, tiny_tokenizer
from transformers import AutoTokenizer

from hf_prune import AutoPrunedModelForCausalLM, WandaConfig
from hf_prune.cli import main


def _text(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("calibration and evaluation text for the command line. " * 80)
    return text


def test_saved_folder_carries_the_source_tokenizer_and_feeds_the_cli(tmp_path):
    source = save_tiny(tmp_path / "tiny")
    text = _text(tmp_path)
    config = WandaConfig(sparsity=0.5, calibration=str(text), num_samples=4, seq_len=64, device="cpu")
    model = AutoPrunedModelForCausalLM.from_pretrained(source, pruning_config=config)
    model.save_pretrained(tmp_path / "pruned")  # no tokenizer passed: the one beside the source is written

    saved = AutoTokenizer.from_pretrained(tmp_path / "pruned")
    sample = "hello world"
    assert saved(sample)["input_ids"] == tiny_tokenizer()(sample)["input_ids"]
    assert main(["prune", "--model", str(tmp_path / "pruned"), "--method", "wanda", "--pattern", "2:4",
                 "--calibration", str(text), "--num-samples", "4", "--seq-len", "64", "--device", "cpu",
                 "--output", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "tokenizer.json").is_file()


def test_tokenizer_given_to_prune_is_saved_and_false_skips_it(tmp_path, token_ids):
    model = tiny_model("llama")  # built from a config: no source to load a tokenizer from
    model.prune(WandaConfig(sparsity=0.5, device="cpu", num_samples=2, seq_len=64),
                calibration_data=["some calibration text for the tiny tokenizer " * 20], tokenizer=tiny_tokenizer())
    model.save_pretrained(tmp_path / "with")
    assert (tmp_path / "with" / "tokenizer.json").is_file()
    model.save_pretrained(tmp_path / "without", tokenizer=False)
    assert not (tmp_path / "without" / "tokenizer.json").exists()
    assert (tmp_path / "without" / "model.safetensors").is_file()


def test_model_without_any_tokenizer_saves_alone(tmp_path, token_ids):
    model = tiny_model("llama")
    model.prune(WandaConfig(sparsity=0.5, device="cpu"), calibration_data=token_ids)
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "tokenizer.json").exists()
