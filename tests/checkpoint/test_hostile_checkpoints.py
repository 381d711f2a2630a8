"""Crafted compressed checkpoints are refused with a clear error, and nothing outside is written.

A compressed checkpoint's ``config.json`` maps stored files to dense names that the loader
creates; a checkpoint from the Hub is as untrusted as one from disk. Every name must be a
plain file name, every header is checked (shapes against the model the config builds, total
size against the model) before anything is written, and writes stay in the loader's own
temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model

import hf_prune.checkpoint.compressed as compressed_module
from hf_prune import AutoPrunedModelForCausalLM, CompressedCheckpointError, MagnitudeConfig
from hf_prune.checkpoint.compressed import MASK_SUFFIX, SHAPE_SUFFIX, VALUES_SUFFIX, pack_bits

WEIGHT = "model.layers.0.mlp.down_proj.weight"


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root`` (links not followed): size and SHA-256."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
        elif path.is_dir():
            out[str(path.relative_to(root)) + "/"] = (0, "")
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A compressed single-file and a compressed sharded checkpoint of a pruned tiny Llama."""
    root = tmp_path_factory.mktemp("pristine")
    model = tiny_model("llama")
    model.prune(MagnitudeConfig(sparsity=0.5))
    model.save_pretrained(root / "single", compressed=True, model_card=False)
    model.save_pretrained(root / "sharded", compressed=True, max_shard_size="100KB", model_card=False)
    assert (root / "sharded" / "compressed.safetensors.index.json").exists()
    return root


@pytest.fixture
def world(tmp_path, pristine):
    """tmp_path holds: the checkpoint to craft (``ckpt``), the decompression folder (``scratch``) and
    files of the user that an attack would target (``victim/``)."""
    shutil.copytree(pristine / "single", tmp_path / "ckpt")
    shutil.copytree(pristine / "sharded", tmp_path / "ckpt-sharded")
    (tmp_path / "scratch").mkdir()
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "model.safetensors").write_bytes(b"precious user data")
    (tmp_path / "victim" / "notes.json").write_text('{"keep": true}')
    return tmp_path


def _edit_layout(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config["pruning_config"]["compressed"])
    (folder / "config.json").write_text(json.dumps(config))


def _edit_tensors(folder: Path, name: str, edit) -> None:
    path = folder / name
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)


def _load_refused(world: Path, folder: str, monkeypatch, match: str) -> None:
    """Load ``folder``; it must be refused before any dense file is written, and nothing outside
    the checkpoint and the decompression folder may be created or changed."""
    writes: list[object] = []
    original = compressed_module._write_dense_safetensors

    def recording(*args, **kwargs):
        writes.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(compressed_module, "_write_dense_safetensors", recording)
    checkpoint = world / folder
    before = {k: v for k, v in snapshot(world).items() if not k.startswith(("scratch", folder + "/"))}
    with pytest.raises(CompressedCheckpointError, match=match):
        AutoPrunedModelForCausalLM.from_pretrained(checkpoint, decompress_dir=world / "scratch")
    after = {k: v for k, v in snapshot(world).items() if not k.startswith(("scratch", folder + "/"))}
    assert after == before, "a file outside the checkpoint and the temporary folder was created or changed"
    assert (world / "victim" / "model.safetensors").read_bytes() == b"precious user data"
    assert list((world / "scratch").iterdir()) == [], "the temporary folder was left behind"
    assert writes == [], "a dense file was written before the checkpoint was refused"


def _absolute(world: Path) -> str:
    return str(world / "victim" / "model.safetensors")


@pytest.mark.parametrize(
    "dense_name",
    ["ABSOLUTE", "../../victim/model.safetensors", "../model.safetensors", "sub/model.safetensors",
     "..\\..\\victim\\model.safetensors", "..", "model.safetensors/../../x", ""],
)
def test_dense_names_outside_the_folder_are_refused(world, monkeypatch, dense_name):
    name = _absolute(world) if dense_name == "ABSOLUTE" else dense_name
    _edit_layout(world / "ckpt", lambda layout: layout.update(files={"compressed.safetensors": name}))
    _load_refused(world, "ckpt", monkeypatch, "not a plain file name|hf_prune writes")


@pytest.mark.parametrize("stored_name", ["ABSOLUTE", "../victim/compressed.safetensors", "./compressed.safetensors"])
def test_stored_names_outside_the_folder_are_refused(world, monkeypatch, stored_name):
    shutil.copyfile(world / "ckpt" / "compressed.safetensors", world / "victim" / "compressed.safetensors")
    name = str(world / "victim" / "compressed.safetensors") if stored_name == "ABSOLUTE" else stored_name
    _edit_layout(world / "ckpt", lambda layout: layout.update(files={name: "model.safetensors"}))
    _load_refused(world, "ckpt", monkeypatch, "not a plain file name|hf_prune writes")


