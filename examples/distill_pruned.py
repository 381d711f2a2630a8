"""Recovery after pruning on SmolLM2-135M: the LM loss against distillation, on the same tokens.

    python examples/distill_pruned.py --pattern 2:4 --steps 200 --json recovery.json
    python examples/distill_pruned.py --student budget30/ --steps 64 --json recovery.json
    python examples/distill_pruned.py --student budget30/ --steps 128 --train-windows 128 --lr 1e-4 \
        --distill-lr 3e-4 --teacher-dtype bfloat16 --eval-every 32 --json recovery.json

Prunes the bundled SmolLM2-135M-Instruct (Wanda by default, calibration from the bundled C4
sample; ``--student DIR`` loads a model already pruned from it instead, e.g. the output of
``hf-prune prune --method budget --target-params 0.7``), then trains two copies of the pruned
model on the same windows of ``--train-file`` with the same optimizer settings: one with the
LM loss only (``lm_weight=1``), one with the KL to the dense model (``lm_weight=0``,
temperature ``--temperature``; ``--hidden-weight`` and ``--distill-lm-weight`` add the
hidden-state and LM losses, ``--distill-lr`` gives it its own learning rate, since the two
losses do not peak at the same one). ``--runs`` makes one of the two only. Both are measured
the same way: perplexity on ``--eval-file`` and the KL to the dense model on its first
windows, before and after. The zeros are kept in both (``SparsityCallback``). Prints one
line per run, the share of the perplexity gap to the dense model each closed, and how the
two compare in gap closed and in training time (``Trainer``'s runtime, the measurements
excluded); with ``--json``, writes every number.

``--train-windows N`` trains on the first N windows of ``--train-file`` only, seen again epoch
after epoch. ``c4_sample.txt`` holds 590 windows of 512 tokens, so a budget of 300 steps
of 8 x 512 passes over it 4 times; ``--steps 128 --batch-size 4 --train-windows 128`` keeps
those 4 passes at a tenth of the cost. ``--eval-every N`` measures the perplexity every N steps
(its history goes to the JSON).

The LM run never runs the dense model; the distillation run does, forward only, every step
(``--teacher-dtype bfloat16`` halves that forward's time on a CPU with AVX-512 BF16; the KL
before and after is then measured against the bfloat16 teacher).
On a 2-core CPU a step of 4 x 512 tokens takes 8-12 s with the LM loss and 9-13 s with the
KL (bfloat16 teacher) for the 70% budget student, more for a student of the dense shape; use
a GPU for hundreds of steps (the two figures are from two machines of the same 2-core kind).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from hf_prune import AutoPrunedModelForCausalLM, PruningConfig, distill, evaluate_perplexity
from hf_prune.data.bundled import smollm2_location
from hf_prune.data.evaluation import evaluation_windows

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def gap_closed(before: float, after: float, dense: float) -> float:
    """The share of the perplexity gap to the dense model that training closed (1: back to dense)."""
    return (before - after) / (before - dense)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", type=Path, help="a model pruned from the bundled SmolLM2 (skips pruning)")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--train-file", type=Path, default=DATA / "c4_sample.txt")
    parser.add_argument("--eval-file", type=Path, default=DATA / "wiki_sample.txt")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--distill-lr", type=float, help="distillation run: its own peak learning rate (default --lr)")
    parser.add_argument("--hidden-weight", type=float, default=0.0,
                        help="distillation run: weight of the hidden-state loss against the teacher's layers")
    parser.add_argument("--distill-lm-weight", type=float, default=0.0,
                        help="distillation run: share of the LM loss mixed into the KL")
    parser.add_argument("--runs", nargs="+", choices=["lm_loss", "distillation"], default=["lm_loss", "distillation"],
                        help="which of the two runs to make (the comparison needs both)")
    parser.add_argument("--teacher-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the dense model's dtype while it teaches (the dense perplexity is measured in float32)")
    parser.add_argument("--bf16", action="store_true",
                        help="train both runs in bfloat16 mixed precision (float32 weights, bfloat16 matmuls)")
    parser.add_argument("--train-windows", type=int,
                        help="train on the first N windows of --train-file only (seen again each epoch)")
    parser.add_argument("--eval-every", type=int, help="measure the perplexity every N steps")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--kl-windows", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the measured numbers to this file")
    args = parser.parse_args()

    directory, gguf_file = smollm2_location()
    teacher = AutoPrunedModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    if args.student is not None:
        pruned = AutoPrunedModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    else:
        pruned = copy.deepcopy(teacher)
        config = PruningConfig.from_dict({
            "method": args.method, "sparsity": None if ":" in args.pattern else args.sparsity,
            "pattern": args.pattern, "calibration": "c4-sample", "num_samples": args.calib_samples,
            "seq_len": args.calib_seq_len, "seed": args.seed, "device": "auto",
        })
        pruned.prune(config, tokenizer=tokenizer)
    results: dict[str, object] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "perplexity_dense": evaluate_perplexity(teacher, tokenizer, args.eval_file, args.eval_seq_len,
                                                args.eval_windows),
    }
    teacher.to(getattr(torch, args.teacher_dtype))  # after the copy the student was pruned from
    train_data: object = args.train_file
    if args.train_windows is not None:
        train_data = evaluation_windows(tokenizer, args.train_file, args.seq_len, args.train_windows)
        if len(train_data) < args.train_windows:
            parser.error(f"--train-file holds {len(train_data)} windows of {args.seq_len} tokens, fewer than "
                         f"--train-windows {args.train_windows}")
        results["epochs"] = args.steps * args.batch_size / len(train_data)
        print(f"training on {len(train_data)} windows of {args.seq_len} tokens, {results['epochs']:.1f} epochs")
    settings = {"lm_loss": (1.0, 0.0, args.lr),
                "distillation": (args.distill_lm_weight, args.hidden_weight, args.distill_lr or args.lr)}
    for name in args.runs:
        lm_weight, hidden_weight, learning_rate = settings[name]
        start = time.perf_counter()
        result = distill(
            copy.deepcopy(pruned), teacher, train_data, tokenizer, steps=args.steps, seq_len=args.seq_len,
            batch_size=args.batch_size, learning_rate=learning_rate, warmup_steps=args.warmup_steps,
            temperature=args.temperature, lm_weight=lm_weight, hidden_weight=hidden_weight,
            eval_text=args.eval_file, eval_every=args.eval_every, eval_seq_len=args.eval_seq_len,
            eval_windows=args.eval_windows, kl_windows=args.kl_windows, seed=args.seed,
            training_args={"bf16": True} if args.bf16 else None,
        )
        closed = gap_closed(result.perplexity_before, result.perplexity_after, results["perplexity_dense"])
        results[name] = {**result.to_dict(), "gap_closed": closed, "seconds": round(time.perf_counter() - start, 1)}
        print(f"{name}: {result}; {closed:.1%} of the gap to the dense model closed in {result.train_seconds:.0f} s")
    print(f"dense perplexity {results['perplexity_dense']:.3f}")
    if len(args.runs) < 2:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return
    lm, kd = results["lm_loss"], results["distillation"]
    results["gap_closed_ratio"] = kd["gap_closed"] / lm["gap_closed"] if lm["gap_closed"] > 0 else None
    results["train_time_ratio"] = kd["train_seconds"] / lm["train_seconds"]
    ratio = results["gap_closed_ratio"]
    print(f"distillation closes {'n/a (the LM loss closed none)' if ratio is None else f'{ratio:.2f}x'} the "
          f"LM loss's share of the gap, in {results['train_time_ratio']:.2f}x its training time")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
