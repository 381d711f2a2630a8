"""Every method's parameters have a meaning and a default, read from the config classes' docstrings."""

from __future__ import annotations

import dataclasses

import pytest

from hf_prune.config import PruningConfig
from hf_prune.methods.parameters import describe_method, docstring_args, method_parameters
from hf_prune.methods.registry import METHODS, config_class


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_field_of_every_method_is_documented(method):
    params = method_parameters(method)
    assert [p.name for p in params if not p.shared] + [p.name for p in params if p.shared] == [p.name for p in params]
    assert {p.name for p in params} == {f.name for f in dataclasses.fields(config_class(method))}
    undocumented = [p.name for p in params if not p.meaning]
    assert not undocumented, f"{method}: document {undocumented} in the Args: section of its config class"


def test_docstring_args_joins_continuation_lines_and_stops_at_the_section_end():
    class Example:
        """Summary.

        Args:
            first: one line.
            second: starts here
                and goes on here.

        Only ``first`` and ``second`` are arguments; this: is not.
        """

    assert docstring_args(Example) == {"first": "one line.", "second": "starts here and goes on here."}


def test_defaults_are_json_as_param_reads_them():
    params = {p.name: p for p in method_parameters("fista")}
    assert params["warm_start"].default == '"sparsegpt"'
    assert params["strict_lambda"].default == "false"
    assert params["devices"].default == "null"
    assert params["sparsity"].shared and not params["warm_start"].shared


def test_structured_methods_explain_sparsity_as_the_neuron_share():
    params = {p.name: p for p in method_parameters("llm-rank")}
    assert "share of MLP neurons" in params["sparsity"].meaning
    plain = {p.name: p for p in method_parameters("wanda")}
    assert plain["sparsity"].meaning.startswith("share of weights removed from each targeted row")
    assert {f.name for f in dataclasses.fields(PruningConfig)} == {n for n, p in plain.items() if p.shared}


def test_describe_method_shows_name_default_and_meaning():
    text = describe_method("sparsegpt")
    assert text.startswith("sparsegpt (SparseGPTConfig, https://arxiv.org/abs/2301.00774)")
    assert "    block_size = 128\n        columns per lazy update" in text
