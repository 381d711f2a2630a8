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

``--llmc-python /path/to/venv/bin/python`` also prunes each model with llm-compressor (installed in
its own virtual environment), as its MoE documentation says: ``oneshot`` with ``targets=["Linear"]``
and the routers and LM head ignored (``re:.*mlp.gate$``, ``re:.*lm_head``); it replaces each fused
experts module with one ``Linear`` per expert ("linearizes" it) and by default sends every
calibration token through every expert (``moe_calibrate_all_experts``). The tools alternate
per run. Every worker, of either tool, loads the very same saved checkpoint and token ids.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
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


def prepare(args: argparse.Namespace, folder: Path) -> None:
    """Once per model: a plain transformers checkpoint (and a tokenizer, which llm-compressor asks
    for) and the calibration token ids, read by every worker of either tool."""
    import torch

    from hf_prune.data.bundled import smollm2_location

    model, ids = build(args)
    plain = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers.models."))
    model.__class__ = plain  # save as the transformers class: nothing of hf_prune in the checkpoint
    model.save_pretrained(folder)
    from transformers import AutoTokenizer

    directory, gguf_file = smollm2_location()
    AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file).save_pretrained(folder)
    torch.save(ids, folder / "calibration.pt")


def prune_with_llmcompressor(model, ids, run: str) -> None:
    """llm-compressor's documented one-shot call on a MoE model (see the module docstring)."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    method, _, pattern = run.partition(":")
    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
    recipe = modifier(sparsity=0.5, mask_structure=pattern or "0:0", targets=["Linear"],
                      ignore=["re:.*lm_head", "re:.*mlp.gate$"])
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)


def expert_zero_share(model) -> float:
    """Share of zeros in the first layer's expert weights (fused 3-D parameters or one Linear per expert)."""
    weights = [p for n, p in model.named_parameters() if ".layers.0." in n and ".experts." in n and p.dim() >= 2]
    return sum(int((w == 0).sum()) for w in weights) / max(sum(w.numel() for w in weights), 1)


def worker(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from benchmark import PeakMemory

    folder = Path(args.data)
    ids = torch.load(folder / "calibration.pt")
    if args.tool == "llmcompressor":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    else:
        from hf_prune import AutoPrunedModelForCausalLM

        model = AutoPrunedModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.to(args.device)
    parameters = sum(p.numel() for p in model.parameters())
    with PeakMemory() as memory:
        start = time.perf_counter()
        cpu_start = time.process_time()
        if args.run == "forward":
            with torch.no_grad():
                for first in range(0, ids.shape[0], args.batch):
                    model(input_ids=ids[first:first + args.batch].to(args.device), use_cache=False)
        elif args.tool == "llmcompressor":
            prune_with_llmcompressor(model, ids, args.run)
        else:
            from hf_prune import PruningConfig

            method, _, pattern = args.run.partition(":")
            config = PruningConfig.from_dict({"method": method, "sparsity": 0.5, "pattern": pattern or "unstructured",
                                              "device": args.device})
            model.prune(config, calibration_data=ids)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
    print("RESULT " + json.dumps({"model": args.model, "tool": args.tool, "run": args.run, "seconds": seconds,
                                  "cpu_seconds": cpu_seconds, "peak_rss": memory.peak, "parameters": parameters,
                                  "tokens": ids.numel(), "expert_zero_share": expert_zero_share(model)}), flush=True)


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
    parser.add_argument("--llmc-python", help="python of a virtual environment with llmcompressor installed")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--tool", default="hf_prune", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    shared = [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in ("batch", "device")]
    tools = [("hf_prune", sys.executable)] + ([("llmcompressor", args.llmc_python)] if args.llmc_python else [])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            folder = Path(tmp) / model
            args.model = model
            prepare(args, folder)
            for run in ["forward", *args.runs]:
                for tool, python in (tools[:1] if run == "forward" else tools):
                    command = [python, __file__, "--worker", f"--model={model}", f"--run={run}", f"--tool={tool}",
                               f"--data={folder}", *shared]
                    output = subprocess.run(command, capture_output=True, text=True, check=False)
                    lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
                    if output.returncode or not lines:
                        raise SystemExit(f"{tool} {model} {run} failed:\n{output.stderr[-3000:]}")
                    result = json.loads(lines[-1][len("RESULT "):])
                    results.append(result)
                    print(json.dumps(result), flush=True)
                    if args.json:
                        with open(args.json, "a", encoding="utf-8") as handle:
                            handle.write(json.dumps(result) + "\n")
    print_table(results)


def print_table(results: list[dict]) -> None:
    """Each run against its model's plain forward pass and, for hf_prune, against llm-compressor's run."""
    print("\n| model | tool | run | wall s | x forward | CPU s | x forward | peak GiB | x forward | expert zeros |"
          " wall vs llmc | peak vs llmc |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        base = next(r for r in results if r["model"] == result["model"] and r["run"] == "forward")
        peer = next((r for r in results if r["model"] == result["model"] and r["run"] == result["run"]
                     and r["tool"] == "llmcompressor"), None)
        versus = ["", ""]
        if peer is not None and result["tool"] == "hf_prune":
            versus = [f"{result['seconds'] / peer['seconds']:.2f}x", f"{result['peak_rss'] / peer['peak_rss']:.2f}x"]
        print(f"| {result['model']} ({result['parameters'] / 1e6:.0f}M, {result['tokens']} tokens) | "
              f"{result['tool']} | {result['run']} | {result['seconds']:.1f} | "
              f"{result['seconds'] / base['seconds']:.2f} | "
              f"{result['cpu_seconds']:.1f} | {result['cpu_seconds'] / base['cpu_seconds']:.2f} | "
              f"{result['peak_rss'] / 2**30:.2f} | {result['peak_rss'] / base['peak_rss']:.2f} | "
              f"{result['expert_zero_share']:.3f} | " + " | ".join(versus) + " |")


if __name__ == "__main__":
    main()
