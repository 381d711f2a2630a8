"""Is a pruned model faster? 2:4 sparse kernels on a GPU, structured shrinking on a CPU, in one run.

GPU (CUDA, compute capability 8.0+): the model is pruned 2:4 (magnitude: the pattern, not the
method, sets the speed), then a copy is moved onto PyTorch's semi-structured sparse kernels
with ``hf_prune.to_sparse_kernels``. The same weights, dense kernels against 2:4 kernels, are
timed alternately with CUDA events after warmup (median of ``--repeats`` per round, best
round kept):

* prefill: one forward over ``--prefill-batch`` x ``--prefill-len`` tokens (4 x 1024 = 4096);
* decode: greedy ``generate`` of ``--decode-tokens`` new tokens after a 32-token prompt;
* MLP matmuls alone: ``F.linear`` on 4096 tokens for each MLP weight of the first layer
  (plus ``--matmul-shapes OUTxIN`` given by hand, e.g. Llama-7B's 11008x4096 4096x11008).

CPU: the model is shrunk with L1-norm structured pruning (``--structured-amount`` of the MLP
neurons removed) and compared with the dense model: prefill tokens/s (batch 1 x
512, cache on, last position's logits only, as ``generate`` prefills) and decode tokens/s
(greedy, 128 new tokens), dense and shrunk timed alternately, fastest of ``--rounds`` kept.

Models: ``--model`` a local folder or Hub id, ``smollm2`` (the offline SmolLM2-135M GGUF,
the default), or a random-weight config of a known shape (timing does not depend on the
weights' values): ``--tiny`` (a 2-layer toy, to check the script runs), ``--random smollm2-135m``,
``--random llama-1b`` or ``--random llama-7b``.

    python examples/benchmark_speed.py --random llama-1b            # on a GPU machine
    nice -n 19 env OMP_NUM_THREADS=1 python examples/benchmark_speed.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

RANDOM_CONFIGS = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=2048),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096),
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="smollm2", help="folder, Hub id, or 'smollm2' (default)")
    source.add_argument("--random", choices=sorted(RANDOM_CONFIGS), help="random weights of a known shape")
    source.add_argument("--tiny", action="store_true", help="same as --random tiny")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 on GPU, float32 on CPU")
    parser.add_argument("--prefill-batch", type=int, help="default: 4 on GPU, 1 on CPU")
    parser.add_argument("--prefill-len", type=int, help="default: 1024 on GPU, 512 on CPU")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--decode-batch", type=int, default=1)
    parser.add_argument("--matmul-tokens", type=int, default=4096)
    parser.add_argument("--matmul-shapes", nargs="*", default=[], metavar="OUTxIN")
    parser.add_argument("--structured-amount", type=float, default=0.5, help="CPU: share of MLP neurons removed")
    parser.add_argument("--rounds", type=int, default=3, help="alternating dense/pruned timing rounds")
    parser.add_argument("--repeats", type=int, default=5, help="GPU: timed repeats per round (median)")
    parser.add_argument("--warmup", type=int, default=2, help="GPU: untimed calls before each measurement")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.tiny:
        args.random = "tiny"
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    args.dtype = DTYPES[args.dtype or ("float16" if gpu else "float32")]
    args.prefill_batch = args.prefill_batch or (4 if gpu else 1)
    args.prefill_len = args.prefill_len or (1024 if gpu else 512)
    return args


def load_model(args: argparse.Namespace):
    from transformers import LlamaConfig

    from hf_prune import AutoPrunedModelForCausalLM

    if args.random:
        torch.manual_seed(0)
        model = AutoPrunedModelForCausalLM.from_config(LlamaConfig(**RANDOM_CONFIGS[args.random]), dtype=args.dtype)
        name = f"random {args.random}"
    elif args.model == "smollm2":
        from hf_prune.data.bundled import smollm2_location

        directory, gguf_file = smollm2_location()
        model = AutoPrunedModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=args.dtype)
        name = "SmolLM2-135M"
    else:
        model = AutoPrunedModelForCausalLM.from_pretrained(args.model, dtype=args.dtype)
        name = args.model
    return model.to(args.device).eval(), name


# --- timing -----------------------------------------------------------------------------------------


def seconds(fn, device: str, warmup: int = 0, repeats: int = 1) -> float:
    """Median wall time of ``fn()``: CUDA events on a GPU (after ``warmup`` calls), perf_counter on CPU."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                begin = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begin)
    return statistics.median(times)