@pytest.mark.parametrize("dense_index", ["ABSOLUTE", "../../victim/notes.json", "../model.safetensors.index.json"])
def test_index_names_outside_the_folder_are_refused(world, monkeypatch, dense_index):
    name = str(world / "victim" / "notes.json") if dense_index == "ABSOLUTE" else dense_index
    _edit_layout(world / "ckpt-sharded",
                 lambda layout: layout.update(index={"compressed.safetensors.index.json": name}))
    _load_refused(world, "ckpt-sharded", monkeypatch, "not a plain file name|hf_prune writes")


def test_an_index_naming_an_unknown_shard_is_refused(world, monkeypatch):
    path = world / "ckpt-sharded" / "compressed.safetensors.index.json"
    index = json.loads(path.read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "compressed-00009-of-00009.safetensors"
    path.write_text(json.dumps(index))
    _load_refused(world, "ckpt-sharded", monkeypatch, "does not list")


def test_a_wrong_dense_shape_is_refused_before_writing(world, monkeypatch):
    def transpose_shape(tensors):
        rows, cols = tensors[WEIGHT + SHAPE_SUFFIX].tolist()
        tensors[WEIGHT + SHAPE_SUFFIX] = torch.tensor([cols, rows])  # same entries, the bitmask still fits

    _edit_tensors(world / "ckpt", "compressed.safetensors", transpose_shape)
    _load_refused(world, "ckpt", monkeypatch, "dense shape")


def _inflate(tensors, name: str, shape: list[int]) -> None:
    """Store ``name`` as an all-zero tensor of ``shape``: no values, a bitmask of zeros."""
    count = math.prod(shape)
    tensors[name + VALUES_SUFFIX] = torch.zeros(0, dtype=torch.float32)
    tensors[name + MASK_SUFFIX] = pack_bits(torch.zeros(count, dtype=torch.bool))
    tensors[name + SHAPE_SUFFIX] = torch.tensor(shape)


def test_an_inflated_bitmask_under_a_new_name_is_refused(world, monkeypatch):
    """1 MiB of zero bits would become 32 MiB of float32 zeros, more than the whole model holds."""
    _edit_tensors(world / "ckpt", "compressed.safetensors", lambda t: _inflate(t, "evil.weight", [2048, 4096]))
    size = (world / "ckpt" / "compressed.safetensors").stat().st_size
    assert size < 2 * 2**20
    _load_refused(world, "ckpt", monkeypatch, "more than the .* the whole model")


def test_an_inflated_bitmask_of_a_model_weight_is_refused(world, monkeypatch):
    _edit_tensors(world / "ckpt", "compressed.safetensors", lambda t: _inflate(t, WEIGHT, [2048, 4096]))
    _load_refused(world, "ckpt", monkeypatch, "dense shape")


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.update({WEIGHT + MASK_SUFFIX: t[WEIGHT + MASK_SUFFIX][:-1]}),  # a bitmask too short
        lambda t: t.update({WEIGHT + SHAPE_SUFFIX: torch.tensor([-1, -8])}),  # negative dims
        lambda t: t.update({WEIGHT + SHAPE_SUFFIX: torch.tensor([2.0, 3.0])}),  # a float shape
        lambda t: t.update({WEIGHT: torch.zeros(2)}),  # stored dense and compressed
        lambda t: t.update({"orphan" + MASK_SUFFIX: torch.zeros(1, dtype=torch.uint8)}),  # mask without values
        lambda t: t.update({WEIGHT + VALUES_SUFFIX: torch.zeros(10**6)}),  # more values than entries
    ],
    ids=["short-mask", "negative-dims", "float-shape", "twice", "orphan-mask", "too-many-values"],
)
def test_damaged_headers_are_refused_before_writing(world, monkeypatch, edit):
    _edit_tensors(world / "ckpt", "compressed.safetensors", edit)
    _load_refused(world, "ckpt", monkeypatch, ".")


def test_layout_entries_of_the_wrong_type_are_refused(world, monkeypatch):
    for files in (["compressed.safetensors"], {}, {"compressed.safetensors": 3}, "compressed.safetensors"):
        _edit_layout(world / "ckpt", lambda layout, files=files: layout.update(files=files))
        _load_refused(world, "ckpt", monkeypatch, ".")


def test_the_untouched_checkpoint_still_loads(world, pristine):
    """The checks refuse nothing real: both pristine checkpoints load, bit for bit."""
    single = AutoPrunedModelForCausalLM.from_pretrained(world / "ckpt", decompress_dir=world / "scratch")
    sharded = AutoPrunedModelForCausalLM.from_pretrained(world / "ckpt-sharded", decompress_dir=world / "scratch")
    for name, tensor in single.state_dict().items():
        assert torch.equal(tensor, sharded.state_dict()[name]), name
    assert list((world / "scratch").iterdir()) == []
