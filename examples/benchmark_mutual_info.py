"""Mutual-information pruning on SmolLM2-135M against LLM-Rank and L1-norm, in one run; scoring time.

For each share of MLP neurons removed (10%, 20%, 30% by default) this prunes a copy of the
dense model (fp32, CPU) with ``mutual-info`` (compensation on, then off, then the paper's
unweighted redundancy order with compensation), LLM-Rank and the
L1-norm baseline, and reports perplexity on the first 48 windows of 512 tokens of
wiki_sample.txt, its ratio to L1-norm and to LLM-Rank at the same amount, pruning time,
and for mutual-info the time spent scoring each layer (``select_redundant``: moments,
estimator, greedy removal) on the real activations. All methods keep the same number of
neurons per layer at a given amount.

It also times the scoring of one layer in isolation: a seeded random activation matrix of
``--timing-tokens`` x ``--timing-width`` (16384 x 1536 by default, one SmolLM2 MLP) through
``select_redundant`` with the Gaussian estimator (target: under 2 s on CPU), median of
``--timing-repeats`` runs, split into moments, estimator and greedy removal::

    nice -n 19 env OMP_NUM_THREADS=1 python examples/benchmark_mutual_info.py --json results.json
    nice -n 19 env OMP_NUM_THREADS=1 python examples/benchmark_mutual_info.py --timing-only

Calibration: ``--num-samples`` x ``--seq-len`` tokens of the bundled C4 sample, seed 0 (the
same for every method). ``--model DIR`` runs the comparison on another saved model with its
tokenizer (e.g. a tiny one, to check the script).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_EVAL = HERE.parent.parent / "shared" / "data" / "wiki_sample.txt"
#: (label, method, extra fields)
RUNS = (
    ("mutual-info+comp", "mutual-info", {"compensate": True}),
    ("mutual-info", "mutual-info", {"compensate": False}),
    ("mutual-info-paper", "mutual-info", {"compensate": True, "selection": "redundancy"}),
    ("llm-rank", "llm-rank", {}),
    ("l1-norm", "l1-norm-structured", {}),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="'smollm2' (the bundled GGUF) or a saved model directory")
    parser.add_argument("--amounts", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    parser.add_argument("--runs", nargs="+", default=[r[0] for r in RUNS], choices=[r[0] for r in RUNS])
    parser.add_argument("--estimator", default="gaussian", choices=["gaussian", "renyi"])
    parser.add_argument("--num-tokens", type=int, default=None,
                        help="MutualInfoConfig.num_tokens (default per estimator)")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-text", default=str(DEFAULT_EVAL))
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--timing-only", action="store_true", help="only time the scoring of one random layer")
    parser.add_argument("--skip-timing", action="store_true", help="skip the isolated scoring time")
    parser.add_argument("--timing-tokens", type=int, default=16384)
    parser.add_argument("--timing-width", type=int, default=1536)
    parser.add_argument("--timing-amount", type=float, default=0.3)
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args()


def time_scoring(args: argparse.Namespace) -> dict:
    """Seconds to score one layer of random activations, by stage (median over repeats)."""
    from hf_prune import MutualInfoConfig
    from hf_prune.methods.mutual_info.estimators import activation_moments, constant_neurons
    from hf_prune.methods.mutual_info.method import (
        estimate_mutual_information,
        greedy_removal,
        output_energy,
        redundancy,
    )
    from hf_prune.methods.structured.base import kept_count

    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(args.timing_tokens, args.timing_width, generator=generator)
    down_weight = torch.randn(576, args.timing_width, generator=generator)  # SmolLM2's hidden size
    config = MutualInfoConfig(amount=args.timing_amount, estimator="gaussian", num_tokens=args.timing_tokens)
    count = args.timing_width - kept_count(args.timing_width, config.amount, config.round_to)
    stages: dict[str, list[float]] = {"moments": [], "estimator": [], "greedy": [], "total": []}
    for _ in range(args.timing_repeats):
        start = time.perf_counter()
        moments = activation_moments(activations)
        after_moments = time.perf_counter()
        mi = estimate_mutual_information(activations, config, moments)
        after_estimator = time.perf_counter()
        energy = output_energy(moments, down_weight)
        greedy_removal(redundancy(mi, constant_neurons(moments.covariance.diagonal()), energy), count)
        end = time.perf_counter()
        stages["moments"].append(after_moments - start)
        stages["estimator"].append(after_estimator - after_moments)
        stages["greedy"].append(end - after_estimator)
        stages["total"].append(end - start)
    result = {f"{name}_s": statistics.median(values) for name, values in stages.items()}
    result.update(tokens=args.timing_tokens, width=args.timing_width, removed=count, threads=torch.get_num_threads(),
                  repeats=args.timing_repeats, target_s=2.0)
    result["meets_target"] = result["total_s"] < 2.0
    return result


def load(args: argparse.Namespace):
    from transformers import AutoTokenizer

    from hf_prune import AutoPrunedModelForCausalLM

    if args.model == "smollm2":
        from hf_prune.data.bundled import smollm2_location

        directory, gguf_file = smollm2_location()
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        model = AutoPrunedModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoPrunedModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    return model.eval(), tokenizer


def make_config(method: str, extra: dict, amount: float, args: argparse.Namespace):
    from hf_prune import PruningConfig

    data = {"method": method, "amount": amount, "calibration": "c4-sample", "num_samples": args.num_samples,
            "seq_len": args.seq_len, "seed": 0, "device": "cpu", **extra}
    if method == "mutual-info":
        data.update(estimator=args.estimator, num_tokens=args.num_tokens)
    return PruningConfig.from_dict(data)


def compare(args: argparse.Namespace) -> dict:
    import hf_prune.methods.mutual_info.method as mutual_info
    from hf_prune import evaluate_perplexity
    from hf_prune.surgery import structure_report

    layer_seconds: list[float] = []
    original = mutual_info.select_redundant

    def timed(*a, **k):
        start = time.perf_counter()
        out = original(*a, **k)
        layer_seconds.append(time.perf_counter() - start)
        return out

    mutual_info.select_redundant = timed
    dense, tokenizer = load(args)
    results: dict = {"runs": []}
    dense_ppl = evaluate_perplexity(dense, tokenizer, args.eval_text, args.eval_seq_len, max_windows=args.eval_windows)
    results["dense_perplexity"] = dense_ppl
    print(f"dense perplexity {dense_ppl:.3f}", flush=True)
    chosen = [r for r in RUNS if r[0] in args.runs]
    for amount in args.amounts:
        for label, method, extra in chosen:
            model = copy.deepcopy(dense)
            layer_seconds.clear()
            start = time.perf_counter()
            model.prune(make_config(method, extra, amount, args), tokenizer=tokenizer)
            prune_seconds = time.perf_counter() - start
            ppl = evaluate_perplexity(model, tokenizer, args.eval_text, args.eval_seq_len,
                                      max_windows=args.eval_windows)
            neurons = [s.mlp_neurons for s in structure_report(model).shape.layers]
            run = {"run": label, "method": method, "amount": amount, "perplexity": ppl,
                   "prune_seconds": prune_seconds, "kept_neurons_per_layer": sorted(set(neurons))}
            if layer_seconds:
                run["score_seconds_per_layer_median"] = statistics.median(layer_seconds)
                run["score_seconds_per_layer_max"] = max(layer_seconds)
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            del model
    mutual_info.select_redundant = original
    return results


def print_table(results: dict) -> None:
    if "runs" in results:
        by = {(r["run"], r["amount"]): r["perplexity"] for r in results["runs"]}
        print(f"\ndense perplexity {results['dense_perplexity']:.2f}")
        print(f"{'run':<18} {'amount':>6} {'ppl':>9} {'/L1':>7} {'/LLM-Rank':>9} {'prune s':>8} {'score s/layer':>13}")
        for r in results["runs"]:
            l1, rank = by.get(("l1-norm", r["amount"])), by.get(("llm-rank", r["amount"]))
            vs_l1 = r["perplexity"] / l1 if l1 else float("nan")
            vs_rank = r["perplexity"] / rank if rank else float("nan")
            score = r.get("score_seconds_per_layer_median")
            print(f"{r['run']:<18} {r['amount']:>6.2f} {r['perplexity']:>9.2f} {vs_l1:>7.3f} {vs_rank:>9.3f} "
                  f"{r['prune_seconds']:>8.1f} {'' if score is None else f'{score:.2f}':>13}")
    if "timing" in results:
        t = results["timing"]
        print(f"\nscoring one layer ({t['tokens']} tokens x {t['width']} neurons, gaussian, {t['removed']} removed, "
              f"{t['threads']} threads, median of {t['repeats']}): total {t['total_s']:.3f} s = moments "
              f"{t['moments_s']:.3f} + estimator {t['estimator_s']:.3f} + greedy {t['greedy_s']:.3f}; "
              f"target < 2 s: {'met' if t['meets_target'] else 'NOT met'}")


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    results: dict = {"settings": {k: v for k, v in vars(args).items() if k != "json"}}
    if not args.skip_timing:
        results["timing"] = time_scoring(args)
    if not args.timing_only:
        results.update(compare(args))
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
