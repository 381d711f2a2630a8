"""Bad input: a clear error that names the fix, and nothing written."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import VOCAB, tiny_config, tiny_model

from hf_prune import (
    AutoPrunedModelForCausalLM,
    CalibrationError,
    NonFiniteActivationError,
    PruningRecordMismatchError,
    SparseGPTConfig,
    UnsupportedArchitectureError,
    WandaConfig,
)


def _untouched(model) -> bool:
    return model.pruning_report().overall == 0.0 and not model.is_pruned


def test_nm_width_not_divisible(token_ids):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"input width 64 is not a multiple of M=3.*targets"):
        model.prune(WandaConfig(sparsity=None, pattern="1:3", device="cpu"), calibration_data=token_ids)
    assert _untouched(model)


def test_targets_that_match_nothing(token_ids):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"match no operator.*q_proj"):
        model.prune(WandaConfig(targets=["attn.query"], device="cpu"), calibration_data=token_ids)
    assert _untouched(model)


def test_lm_head_and_embeddings_cannot_be_targeted(token_ids):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="match no operator"):
        model.prune(WandaConfig(targets=["lm_head", "model.embed_tokens"], device="cpu"), calibration_data=token_ids)


def test_calibration_text_shorter_than_one_sample(tmp_path):
    model = tiny_model("llama")
    tokenizer = _char_tokenizer()
    short = tmp_path / "short.txt"
    short.write_text("only a few characters")
    with pytest.raises(CalibrationError, match=r"fewer than one sample of seq_len=64"):
        model.prune(WandaConfig(seq_len=64, device="cpu"), calibration_data=str(short), tokenizer=tokenizer)
    assert _untouched(model)


def test_unknown_calibration_source():
    model = tiny_model("llama")
    with pytest.raises(CalibrationError, match="neither an existing file nor a known dataset"):
        model.prune(WandaConfig(calibration="no/such/file.txt", device="cpu"), tokenizer=_char_tokenizer())


def test_wrong_token_tensor():
    model = tiny_model("llama")
    with pytest.raises(CalibrationError, match=r"shape \[num_samples, seq_len\]"):
        model.prune(WandaConfig(device="cpu"), calibration_data=torch.zeros(4, 8, 2, dtype=torch.long))


def test_nan_in_layer_outputs(token_ids, tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteActivationError, match="decoder layer 0 produced NaN/Inf"):
        model.prune(SparseGPTConfig(device="cpu"), calibration_data=token_ids)
    assert not model.is_pruned


def test_layers_without_prunable_weights_say_what_was_found():
    model = tiny_model("llama")
    model.model.layers = torch.nn.ModuleList([torch.nn.LayerNorm(64) for _ in range(2)])
    with pytest.raises(UnsupportedArchitectureError, match=r"found 2 decoder layers at model.layers \(LayerNorm\)"
                                                           r".*no nn.Linear.*weight \(64,\).*targets"):
        model.prune(WandaConfig(device="cpu"), calibration_data=torch.zeros(2, 8, dtype=torch.long))
    assert not model.is_pruned


def test_model_without_decoder_layers_lists_its_module_lists():
    model = tiny_model("llama")
    model.model.blocks = model.model.layers
    del model.model.layers
    model._no_split_modules = []
    with pytest.raises(UnsupportedArchitectureError, match=r"cannot find the decoder layers.*model.blocks \(2 x "
                                                             r"LlamaDecoderLayer\)"):
        model.prune(WandaConfig(device="cpu"), calibration_data=torch.zeros(2, 8, dtype=torch.long))


def test_save_into_source_directory_is_refused(tmp_path, token_ids):
    source = tmp_path / "source"
    tiny_model("llama").save_pretrained(source)
    before = {p.name: p.stat().st_mtime_ns for p in source.iterdir()}
    model = AutoPrunedModelForCausalLM.from_pretrained(source)
    model.prune(WandaConfig(device="cpu"), calibration_data=token_ids)
    with pytest.raises(ValueError, match="directory this model was loaded from"):
        model.save_pretrained(source)
    assert {p.name: p.stat().st_mtime_ns for p in source.iterdir()} == before


def test_failed_save_leaves_nothing(tmp_path, token_ids, monkeypatch):
    model = tiny_model("llama")
    model.prune(WandaConfig(device="cpu"), calibration_data=token_ids)
    parent = transformers.PreTrainedModel
    original = parent.save_pretrained

    def broken(self, directory, *args, **kwargs):
        original(self, directory, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(parent, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_whose_record_does_not_match(tmp_path, token_ids):
    model = tiny_model("llama")
    model.prune(WandaConfig(sparsity=None, pattern="2:4", device="cpu"), calibration_data=token_ids)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.fill_(0.1)  # as a dense fine-tune would
    model.save_pretrained(tmp_path / "out")
    with pytest.raises(PruningRecordMismatchError, match=r"layers\.1\.mlp\.up_proj.*SparsityCallback"):
        AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out")
    loaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out", verify_pruning=False)
    assert loaded.is_pruned


def test_unknown_method_in_saved_config(tmp_path):
    model = tiny_model("llama")
    model.config.pruning_config = {"method": "prunotron", "sparsity": 0.5}
    transformers.PreTrainedModel.save_pretrained(model, tmp_path / "out")
    with pytest.raises(ValueError, match=r"unknown pruning method 'prunotron'.*pruning_config\.method"):
        AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out")


def _char_tokenizer():
    """A tokenizer without any download: one token per byte, folded into the tiny vocabulary."""

    class ByteTokenizer:
        def __call__(self, text, **kwargs):
            return {"input_ids": [b % VOCAB for b in text.encode("utf-8")]}

    return ByteTokenizer()


def test_tiny_config_is_valid():
    assert tiny_config("llama").num_hidden_layers == 2
