"""Saving over an existing checkpoint: atomic as a whole, never deleting what it did not write.

An interruption at any file operation (an exception raised, or the process killed with
``os._exit``) leaves the target holding the previous checkpoint, byte for byte, or the new one,
complete; the user's unrelated files survive; staging folders of ours left by a killed save
are removed by the next save; a target that is a file is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import tiny_model

import hf_prune.checkpoint.saving as saving
from hf_prune import AutoPrunedModelForCausalLM, MagnitudeConfig
from hf_prune.errors import SaveDirectoryError

TESTS = Path(__file__).resolve().parents[1]
UNRELATED = {
    "model-card-draft.md": b"# my draft card\n",
    "compressed_backup.tar.gz": b"\x1f\x8b not really gzip",
    "pytorch_model_notes.txt": b"notes about the weights",
    ".hidden": b"dotfile",
    "notes/todo.txt": b"prune more",
    "notes/deep/plan.md": b"a plan",
}
#: The file operations an interrupted save is stopped at (module attributes, patched while saving).
OPERATIONS = [(os, "replace"), (os, "rename"), (os, "link"), (os, "unlink"), (os, "remove"), (os, "rmdir"),
              (shutil, "rmtree"), (shutil, "copy2"), (shutil, "copyfile")]


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 (files), link target (symlinks) or "dir"."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            out[key] = "dir"
        else:
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def add_unrelated(folder: Path) -> None:
    for name, data in UNRELATED.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    os.symlink("notes/todo.txt", folder / "todo-link")


def assert_unrelated_intact(folder: Path) -> None:
    for name, data in UNRELATED.items():
        assert (folder / name).read_bytes() == data, f"{name} was lost or changed"
    assert os.readlink(folder / "todo-link") == "notes/todo.txt"


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".out."))


@pytest.fixture(scope="module")
def models():
    old = tiny_model("llama", seed=0)
    old.prune(MagnitudeConfig(sparsity=0.5))
    new = tiny_model("llama", seed=1)
    new.prune(MagnitudeConfig(sparsity=0.25))
    return old, new


@pytest.fixture
def previous(tmp_path, models):
    """``tmp_path/out``: the old model's checkpoint (with its card) plus unrelated files of the user;
    ``tmp_path/pristine``: a copy to restore it from."""
    old, _ = models
    out = tmp_path / "out"
    old.save_pretrained(out)
    add_unrelated(out)
    shutil.copytree(out, tmp_path / "pristine", symlinks=True)
    return out


def restore(tmp_path: Path) -> None:
    out = tmp_path / "out"
    if out.exists():
        shutil.rmtree(out)
    for name in leftovers(tmp_path):
        shutil.rmtree(tmp_path / name)
    shutil.copytree(tmp_path / "pristine", out, symlinks=True)


def assert_old_or_new(out: Path, old_snapshot: dict[str, str], new_model) -> str:
    """The target holds the old checkpoint byte for byte, or the new one complete (and the user's files)."""
    assert out.is_dir(), "the target folder is missing"
    if snapshot(out) == old_snapshot:
        return "old"
    assert_unrelated_intact(out)
    loaded = AutoPrunedModelForCausalLM.from_pretrained(out)  # checks the record against the weights
    for name, tensor in new_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), f"{name} is neither the old nor the new weight"
    record = json.loads((out / "config.json").read_text())["pruning_config"]
    assert record["sparsity"] == new_model.config.pruning_config["sparsity"]
    return "new"


class Interrupted(BaseException):
    """Like KeyboardInterrupt: no ``except OSError`` or ``except Exception`` of the save swallows it."""


@contextmanager
def interrupt_at(k: int):
    """Raise ``Interrupted`` at the k-th file operation (any of ``OPERATIONS`` or the atomic swap)."""
    monkeypatch = pytest.MonkeyPatch()
    calls = [0]
    targets = [*OPERATIONS, *([(saving, "_exchange")] if hasattr(saving, "_exchange") else [])]
    for owner, name in targets:
        original = getattr(owner, name)

        def hooked(*args, _original=original, _name=name, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                raise Interrupted(f"interrupted at operation {k} ({_name})")
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, hooked)
    try:
        yield calls
    finally:
        monkeypatch.undo()


