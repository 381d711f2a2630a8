"""Which layer score makes the best depth pruning? SmolLM2-135M, same calibration for every score.

For each score of ``DepthConfig`` (angular distance of a contiguous block, Block Influence,
loss increase and KL divergence when one layer is skipped) and each number of layers removed,
this prunes a copy of the dense model (fp32, CPU) and reports which layers went, the
perplexity on the first ``--eval-windows`` windows of 512 tokens of wiki_sample.txt, and the
pruning time.

    nice -n 5 python examples/benchmark_depth.py --layers 3 9 --json depth.json

Calibration: ``--num-samples`` x ``--seq-len`` tokens of the bundled C4 sample, seed 0; the
skip scores run the whole model once per layer on ``--score-samples`` of them.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_EVAL = HERE.parent.parent / "shared" / "data" / "wiki_sample.txt"


def parse_args() -> argparse.Namespace:
    from hf_prune.methods.depth import SCORES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", nargs="+", default=list(SCORES), choices=SCORES)
    parser.add_argument("--layers", nargs="+", type=int, default=[3, 9], help="decoder layers removed (of 30)")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--score-samples", type=int, default=16)
    parser.add_argument("--eval-text", default=str(DEFAULT_EVAL))
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from transformers import AutoTokenizer

    from hf_prune import AutoPrunedModelForCausalLM, DepthConfig, evaluate_perplexity
    from hf_prune.data.bundled import smollm2_location

    directory, gguf_file = smollm2_location()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    dense = AutoPrunedModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32).eval()
    dense_ppl = evaluate_perplexity(dense, tokenizer, args.eval_text, 512, max_windows=args.eval_windows)
    print(f"dense: perplexity {dense_ppl:.3f}", flush=True)
    results = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "threads": torch.get_num_threads(),
               "dense_perplexity": dense_ppl, "runs": []}
    for count in args.layers:
        for score in args.scores:
            model = copy.deepcopy(dense)
            config = DepthConfig(num_layers=count, score=score, calibration="c4-sample", num_samples=args.num_samples,
                                 seq_len=args.seq_len, seed=0, device="cpu", score_samples=args.score_samples)
            start = time.perf_counter()
            model.prune(config, tokenizer=tokenizer)
            seconds = time.perf_counter() - start
            kept = model.config.pruning_config["structure"]["kept_layers"]
            removed = [i for i in range(len(kept) + count) if i not in kept]
            ppl = evaluate_perplexity(model, tokenizer, args.eval_text, 512, max_windows=args.eval_windows)
            run = {"score": score, "layers_removed": count, "removed": removed, "perplexity": ppl,
                   "prune_seconds": seconds}
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            del model
    print(f"\ndense perplexity {dense_ppl:.2f}; threads {results['threads']}")
    print(f"{'score':<16} {'removed':>7} {'perplexity':>10} {'seconds':>8}  layers")
    for run in results["runs"]:
        print(f"{run['score']:<16} {run['layers_removed']:>7} {run['perplexity']:>10.2f} {run['prune_seconds']:>8.1f}  "
              f"{run['removed']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
