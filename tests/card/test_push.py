"""push_to_hub and ``hf-prune push`` against an HfApi replaced at its boundary (no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard
from tiny_models import VOCAB, tiny_model
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from hf_prune import AutoPrunedModelForCausalLM, WandaConfig
from hf_prune.card.render import PLOT_NAME
from hf_prune.checkpoint.provenance import record_evaluation
from hf_prune.cli import main

TOKEN = "hf_SECRETtokenvalue1234567890"


class FakeHfApi:
    """Records every call; keeps a copy of each uploaded folder (the real one is temporary)."""

    calls: list[tuple[str, dict]] = []
    uploads: list[Path] = []
    store: Path

    def __init__(self, token=None, **kwargs):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": folder_path, **kwargs}))
        copy = self.store / f"upload{len(self.uploads)}"
        shutil.copytree(folder_path, copy)
        self.uploads.append(copy)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0")


@pytest.fixture
def api(monkeypatch, tmp_path):
    FakeHfApi.calls = []
    FakeHfApi.uploads = []
    FakeHfApi.store = tmp_path / "hub"
    monkeypatch.setattr("hf_prune.card.hub.HfApi", FakeHfApi)
    monkeypatch.setattr("hf_prune.card.render.hub_license", lambda repo_id: None)
    return FakeHfApi


def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def _pruned(token_ids):
    model = tiny_model("qwen3")
    model.prune(WandaConfig(sparsity=0.5, device="cpu"), calibration_data=token_ids)
    return model


def _names(calls):
    return [name for name, _ in calls if name != "init"]


def test_push_uploads_weights_record_tokenizer_card_and_plot(api, token_ids):
    model = _pruned(token_ids)
    record_evaluation(model, 80.0, 91.0, "wikitext2", 32, 4)
    commit = model.push_to_hub("someone/tiny-wanda", tokenizer=_tokenizer(), private=True, revision="pruned",
                               commit_message="first upload", token=TOKEN, notes="made in a test",
                               base_model="Qwen/Qwen3-0.6B", license="apache-2.0")
    assert commit.commit_url.startswith("https://huggingface.co/someone/tiny-wanda")
    assert _names(api.calls) == ["create_repo", "create_branch", "upload_folder"]
    calls = dict((name, kwargs) for name, kwargs in api.calls)
    assert calls["init"]["token"] == TOKEN
    assert calls["create_repo"]["private"] is True and calls["create_repo"]["exist_ok"] is True
    assert calls["create_branch"]["branch"] == "pruned"
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "someone/tiny-wanda" and upload["revision"] == "pruned"
    assert upload["commit_message"] == "first upload"

    folder = api.uploads[0]
    files = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
            PLOT_NAME} <= files
    record = json.loads((folder / "config.json").read_text())["pruning_config"]
    assert record["method"] == "wanda" and record["measured_sparsity"]["overall"] == pytest.approx(0.5)
    text = (folder / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.base_model == "Qwen/Qwen3-0.6B" and card.data.model_name == "tiny-wanda"
    assert {r.metric_value for r in card.data.eval_results} == {80.0, 91.0}
    assert 'from_pretrained("someone/tiny-wanda")' in text and "made in a test" in text
    assert TOKEN not in text and TOKEN not in (folder / "config.json").read_text()
    assert "/tmp" not in text and "hf_prune_push_" not in text

    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_push_defaults_and_no_tokenizer_warning(api, token_ids, caplog):
    model = _pruned(token_ids)
    model.push_to_hub("someone/tiny")
    assert _names(api.calls) == ["create_repo", "upload_folder"]  # no branch asked for
    upload = dict(api.calls)["upload_folder"]
    assert upload["revision"] is None and "wanda" in upload["commit_message"]
    assert "tokenizer.json" not in {p.name for p in api.uploads[0].iterdir()}


def test_nothing_is_uploaded_when_saving_fails(api, token_ids, monkeypatch):
    model = _pruned(token_ids)

    def disk_full(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        model.push_to_hub("someone/tiny", tokenizer=_tokenizer())
    assert _names(api.calls) == []


def test_nothing_is_uploaded_when_the_tokenizer_or_card_fails(api, token_ids):
    model = _pruned(token_ids)

    class BrokenTokenizer:
        def save_pretrained(self, directory):
            raise RuntimeError("tokenizer cannot be written")

    with pytest.raises(RuntimeError, match="tokenizer cannot be written"):
        model.push_to_hub("someone/tiny", tokenizer=BrokenTokenizer())
    with pytest.raises(ValueError, match="not a hub model id"):
        model.push_to_hub("someone/tiny", tokenizer=_tokenizer(), base_model="/home/me/base")
    with pytest.raises(ValueError, match="not a valid hub repository id"):
        model.push_to_hub("someone/bad name!", tokenizer=_tokenizer())
    assert _names(api.calls) == []


def test_cli_push_uploads_a_saved_checkpoint_with_a_fresh_card(api, token_ids, tmp_path, capsys):
    model = _pruned(token_ids)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    _tokenizer().save_pretrained(saved)
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    assert main(["push", str(saved), "someone/tiny-cli", "--private", "--revision", "v1", "--license", "mit",
                 "--commit-message", "cli upload", "--notes", "pushed from the CLI"]) == 0
    assert "someone/tiny-cli" in capsys.readouterr().out
    assert _names(api.calls) == ["create_repo", "create_branch", "upload_folder"]
    assert dict(api.calls)["upload_folder"]["commit_message"] == "cli upload"
    folder = api.uploads[0]
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", PLOT_NAME} <= {
        p.name for p in folder.iterdir()}
    card = ModelCard((folder / "README.md").read_text())
    assert card.data.license == "mit" and "pushed from the CLI" in card.text
    assert 'from_pretrained("someone/tiny-cli")' in card.text
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before  # the saved directory is untouched
    reloaded = AutoPrunedModelForCausalLM.from_pretrained(folder)
    assert reloaded.pruning_report().overall == pytest.approx(0.5)


def test_cli_push_refuses_an_unpruned_directory(api, tmp_path, capsys):
    dense = tmp_path / "dense"
    tiny_model("qwen3").save_pretrained(dense)
    assert main(["push", str(dense), "someone/dense"]) == 2
    assert "no pruning record" in capsys.readouterr().err
    assert _names(api.calls) == []
