"""Structured pruning on SmolLM2-135M: LLM-Rank (default score and the paper's settings) and
mutual-information pruning (compensation on and off) against L1-norm and activation-norm, in one run.

For each method and share of MLP neurons removed (10%, 20%, 30%, 50% by default) this prunes a
copy of the dense model (fp32, CPU), then reports perplexity (first 48 windows of 512
tokens of wiki_sample.txt), parameter count, checkpoint size on disk, and speed against
the dense model measured in the same rounds: prefill tokens/s (batch 1 x 512, one forward
with the cache on and only the last position's logits, as ``generate`` prefills) and decode
tokens/s (greedy, 128 new tokens after a 32-token prompt). Every method keeps the same
number of neurons per layer at a given amount, so the pruned shapes (and speed) are the
same: speed is measured once per amount, on the first method's model. Each saved
checkpoint is reloaded with ``AutoPrunedModelForCausalLM`` and checked to give the same
logits. ``--no-speed`` skips the timing (the table then shows perplexity, pruning time and
parameters only).

    nice -n 19 env OMP_NUM_THREADS=1 python examples/benchmark_structured.py --json results.json

Calibration: ``--num-samples`` x ``--seq-len`` tokens of the bundled C4 sample, seed 0.
Speed: for every pruned model, dense and pruned are timed alternately ``--rounds`` times and
the fastest time of each is kept, so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_EVAL = HERE.parent.parent / "shared" / "data" / "wiki_sample.txt"
METHODS = ("llm-rank", "llm-rank-paper", "llm-rank-energy", "l1-norm-structured", "activation-norm-structured",
           "mutual-info", "mutual-info-uncompensated")
#: benchmark names that are a method with some fields set
VARIANTS = {
    "mutual-info-uncompensated": ("mutual-info", {"compensate": False}),
    # the paper's LLM-Rank: centrality with gamma 0.9 of the score from the flow, theta 0.5, chained
    "llm-rank-paper": ("llm-rank", {"score": "centrality", "scope": "chained", "gamma": 0.9, "theta": 0.5}),
    # the default centrality weighted by each neuron's output norm ``‖W_out[:, j]‖·‖h_j‖``
    "llm-rank-energy": ("llm-rank", {"score": "energy"}),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--amounts", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-text", default=str(DEFAULT_EVAL))
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="alternating dense/pruned timing rounds")
    parser.add_argument("--no-speed", action="store_true", help="skip the prefill/decode timing (saves time)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="extra LLMRankConfig field, e.g. gamma=0.5 (repeatable)")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args()


def make_config(method: str, amount: float, args: argparse.Namespace):
    from hf_prune import PruningConfig

    method, fields = VARIANTS.get(method, (method, {}))
    data = {"method": method, "amount": amount, **fields, "calibration": "c4-sample", "num_samples": args.num_samples,
            "seq_len": args.seq_len, "seed": 0, "device": "cpu"}
    if method == "llm-rank" and not fields:  # --param tunes the plain llm-rank run, not the presets
        for item in args.param:
            key, _, raw = item.partition("=")
            data[key] = json.loads(raw) if raw[:1] in "0123456789-[{tf" else raw
    return PruningConfig.from_dict(data)


def prefill_seconds(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - start


def decode_seconds(model, prompt: torch.Tensor, new_tokens: int) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=model.config.eos_token_id)
        elapsed = time.perf_counter() - start
    assert out.shape[1] - prompt.shape[1] == new_tokens
    return elapsed


def speed(dense, pruned, prefill_ids: torch.Tensor, prompt: torch.Tensor, new_tokens: int, rounds: int) -> dict:
    """Fastest prefill and decode times of both models over alternating rounds."""
    best = {"dense_prefill": float("inf"), "pruned_prefill": float("inf"),
            "dense_decode": float("inf"), "pruned_decode": float("inf")}
    for _ in range(rounds):
        for name, model in (("dense", dense), ("pruned", pruned)):
            best[f"{name}_prefill"] = min(best[f"{name}_prefill"], prefill_seconds(model, prefill_ids))
            best[f"{name}_decode"] = min(best[f"{name}_decode"], decode_seconds(model, prompt, new_tokens))
    tokens = prefill_ids.shape[1]
    return {
        "prefill_tok_s": tokens / best["pruned_prefill"], "dense_prefill_tok_s": tokens / best["dense_prefill"],
        "decode_tok_s": new_tokens / best["pruned_decode"], "dense_decode_tok_s": new_tokens / best["dense_decode"],
        "prefill_speedup": best["dense_prefill"] / best["pruned_prefill"],
        "decode_speedup": best["dense_decode"] / best["pruned_decode"],
    }


def checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def main() -> None:
    args = parse_args()
    from transformers import AutoTokenizer

    from hf_prune import AutoPrunedModelForCausalLM, evaluate_perplexity
    from hf_prune.data.bundled import smollm2_location
    from hf_prune.report import count_parameters
    from hf_prune.surgery import structure_report

    torch.manual_seed(0)
    directory, gguf_file = smollm2_location()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    dense = AutoPrunedModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32).eval()
    text = Path(args.eval_text).read_text()
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    prefill_ids = ids[: args.prefill_tokens].unsqueeze(0)
    prompt = ids[1000:1032].unsqueeze(0)

    results: dict = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
                     "threads": torch.get_num_threads(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        dense.save_pretrained(Path(tmp) / "dense")
        dense_bytes = checkpoint_bytes(Path(tmp) / "dense")
        dense_ppl = evaluate_perplexity(dense, tokenizer, args.eval_text, 512, max_windows=args.eval_windows)
        results["dense"] = {"perplexity": dense_ppl, "parameters": count_parameters(dense), "bytes": dense_bytes}
        print(f"dense: perplexity {dense_ppl:.3f}, {count_parameters(dense)} parameters, {dense_bytes} bytes",
              flush=True)
        for amount in args.amounts:
            timing = None
            for method in args.methods:
                config = make_config(method, amount, args)
                model = copy.deepcopy(dense)
                start = time.perf_counter()
                model.prune(config, tokenizer=tokenizer)
                prune_seconds = time.perf_counter() - start
                ppl = evaluate_perplexity(model, tokenizer, args.eval_text, 512, max_windows=args.eval_windows)
                out = Path(tmp) / f"{method}-{amount}"
                model.save_pretrained(out)
                reloaded = AutoPrunedModelForCausalLM.from_pretrained(out).eval()
                with torch.no_grad():
                    same = torch.equal(model(prompt).logits, reloaded(prompt).logits)
                del reloaded
                report = structure_report(model)
                neurons = [s.mlp_neurons for s in report.shape.layers]
                if timing is None and args.no_speed:
                    timing = {}
                if timing is None:
                    timing = speed(dense, model, prefill_ids, prompt, args.decode_tokens, args.rounds)
                    timing["speed_measured_on"] = method
                run = {"method": method, "amount": amount, "perplexity": ppl, "prune_seconds": prune_seconds,
                       "parameters": count_parameters(model), "bytes": checkpoint_bytes(out),
                       "kept_neurons_per_layer": sorted(set(neurons)), "reload_equal": same, **timing}
                run["parameter_ratio"] = run["parameters"] / results["dense"]["parameters"]
                run["size_ratio"] = run["bytes"] / dense_bytes
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
                del model
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def print_table(results: dict) -> None:
    dense = results["dense"]
    l1 = {r["amount"]: r["perplexity"] for r in results["runs"] if r["method"] == "l1-norm-structured"}
    act = {r["amount"]: r["perplexity"] for r in results["runs"] if r["method"] == "activation-norm-structured"}
    print(f"\ndense perplexity {dense['perplexity']:.2f}, {dense['parameters'] / 1e6:.2f}M parameters, "
          f"{dense['bytes'] / 2**20:.1f} MiB; threads {results['threads']}")
    header = (f"{'method':<27} {'amount':>6} {'ppl':>10} {'ppl/L1':>7} {'ppl/act':>7} {'prune s':>7} "
              f"{'params':>10} {'x dense':>7} {'size':>6} {'prefill tok/s':>13} {'x dense':>7} "
              f"{'decode tok/s':>12} {'x dense':>7}")
    print(header)
    nan = float("nan")
    for r in results["runs"]:
        vs_l1 = r["perplexity"] / l1[r["amount"]] if r["amount"] in l1 else nan
        vs_act = r["perplexity"] / act[r["amount"]] if r["amount"] in act else nan
        print(f"{r['method']:<27} {r['amount']:>6.2f} {r['perplexity']:>10.2f} {vs_l1:>7.3f} {vs_act:>7.3f} "
              f"{r['prune_seconds']:>7.1f} {r['parameters']:>10} {r['parameter_ratio']:>7.4f} {r['size_ratio']:>6.3f} "
              f"{r.get('prefill_tok_s', nan):>13.1f} {r.get('prefill_speedup', nan):>7.3f} "
              f"{r.get('decode_tok_s', nan):>12.1f} {r.get('decode_speedup', nan):>7.3f}")


if __name__ == "__main__":
    main()