def _interrupt_every_operation(tmp_path, previous, models) -> dict[str, int]:
    _, new = models
    old_snapshot = snapshot(previous)
    seen = {"old": 0, "new": 0}
    for k in range(1, 500):
        restore(tmp_path)
        with interrupt_at(k) as calls:
            try:
                new.save_pretrained(previous, model_card=False)
                finished = True
            except Interrupted:
                finished = False
        seen[assert_old_or_new(previous, old_snapshot, new)] += 1
        new.save_pretrained(previous, model_card=False)  # the next save completes and cleans up
        assert assert_old_or_new(previous, old_snapshot, new) == "new"
        assert leftovers(tmp_path) == [], "a staging folder was left behind by the next save"
        if finished:
            assert calls[0] < k
            break
    else:
        pytest.fail("the save never completed")
    return seen


def test_a_save_interrupted_at_any_file_operation_leaves_old_or_new(tmp_path, previous, models):
    seen = _interrupt_every_operation(tmp_path, previous, models)
    assert seen["old"] > 0 and seen["new"] > 0


def test_without_an_atomic_swap_an_interrupted_save_still_leaves_old_or_new(tmp_path, previous, models,
                                                                          monkeypatch):
    """Where the system cannot swap folders in one step, the old one is set aside and put back on failure."""
    monkeypatch.setattr(saving, "_RENAMEAT2", None, raising=False)
    seen = _interrupt_every_operation(tmp_path, previous, models)
    assert seen["old"] > 0 and seen["new"] > 0


def test_atomic_swap_is_used_on_linux():
    if sys.platform != "linux":
        pytest.skip("renameat2 is Linux-only")
    assert saving._RENAMEAT2 is not None


_KILLED_SAVE = textwrap.dedent("""
    import os, shutil, sys
    sys.path.insert(0, sys.argv[1])
    from hf_prune import AutoPrunedModelForCausalLM
    import hf_prune.checkpoint.saving as saving

    model = AutoPrunedModelForCausalLM.from_pretrained(sys.argv[2])
    k, calls = int(sys.argv[4]), [0]
    atomic = sys.argv[5] == "atomic"
    if not atomic:
        saving._RENAMEAT2 = None
    for owner, name in [(os, "rename"), (os, "replace"), (shutil, "rmtree"), (saving, "_exchange")]:
        if not hasattr(owner, name) or (name == "_exchange" and not atomic):
            continue
        original = getattr(owner, name)
        def hooked(*args, _original=original, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                os._exit(17)  # killed: no except, no finally, no cleanup
            return _original(*args, **kwargs)
        setattr(owner, name, hooked)
    model.save_pretrained(sys.argv[3], model_card=False)
    print("operations", calls[0])
""")


def _killed_save(source: Path, out: Path, k: int, mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(TESTS), str(source), str(out), str(k), mode],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(("mode", "kills"), [("atomic", range(1, 100)), ("set-aside", [2])])
def test_a_save_killed_at_each_move_leaves_old_or_new_and_the_next_save_cleans_up(tmp_path, previous, models,
                                                                                 mode, kills):
    """Killed (``os._exit``) at each move or removal of a folder (each a few seconds: a fresh process).

    With the atomic swap: at the swap (old stays) and at the removal of the old folder (new is in
    place, the next save removes the leftover). Without it: between setting the old folder aside and
    moving the new one in, where the next save puts the old one back first.
    """
    _, new = models
    source = tmp_path / "new-source"
    new.save_pretrained(source, model_card=False)
    old_snapshot = snapshot(previous)
    seen = set()
    for k in kills:
        restore(tmp_path)
        result = _killed_save(source, previous, k, mode)
        if result.returncode == 0:
            assert "operations" in result.stdout
            break
        assert result.returncode == 17, result.stderr[-2000:]
        if not previous.exists():  # killed between setting the old folder aside and moving the new one in
            assert mode == "set-aside"
            saving._clean_leftovers(previous)  # what the next save does first: put the old checkpoint back
            assert snapshot(previous) == old_snapshot
            seen.add("restored")
        seen.add(assert_old_or_new(previous, old_snapshot, new))
        new.save_pretrained(previous, model_card=False)
        assert assert_old_or_new(previous, old_snapshot, new) == "new"
        assert leftovers(tmp_path) == []
    else:
        if mode == "atomic":
            pytest.fail("the save never completed")
    assert seen == ({"old", "new"} if mode == "atomic" else {"restored", "old"})


