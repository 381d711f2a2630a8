"""Peak memory of pruning a model larger than the memory budget (accelerate offload) vs in memory.

A random llama of the given size is saved as safetensors, then pruned (``--method``, Wanda by
default) twice, each in a fresh process so that peaks do not mix: once loaded whole ("in-memory") and once loaded
with ``device_map="auto"``, ``max_memory`` set to ``--budget-mb`` and the rest offloaded to
disk ("offloaded"). Each run reports the growth of host RSS over the process's state after
imports (peak resident set, reset through ``/proc/self/clear_refs`` where Linux allows it),
the peak GPU memory (``torch.cuda.max_memory_allocated``) when a GPU is used, the most weight
bytes materialized at once, and the wall time; the table compares them with the model's size.

    nice -n 19 env OMP_NUM_THREADS=1 python examples/benchmark_offload.py --hidden 1024 --layers 24 --budget-mb 128

``--mmap-threshold 65536`` makes glibc hand freed layer buffers back to the OS at once; without
it the offloaded run's RSS peak also holds heap fragments of earlier layers.

On a GPU the budget applies to the GPU (``max_memory={0: budget, "cpu": --host-budget-mb}``);
on a CPU-only machine it applies to the CPU and everything beyond goes to disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _rss_now() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_peak() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def build(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 256), head_dim=64, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(args.work, max_shard_size="200MB")


METHODS = ("wanda", "sparsegpt", "owl", "llm-rank")


def pruning_config(method: str, device: str):
    """The config each ``--method`` runs: 50% unstructured, or 30% of the MLP neurons for LLM-Rank."""
    from hf_prune import LLMRankConfig, SparseGPTConfig, WandaConfig

    if method == "llm-rank":
        return LLMRankConfig(amount=0.3, device=device)
    if method == "sparsegpt":
        return SparseGPTConfig(sparsity=0.5, device=device)
    return WandaConfig(sparsity=0.5, owl=method == "owl", device=device)


def prune_once(args: argparse.Namespace) -> None:
    import torch

    from hf_prune import AutoPrunedModelForCausalLM
    from hf_prune.data.calibration import build_calibration
    from hf_prune.engine.loop import prune_model

    gpu = torch.cuda.is_available()
    ids = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    calibration = build_calibration(ids, None, "c4-sample", args.samples, args.seq_len, 0)
    config = pruning_config(args.method, "cuda" if gpu else "cpu")
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    _reset_peak()
    base = _rss_now()
    start = time.perf_counter()
    budget = args.budget_mb * 2**20
    if args.mode == "offloaded":
        max_memory = {0: budget, "cpu": args.host_budget_mb * 2**20} if gpu else {"cpu": budget}
        model = AutoPrunedModelForCausalLM.from_pretrained(
            args.work, dtype=torch.float32, device_map="auto", max_memory=max_memory,
            offload_folder=os.path.join(args.scratch, "offload"))
    else:
        model = AutoPrunedModelForCausalLM.from_pretrained(args.work, dtype=torch.float32,
                                                           device_map="cuda" if gpu else None)
    load_peak = _rss_peak() - base
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    run = prune_model(model, config, calibration)
    seconds = time.perf_counter() - start
    result = {
        "mode": args.mode,
        "model_bytes": model_bytes,
        "rss_growth": _rss_peak() - base,
        "rss_growth_load": load_peak,
        "gpu_peak": torch.cuda.max_memory_allocated() if gpu else None,
        "max_materialized": run.offload.peak_materialized_bytes if run.offload else None,
        "max_layer_onloaded": max(run.offload.layer_bytes) if run.offload else None,
        "device_map": sorted(set(getattr(model, "hf_device_map", {"": "cpu"}).values()), key=str),
        "seconds": seconds,
        "sparsity": model.pruning_report().overall,
    }
    print("RESULT " + json.dumps(result, default=str))


def _child(args: argparse.Namespace, mode: str) -> dict | None:
    """Run ``mode`` in a fresh process (so its memory peak is its own); return its RESULT line."""
    command = [sys.executable, __file__, "--child", mode] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "mode" and v is not None
    ]
    env = dict(os.environ)
    if args.mmap_threshold:  # glibc: serve large blocks with mmap so freed layers go back to the OS
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{done.stderr[-4000:]}")
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    return json.loads(line[len("RESULT "):]) if line else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=METHODS, default="wanda",
                        help="wanda/sparsegpt/owl (Wanda with OWL's dense scan): 50%% unstructured; "
                             "llm-rank: 30%% of MLP neurons removed")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 2.75 x hidden")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--budget-mb", type=int, default=128, help="device (GPU, else CPU) memory budget for weights")
    parser.add_argument("--host-budget-mb", type=int, default=64, help="on a GPU: CPU budget before disk")
    parser.add_argument("--mmap-threshold", type=int, default=None,
                        help="set MALLOC_MMAP_THRESHOLD_ (bytes) for the runs: without it glibc keeps freed layer "
                             "buffers in its heap, which inflates the RSS peak of the offloaded run")
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", dest="mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.intermediate is None:
        args.intermediate = (args.hidden * 11 // 4) // 64 * 64
    if args.mode == "build":
        build(args)
        return
    if args.mode is not None:
        prune_once(args)
        return
    with tempfile.TemporaryDirectory(prefix="hf_prune_offload_bench_") as scratch:
        args.scratch = scratch
        args.work = os.path.join(scratch, "model")
        _child(args, "build")
        results = [_child(args, "in-memory"), _child(args, "offloaded")]
    size = results[0]["model_bytes"]
    mib = 2**20
    print(f"method: {args.method}; model: llama hidden {args.hidden}, intermediate {args.intermediate}, "
          f"{args.layers} layers, "
          f"{size / mib:.0f} MiB fp32; budget {args.budget_mb} MiB; calibration {args.samples}x{args.seq_len}; "
          f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold or 'glibc default'}")
    print(f"{'mode':<10} {'placement':<12} {'RSS after load MiB':>19} {'RSS growth MiB':>15} {'/model':>7} "
          f"{'GPU peak MiB':>13} "
          f"{'max weights held MiB':>21} {'seconds':>8} {'sparsity':>9}")
    for r in results:
        gpu = f"{r['gpu_peak'] / mib:.0f}" if r["gpu_peak"] is not None else "-"
        held = f"{r['max_materialized'] / mib:.0f}" if r["max_materialized"] is not None else f"{size / mib:.0f}"
        print(f"{r['mode']:<10} {'+'.join(map(str, r['device_map'])):<12} {r['rss_growth_load'] / mib:>19.0f} "
              f"{r['rss_growth'] / mib:>15.0f} "
              f"{r['rss_growth'] / size:>7.2f} {gpu:>13} {held:>21} {r['seconds']:>8.1f} {r['sparsity']:>9.4f}")
    off, full = results[1], results[0]
    print(f"offloaded / in-memory: RSS growth {off['rss_growth'] / max(full['rss_growth'], 1):.2f}x, "
          f"time {off['seconds'] / full['seconds']:.2f}x")


if __name__ == "__main__":
    main()
