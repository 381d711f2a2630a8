"""The saved record names a local calibration file by its file name only, never by its path."""

from __future__ import annotations

import json

from tiny_models import VOCAB, tiny_model

from hf_prune import AutoPrunedModelForCausalLM, BarberConfig, PruningConfig, WandaConfig


class ByteTokenizer:
    def __call__(self, text, **kwargs):
        return {"input_ids": [b % VOCAB for b in text.encode("utf-8")]}


def test_config_json_keeps_only_the_calibration_file_name(tmp_path):
    folder = tmp_path / "private" / "datasets"
    folder.mkdir(parents=True)
    calibration = folder / "calib.txt"
    calibration.write_text("some calibration text here " * 200)
    model = tiny_model("llama")
    config = WandaConfig(calibration=str(calibration), num_samples=4, seq_len=32, device="cpu")
    model.prune(config, tokenizer=ByteTokenizer())
    assert config.calibration == str(calibration)  # the caller's config is left as given
    model.prune(BarberConfig(calibration=str(calibration), num_samples=4, seq_len=32, device="cpu",
                             rebuild="swaps"), tokenizer=ByteTokenizer())
    out = tmp_path / "out"
    model.save_pretrained(out, model_card=False)

    text = (out / "config.json").read_text()
    assert str(folder) not in text and str(tmp_path) not in text  # what push_to_hub would upload
    record = json.loads(text)["pruning_config"]
    assert record["calibration"] == "calib.txt" and record["initial"]["calibration"] == "calib.txt"
    assert record["previous"][0]["calibration"] == "calib.txt"
    assert record["calibration_used"]["source"] == "file:calib.txt"
    loaded = AutoPrunedModelForCausalLM.from_pretrained(out)
    assert loaded.pruning_config.calibration == "calib.txt"


def test_dataset_names_stay_as_they_are():
    model = tiny_model("llama")
    model.prune(WandaConfig(calibration="c4-sample", num_samples=2, seq_len=32, device="cpu"),
                tokenizer=ByteTokenizer())
    assert model.config.pruning_config["calibration"] == "c4-sample"
    assert PruningConfig.from_dict(model.config.pruning_config).calibration == "c4-sample"
