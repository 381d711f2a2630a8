"""Prune SmolLM2-135M with Wanda, fine-tune it briefly with its zeros kept, and save it.

    python examples/finetune_pruned.py --output smollm2-wanda50-ft            # 50% unstructured
    python examples/finetune_pruned.py --pattern 2:4 --output smollm2-wanda24-ft
    python examples/finetune_pruned.py --lora --output smollm2-wanda50-lora  # LoRA, merged keeping the zeros

Runs on CPU. Steps: prune (Wanda, calibration from the bundled C4 sample), perplexity on
``wiki_sample.txt``, a short ``transformers.Trainer`` run on ``c4_sample.txt`` with
``SparsityCallback`` (AdamW with weight decay: without the callback this fills the zeros
back in), perplexity again, measured sparsity, save. The callback times its own work, so
the run also prints its overhead per step; ``--baseline-steps K`` then trains K more steps
of the same model without the callback (after saving; those weights are thrown away) to
compare step times in the same process.

The defaults fit a 2-core machine (about 15-20 minutes): 32 calibration sequences of 512
tokens, 40 steps of 4 x 256 tokens, perplexity on 16 windows of 512 tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from hf_prune import AutoPrunedModelForCausalLM, WandaConfig, evaluate_perplexity
from hf_prune.training.callback import prepare_for_training
from hf_prune.training.lora import apply_lora, merge_lora_keep_sparsity
from hf_prune.training.masks import check_pruned_weights

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (``on_step_begin`` to ``on_step_end``)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs) -> None:  # noqa: ANN001
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:  # noqa: ANN001
        self.times.append(time.perf_counter() - self._start)


def load_model(args: argparse.Namespace):
    if args.model:
        return (AutoPrunedModelForCausalLM.from_pretrained(args.model, dtype=torch.float32),
                AutoTokenizer.from_pretrained(args.model))
    from hf_prune.data.bundled import smollm2_location

    directory, gguf_file = smollm2_location()
    model = AutoPrunedModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)


def training_windows(tokenizer, path: Path, seq_len: int, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` consecutive ``seq_len``-token windows of the file, as causal-LM examples."""
    ids: list[int] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            ids += tokenizer(line, add_special_tokens=False)["input_ids"]
            if len(ids) >= seq_len * count:
                break
    available = len(ids) // seq_len
    if available < count:
        raise SystemExit(f"{path} holds {available} windows of {seq_len} tokens; the run needs {count}")
    windows = torch.tensor(ids[: count * seq_len]).reshape(count, seq_len)
    return [{"input_ids": w, "labels": w.clone()} for w in windows]


def train(model, data, args: argparse.Namespace, steps: int, callbacks: list) -> tuple[Trainer, StepTimer]:
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="finetune-pruned-") as scratch:  # Trainer's output_dir; nothing kept
        trainer = _trainer(model, data, args, steps, [*callbacks, timer], scratch)
        trainer.train()
    return trainer, timer


def _trainer(model, data, args: argparse.Namespace, steps: int, callbacks: list, scratch: str) -> Trainer:
    training_args = TrainingArguments(
        output_dir=scratch, use_cpu=not torch.cuda.is_available(), report_to=[],
        max_steps=steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, weight_decay=args.weight_decay,
        warmup_steps=min(args.warmup, max(steps - 1, 0)), lr_scheduler_type="linear", logging_steps=args.log_every,
        save_strategy="no", disable_tqdm=False, seed=args.seed, dataloader_num_workers=0,
    )
    return Trainer(model=model, args=training_args, train_dataset=data, callbacks=callbacks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model directory or hub id (default: the offline SmolLM2-135M)")
    parser.add_argument("--output", required=True, help="directory to save the fine-tuned pruned model in")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M such as '2:4'")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--train-file", type=Path, default=DATA / "c4_sample.txt")
    parser.add_argument("--eval-file", type=Path, default=DATA / "wiki_sample.txt")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter and merge it keeping the zeros")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--baseline-steps", type=int, default=0,
                        help="after saving, train this many steps without the callback to compare step times")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the measured numbers to this file")
    args = parser.parse_args()
    if Path(args.output).exists() and any(Path(args.output).iterdir()):
        raise SystemExit(f"{args.output} exists and is not empty; choose a new --output")

    results: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}}
    model, tokenizer = load_model(args)

    def perplexity() -> float:
        return evaluate_perplexity(model, tokenizer, args.eval_file, args.eval_seq_len, max_windows=args.eval_windows)

    start = time.perf_counter()
    report = model.prune(
        WandaConfig(sparsity=None if ":" in args.pattern else args.sparsity, pattern=args.pattern,
                    calibration="c4-sample", num_samples=args.calib_samples, seq_len=args.calib_seq_len,
                    seed=args.seed, device="auto"),
        tokenizer=tokenizer,
    )
    results["prune_seconds"] = time.perf_counter() - start
    results["sparsity_pruned"] = report.overall
    results["ppl_pruned"] = perplexity()
    print(f"pruned ({args.pattern}, sparsity {report.overall:.4f}): perplexity {results['ppl_pruned']:.2f} "
          f"on {args.eval_windows} windows of {args.eval_seq_len} tokens of {args.eval_file.name}")

    data = training_windows(tokenizer, args.train_file, args.seq_len, args.steps * args.batch_size * args.grad_accum)
    trained = apply_lora(model, r=args.lora_rank, lora_alpha=2 * args.lora_rank) if args.lora else model
    callback = prepare_for_training(trained)
    print(f"training {args.steps} steps with {callback.masks}")
    trainer, timer = train(trained, data, args, args.steps, [callback])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    results["train_losses"] = losses
    if args.lora:
        sample = torch.stack([example["input_ids"] for example in data[:2]])
        model, merge_report = merge_lora_keep_sparsity(trained, sample_data=sample)
        print(merge_report)
        results["merge"] = merge_report.to_dict()
    model.eval()
    results["ppl_finetuned"] = perplexity()
    after = model.pruning_report()
    check_pruned_weights(model)
    results["sparsity_finetuned"] = after.overall
    print(f"fine-tuned: perplexity {results['ppl_pruned']:.2f} -> {results['ppl_finetuned']:.2f}, "
          f"sparsity {after.overall:.4f} (pattern {args.pattern} verified), loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    step_times = timer.times[1:] or timer.times  # the first step pays for warm-up
    callback_per_step = callback.seconds / max(callback.steps, 1)
    step = statistics.mean(step_times)
    results["step_seconds"] = step
    results["callback_seconds_per_step"] = callback_per_step
    results["callback_overhead"] = callback_per_step / (step - callback_per_step)
    print(f"mean step {step:.3f}s, of which the callback {callback_per_step * 1000:.1f} ms: overhead "
          f"{results['callback_overhead']:.2%} over training without it")

    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"saved to {args.output}")

    if args.baseline_steps:
        if args.lora:
            print("--baseline-steps is for full fine-tuning; skipped with --lora")
        else:
            _, plain = train(model, data, args, args.baseline_steps, [])
            plain_times = plain.times[1:] or plain.times
            results["baseline_step_seconds"] = statistics.mean(plain_times)
            results["step_ratio_with_callback"] = step / results["baseline_step_seconds"]
            print(f"without the callback: mean step {results['baseline_step_seconds']:.3f}s; with it / without: "
                  f"{results['step_ratio_with_callback']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