def test_a_save_keeps_unrelated_files_and_replaces_only_the_old_weights(tmp_path, models):
    old, new = models
    out = tmp_path / "out"
    old.save_pretrained(out, max_shard_size="100KB", model_card=False)  # several shards and an index
    add_unrelated(out)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the checkpoint")
    before = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("out")}

    new.save_pretrained(out, model_card=False)  # one file now: the old shards and index must go
    assert_unrelated_intact(out)
    assert not list(out.glob("model-*-of-*.safetensors")) and not (out / "model.safetensors.index.json").exists()
    plain = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(plain.model.layers[0].mlp.up_proj.weight, new.model.layers[0].mlp.up_proj.weight)
    after = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("out")}
    assert after == before and leftovers(tmp_path) == []

    new.save_pretrained(out, compressed=True, model_card=False)  # dense -> compressed: no stale dense weights
    assert not (out / "model.safetensors").exists() and (out / "compressed.safetensors").exists()
    assert_unrelated_intact(out)
    with pytest.raises(OSError):
        transformers.AutoModelForCausalLM.from_pretrained(out)  # plain transformers finds no weights to misread


def test_the_folder_keeps_its_permissions(tmp_path, models):
    old, new = models
    out = tmp_path / "out"
    old.save_pretrained(out, model_card=False)
    os.chmod(out, 0o750)
    new.save_pretrained(out, model_card=False)
    assert (out.stat().st_mode & 0o777) == 0o750


def test_stale_staging_folders_of_ours_are_removed_and_others_kept(tmp_path, models):
    old, new = models
    out = tmp_path / "out"
    old.save_pretrained(out, model_card=False)
    stale = [tmp_path / ".out.partial-deadbeef", tmp_path / ".out.replaced-0badf00d"]  # left by killed saves
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 4096)  # a full-size copy, in real life
    foreign = [tmp_path / name for name in (".out.partial-notours", ".other.partial-deadbeef", "out.partial-12345678")]
    for folder in foreign:
        folder.mkdir()
        (folder / "keep").write_text("x")
    new.save_pretrained(out, model_card=False)
    assert not any(folder.exists() for folder in stale)
    for folder in foreign:
        assert (folder / "keep").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == [".out.partial-notours"]


def test_a_staging_folder_of_a_live_save_is_left_alone(tmp_path, models):
    old, new = models
    out = tmp_path / "out"
    old.save_pretrained(out, model_card=False)
    live = tmp_path / ".out.partial-0badf00d"  # another process is saving right now: it holds the lock
    live.mkdir()
    lock = saving._lock(live)
    try:
        new.save_pretrained(out, model_card=False)
        assert live.exists()
    finally:
        saving._unlock(lock)
    new.save_pretrained(out, model_card=False)  # its owner is gone now
    assert not live.exists()


def test_a_file_as_target_is_refused_before_anything_is_written(tmp_path, models, monkeypatch):
    _, new = models
    target = tmp_path / "model-output"
    target.write_text("a file of the user")
    calls = []
    original = transformers.PreTrainedModel.save_pretrained
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained",
                        lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
    with pytest.raises(SaveDirectoryError, match="not a directory"):
        new.save_pretrained(target)
    assert calls == [], "the weights were written before the target was refused"
    assert target.read_text() == "a file of the user"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-output"]
    with pytest.raises(SaveDirectoryError):
        new.save_pretrained(target / "inside")
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["model-output"]


def test_a_symlinked_target_is_saved_through(tmp_path, models):
    old, new = models
    real = tmp_path / "real"
    old.save_pretrained(real, model_card=False)
    (tmp_path / "link").symlink_to(real)
    new.save_pretrained(tmp_path / "link", model_card=False)
    assert (tmp_path / "link").is_symlink()
    loaded = AutoPrunedModelForCausalLM.from_pretrained(real)
    assert torch.equal(loaded.model.layers[1].self_attn.q_proj.weight, new.model.layers[1].self_attn.q_proj.weight)
