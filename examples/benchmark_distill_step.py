"""Time of one training step of a pruned SmolLM2 student: LM loss against the KL to the dense model.

    python examples/benchmark_distill_step.py --student budget30/ --batch-size 4 --seq-len 512
    python examples/benchmark_distill_step.py --prune wanda:2:4
    python examples/benchmark_distill_step.py --student budget30/ --batch-size 8 --bf16

``--prune METHOD:PATTERN`` prunes the bundled model in this process instead of loading a student
(16 x 512 calibration tokens of the C4 sample): training right after pruning, as
``examples/distill_pruned.py`` does for its own students, should take no longer than training
a student loaded from disk.

Runs what a ``DistillationTrainer`` step runs, split into its parts: the teacher's forward
(none for the LM loss), the student's forward, the chunked loss over the LM heads, and the
backward pass. Three cases: the LM loss, the KL with the float32 teacher, the KL with the
teacher in bfloat16. The batch is the first windows of ``--text`` (real text: the peaked
distributions of real tokens are what training computes on; ``--random-tokens`` takes random
ids instead). Each case runs one warm-up step, then ``--repeats`` timed steps; the printed
seconds are their mean. One process, the cases one after the other. ``--bf16`` times each case
twice, in float32 and under bfloat16 autocast (what ``bf16=True`` gives a ``DistillationTrainer``),
alternating, so the two come from the same run.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from hf_prune import AutoPrunedModelForCausalLM, PruningConfig
from hf_prune.data.bundled import smollm2_location
from hf_prune.data.evaluation import evaluation_windows
from hf_prune.training.distillation import LogitsPath
from hf_prune.training.losses import chunked_distillation_losses


def timed_step(student: torch.nn.Module, teacher: torch.nn.Module | None, input_ids: torch.Tensor) -> list[float]:
    """Seconds of the teacher's forward, the student's forward, the loss and the backward of one step."""
    student_path = LogitsPath(student)
    teacher_path = LogitsPath(teacher) if teacher is not None else None
    marks = [time.perf_counter()]
    teacher_hidden = None
    if teacher_path is not None:
        with torch.no_grad():
            teacher_hidden = teacher_path.features(input_ids, None)
    marks.append(time.perf_counter())
    student_hidden = student_path.features(input_ids, None)
    marks.append(time.perf_counter())
    losses = chunked_distillation_losses(
        student_hidden, teacher_hidden, student_path.head, teacher_path.head if teacher_path else None,
        labels=None if teacher is not None else input_ids,
    )
    marks.append(time.perf_counter())
    losses.loss.backward()
    marks.append(time.perf_counter())
    student.zero_grad(set_to_none=True)
    return [b - a for a, b in zip(marks, marks[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--student", type=Path, help="a model pruned from the bundled SmolLM2")
    source.add_argument("--prune", metavar="METHOD:PATTERN", help="prune the bundled model here instead, "
                        "e.g. wanda:2:4 or sparsegpt:unstructured (50%%)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--text", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" /
                        "c4_sample.txt", help="the batch's text (default the C4 sample the recovery trains on)")
    parser.add_argument("--random-tokens", action="store_true", help="random token ids instead of --text")
    parser.add_argument("--bf16", action="store_true", help="also time each case under bfloat16 autocast")
    parser.add_argument("--json", type=Path, help="write the measured seconds to this file")
    args = parser.parse_args()

    directory, gguf_file = smollm2_location()
    teacher = AutoPrunedModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32).eval()
    teacher_bf16 = copy.deepcopy(teacher).to(torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    if args.prune:
        method, _, pattern = args.prune.partition(":")
        student = copy.deepcopy(teacher)
        student.prune(PruningConfig.from_dict({
            "method": method, "pattern": pattern or "unstructured",
            "sparsity": 0.5 if pattern in ("", "unstructured") else None, "calibration": "c4-sample",
            "num_samples": 16, "seq_len": 512, "device": "cpu"}), tokenizer=tokenizer)
    else:
        student = AutoPrunedModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    student.train()
    vocab = student.get_output_embeddings().weight.shape[0]
    if args.random_tokens:
        input_ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    else:
        input_ids = evaluation_windows(tokenizer, args.text, args.seq_len, args.batch_size)
    results = {}
    precisions = (False, True) if args.bf16 else (False,)
    for case, model in (("lm_loss", None), ("kl_float32_teacher", teacher), ("kl_bfloat16_teacher", teacher_bf16)):
        for autocast in precisions:
            name = f"{case}_bf16_autocast" if autocast else case
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                timed_step(student, model, input_ids)
                parts = torch.tensor([timed_step(student, model, input_ids)
                                      for _ in range(args.repeats)]).mean(0).tolist()
            results[name] = dict(zip(("teacher_forward", "student_forward", "loss", "backward"), parts),
                                 step=sum(parts))
            print(f"{name}: {sum(parts):.2f} s per step (teacher forward {parts[0]:.2f}, student forward "
                  f"{parts[1]:.2f}, loss {parts[2]:.2f}, backward {parts[3]:.2f})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
