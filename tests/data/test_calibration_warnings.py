"""When "c4" falls back to the bundled sample, the warning names the real cause; "wikitext2" names the extra."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import pytest

from hf_prune.data import calibration
from hf_prune.errors import CalibrationError


@pytest.fixture
def warnings_logged(monkeypatch):
    logged: list[str] = []
    monkeypatch.setattr(calibration.logger, "warning", lambda message, *args: logged.append(message % args))
    return logged


@pytest.fixture
def without_datasets(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))


@pytest.fixture
def unreachable_hub(monkeypatch):
    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)

    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)


def test_missing_datasets_package_is_named_not_the_hub(without_datasets, warnings_logged):
    text, source = calibration.load_text("c4")
    assert text == calibration.BUNDLED_C4.read_text(encoding="utf-8")
    assert source == "c4-sample (bundled; `datasets` not installed)"
    [warning] = warnings_logged
    assert "`datasets` package, which is not installed" in warning and "pip install datasets" in warning
    assert "'.[eval]'" in warning
    assert "Hub" not in warning


def test_unreachable_hub_is_named_when_datasets_is_installed(unreachable_hub, warnings_logged):
    _, source = calibration.load_text("c4")
    assert source == "c4-sample (bundled; hub unreachable)"
    [warning] = warnings_logged
    assert "loading it from the Hugging Face Hub failed (the Hub was asked; ConnectionError" in warning
    assert "datasets` package" not in warning


def test_offline_switch_is_named(unreachable_hub, warnings_logged, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    calibration.load_text("c4")
    assert "HF_HUB_OFFLINE is set" in warnings_logged[0]


def test_wikitext2_without_datasets_names_the_package_and_extra(without_datasets):
    with pytest.raises(CalibrationError, match=r"needs the `datasets` package.*pip install datasets.*\[eval\]"):
        calibration.load_text("wikitext2")
