"""Pruning a mixture-of-experts model against the same model's plain forward pass.

Two models, fp32 on the CPU (or ``--device cuda``):

* ``qwen3-random``: a random Qwen3-MoE-shaped model (``--layers`` 8, ``--hidden`` 512, ``--experts``
  16 of ``--expert-width`` 256 neurons, top-2, 8 heads / 2 KV heads of 64), calibrated on random
  token ids;
* ``smollm2-mixtral``: SmolLM2-135M upcycled into a Mixtral-shaped model (each MLP copied into 4
  experts, top-2; ``examples/moe_upcycle.py``), calibrated on the bundled C4 sample.

For each, in a process of its own: the plain forward pass of the model over the calibration set
(``--batch`` samples at a time, no gradients: the cheapest thing that touches every token), and
each ``--runs`` method (50% unstructured by default). Wall time and CPU time (all threads: the
steadier of the two on a shared machine) are reported; peak memory is the highest resident set
size sampled during the measured part (the model included).

    python examples/benchmark_moe.py --models qwen3-random smollm2-mixtral --runs wanda sparsegpt

llm-compressor is not compared here (it needs its own virtual environment; see
``examples/benchmark.py`` for the dense comparison).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(args: argparse.Namespace):
    """(model, calibration token ids) for ``args.model``."""
    import torch

    if args.model == "qwen3-random":
        import transformers

        from hf_prune import AutoPrunedModelForCausalLM

        config = transformers.Qwen3MoeConfig(
            vocab_size=32000, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=8,
            num_key_value_heads=2, head_dim=64, moe_intermediate_size=args.expert_width, num_experts=args.experts,
            num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=4096, decoder_sparse_step=1,
            mlp_only_layers=[])
        torch.manual_seed(0)
        model = AutoPrunedModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        ids = torch.randint(0, config.vocab_size, (args.num_samples, args.seq_len),
                            generator=torch.Generator().manual_seed(1))
        return model, ids
    if args.model == "smollm2-mixtral":
        sys.path.insert(0, str(HERE))
        from moe_upcycle import load_smollm2, upcycle

        from hf_prune.data.calibration import BUNDLED_C4, tokenize_windows

        dense, tokenizer = load_smollm2()
        model = upcycle(dense, "mixtral")
        del dense
        ids = tokenize_windows(BUNDLED_C4.read_text(encoding="utf-8"), tokenizer, args.num_samples, args.seq_len, 0,
                               "c4-sample").input_ids
        return model, ids
    raise SystemExit(f"unknown model {args.model!r}")


def worker(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from benchmark import PeakMemory

    from hf_prune import PruningConfig

    model, ids = build(args)
    model.to(args.device)
    parameters = sum(p.numel() for p in model.parameters())
    with PeakMemory() as memory:
        start = time.perf_counter()
        cpu_start = time.process_time()
        if args.run == "forward":
            with torch.no_grad():
                for first in range(0, ids.shape[0], args.batch):
                    model(input_ids=ids[first:first + args.batch].to(args.device), use_cache=False)
        else:
            method, _, pattern = args.run.partition(":")
            config = PruningConfig.from_dict({"method": method, "sparsity": 0.5, "pattern": pattern or "unstructured",
                                              "device": args.device})
            model.prune(config, calibration_data=ids)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
    print("RESULT " + json.dumps({"model": args.model, "run": args.run, "seconds": seconds, "cpu_seconds": cpu_seconds,
                                  "peak_rss": memory.peak,
                                  "parameters": parameters, "tokens": ids.numel()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["qwen3-random", "smollm2-mixtral"])
    parser.add_argument("--runs", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--expert-width", type=int, default=256)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="samples per forward in the plain pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="append the results to this file, one JSON line each")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    shared = [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in
              ("layers", "hidden", "experts", "expert_width", "num_samples", "seq_len", "batch", "device")]
    results = []
    for model in args.models:
        for run in ["forward", *args.runs]:
            command = [sys.executable, __file__, "--worker", f"--model={model}", f"--run={run}", *shared]
            output = subprocess.run(command, capture_output=True, text=True, check=False)
            lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
            if output.returncode or not lines:
                raise SystemExit(f"{model} {run} failed:\n{output.stderr[-3000:]}")
            result = json.loads(lines[-1][len("RESULT "):])
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.json:
                with open(args.json, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(result) + "\n")
    print("\n| model | run | wall s | x forward | CPU s | x forward | peak GiB | x forward |")
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        base = next(r for r in results if r["model"] == result["model"] and r["run"] == "forward")
        print(f"| {result['model']} ({result['parameters'] / 1e6:.0f}M, {result['tokens']} tokens) | {result['run']} | "
              f"{result['seconds']:.1f} | {result['seconds'] / base['seconds']:.2f} | "
              f"{result['cpu_seconds']:.1f} | {result['cpu_seconds'] / base['cpu_seconds']:.2f} | "
              f"{result['peak_rss'] / 2**30:.2f} | {result['peak_rss'] / base['peak_rss']:.2f} |")


if __name__ == "__main__":
    main()