def compare(pairs: dict[str, tuple], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Best-of-rounds seconds of each (baseline, candidate) callable pair, timed alternately."""
    warmup, repeats = (args.warmup, args.repeats) if args.device == "cuda" else (0, 1)
    best = {name: [float("inf"), float("inf")] for name in pairs}
    for _ in range(args.rounds):
        for name, fns in pairs.items():
            for i, fn in enumerate(fns):
                best[name][i] = min(best[name][i], seconds(fn, args.device, warmup, repeats))
    return {name: {"baseline_s": b, "pruned_s": p, "speedup": b / p} for name, (b, p) in best.items()}


def prefill(model, ids: torch.Tensor):
    return lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1)


def decode(model, prompt: torch.Tensor, new_tokens: int):
    def run():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        assert out.shape[1] - prompt.shape[1] == new_tokens
    return run


# --- GPU: 2:4 kernels -------------------------------------------------------------------------------


def matmul_pairs(model, args: argparse.Namespace) -> tuple[dict[str, tuple], dict[str, tuple], list[str]]:
    """Dense/sparse ``F.linear`` pairs for the first layer's MLP weights and any ``--matmul-shapes``.

    Returns the pairs, each pair's (shape, max |difference|), and the names of the model's MLP pairs.
    """
    from hf_prune.inference.sparse_kernels import kernel_backend
    from hf_prune.methods.patterns import mask_from_scores, parse_pattern
    from hf_prune.walker.layout import DecoderLayout

    _, cls = kernel_backend()
    layout = DecoderLayout(model)
    weights = {}
    for op in layout.operators(0):
        if op.local_name in (*layout.spec.mlp_in, layout.spec.mlp_out):
            weights[op.local_name] = op.read_weight().contiguous()
    mlp = [f"matmul {name}" for name in weights]
    for text in args.matmul_shapes:
        rows, cols = (int(v) for v in text.lower().split("x"))
        dense = torch.randn(rows, cols, device=args.device, dtype=args.dtype)
        weights[f"{rows}x{cols}"] = dense.masked_fill(mask_from_scores(dense.abs(), parse_pattern("2:4"), 0.5), 0)
    pairs, shapes = {}, {}
    for name, weight in weights.items():
        x = torch.randn(args.matmul_tokens, weight.shape[1], device=args.device, dtype=args.dtype)
        sparse = cls.from_dense(weight)
        error = (F.linear(x, sparse) - F.linear(x, weight)).abs().max().item()
        pairs[f"matmul {name}"] = ((lambda x=x, w=weight: F.linear(x, w)), (lambda x=x, w=sparse: F.linear(x, w)))
        shapes[f"matmul {name}"] = (tuple(weight.shape), error)
    return pairs, shapes, mlp


def run_gpu(model, args: argparse.Namespace) -> dict:
    from hf_prune import MagnitudeConfig, to_sparse_kernels

    model.prune(MagnitudeConfig(sparsity=0.5, pattern="2:4", device=args.device))
    sparse = copy.deepcopy(model)
    report = to_sparse_kernels(sparse)
    print(report.summary(), flush=True)
    generator = torch.Generator(device=args.device).manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.prefill_batch, args.prefill_len), device=args.device, generator=generator)
    prompt = torch.randint(0, vocab, (args.decode_batch, 32), device=args.device, generator=generator)
    with torch.no_grad():
        check = ids[:1, :256]
        logit_error = (model(check).logits.float() - sparse(check).logits.float()).abs().max().item()
    pairs, shapes, mlp_names = matmul_pairs(model, args)
    mlp = {name: pairs[name] for name in mlp_names}
    pairs = {"prefill": (prefill(model, ids), prefill(sparse, ids)),
             "decode": (decode(model, prompt, args.decode_tokens), decode(sparse, prompt, args.decode_tokens)),
             **pairs}
    if mlp:
        pairs["matmul MLP total"] = (lambda: [fns[0]() for fns in mlp.values()],
                                     lambda: [fns[1]() for fns in mlp.values()])
    timings = compare(pairs, args)
    tokens = {"prefill": args.prefill_batch * args.prefill_len, "decode": args.decode_tokens * args.decode_batch}
    print(f"\nmax |logit| difference dense vs 2:4 kernels: {logit_error:.4g}")
    print(f"{'':28} {'dense ms':>10} {'2:4 ms':>10} {'speedup':>8}  notes")
    for name, t in timings.items():
        note = (f"{tokens[name]} tokens, dense {tokens[name] / t['baseline_s']:.0f} tok/s, "
                f"2:4 {tokens[name] / t['pruned_s']:.0f} tok/s" if name in tokens else "")
        if name in shapes:
            note = f"(out, in) {shapes[name][0]} x {args.matmul_tokens} tokens, max |diff| {shapes[name][1]:.3g}"
        print(f"{name:28} {t['baseline_s'] * 1e3:10.3f} {t['pruned_s'] * 1e3:10.3f} {t['speedup']:7.2f}x  {note}")
    return {"mode": "gpu-2:4", "device": torch.cuda.get_device_name(), "report": report.summary(),
            "max_logit_difference": logit_error, "tokens": tokens, "timings": timings}


# --- CPU: structured shrinking ----------------------------------------------------------------------


def run_cpu(model, args: argparse.Namespace) -> dict:
    from hf_prune import L1NormStructuredConfig
    from hf_prune.report import count_parameters

    shrunk = copy.deepcopy(model)
    shrunk.prune(L1NormStructuredConfig(amount=args.structured_amount, device="cpu"))
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.prefill_batch, args.prefill_len), generator=generator)
    prompt = torch.randint(0, vocab, (args.decode_batch, 32), generator=generator)
    new = args.decode_tokens
    timings = compare({"prefill": (prefill(model, ids), prefill(shrunk, ids)),
                       "decode": (decode(model, prompt, new), decode(shrunk, prompt, new))}, args)
    tokens = {"prefill": args.prefill_batch * args.prefill_len, "decode": args.decode_tokens * args.decode_batch}
    dense_params, shrunk_params = count_parameters(model), count_parameters(shrunk)
    print(f"parameters: dense {dense_params}, shrunk {shrunk_params} ({shrunk_params / dense_params:.3f}x); "
          f"{torch.get_num_threads()} threads")
    print(f"{'':10} {'dense tok/s':>12} {'shrunk tok/s':>13} {'speedup':>8}")
    for name, t in timings.items():
        print(f"{name:10} {tokens[name] / t['baseline_s']:12.1f} {tokens[name] / t['pruned_s']:13.1f} "
              f"{t['speedup']:7.2f}x")
    return {"mode": "cpu-structured", "amount": args.structured_amount, "threads": torch.get_num_threads(),
            "parameters": {"dense": dense_params, "shrunk": shrunk_params}, "tokens": tokens, "timings": timings}


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible; use --device cpu")
    model, name = load_model(args)
    print(f"{name} on {args.device} ({str(args.dtype).replace('torch.', '')})", flush=True)
    result = run_gpu(model, args) if args.device == "cuda" else run_cpu(model, args)
    result.update(model=name, dtype=str(args.dtype), settings={k: str(v) for k, v in vars(args).items()})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
