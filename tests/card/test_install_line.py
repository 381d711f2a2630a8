"""The card's install line is one that works: hf_prune is not on PyPI."""

from __future__ import annotations

import json

from tiny_models import tiny_model

from hf_prune import L1NormStructuredConfig
from hf_prune.card import render


def test_card_does_not_send_readers_to_pypi(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "installed_from", lambda: None)
    monkeypatch.setattr(render, "hub_license", lambda repo_id: None)
    model = tiny_model("llama")
    model.prune(L1NormStructuredConfig(amount=0.5, device="cpu"))
    model.save_pretrained(tmp_path / "out")
    card = " ".join((tmp_path / "out" / "README.md").read_text().split())
    assert "pip install hf_prune`" not in card
    assert "Load it with hf_prune (not on PyPI: `pip install ./hf_prune` from a copy of its source)" in card


def test_card_install_line_names_the_git_repository_it_was_installed_from(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "installed_from", lambda: ("https://example.org/team/hf_prune.git", "0123abc"))
    expected = '`pip install "hf_prune @ git+https://example.org/team/hf_prune.git@0123abc"`'
    assert str(render.install_hint()) == expected


class _Distribution:
    def __init__(self, direct_url, metadata):
        self._direct_url, self.metadata = direct_url, metadata

    def read_text(self, name):
        return json.dumps(self._direct_url) if name == "direct_url.json" and self._direct_url else None


class _Metadata(dict):
    def get_all(self, key):
        value = self.get(key)
        return value if isinstance(value, list) else None


def test_installed_from_reads_pip_records_and_drops_tokens_and_local_paths(monkeypatch):
    from importlib import metadata

    git = {"url": "https://user:hf_secret@example.org/team/hf_prune.git",
           "vcs_info": {"vcs": "git", "commit_id": "0123456789abcdef"}}
    monkeypatch.setattr(metadata, "distribution", lambda name: _Distribution(git, _Metadata()))
    assert render.installed_from() == ("https://example.org/team/hf_prune.git", "0123456789abcdef")

    local = {"url": "file:///home/me/hf_prune", "dir_info": {"editable": True}}
    monkeypatch.setattr(metadata, "distribution", lambda name: _Distribution(local, _Metadata()))
    assert render.installed_from() is None

    listed = _Metadata({"Project-URL": ["Source, https://example.org/team/hf_prune"]})
    monkeypatch.setattr(metadata, "distribution", lambda name: _Distribution(local, listed))
    assert render.installed_from() == ("https://example.org/team/hf_prune", None)
