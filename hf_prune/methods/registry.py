"""The one list of pruning methods: method name -> config class and pruner class.

Like transformers' ``AUTO_QUANTIZER_MAPPING``, this table is the only place a method is
registered, and it is complete whatever has been imported so far. Classes are named by
module and attribute and imported on first use (transformers' auto mappings do the same),
so ``hf_prune.config`` can resolve a ``method`` key without importing every method, and no
import cycle arises. Adding a method means adding a module under ``methods/`` and one row here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import HfPruneError


class UnknownMethodError(HfPruneError, ValueError):
    """A ``method`` name that no registered method has."""


@dataclass(frozen=True)
class MethodEntry:
    """Where one method's config and pruner classes live (module relative to ``hf_prune.methods``)."""

    module: str
    config: str
    pruner: str


METHODS: dict[str, MethodEntry] = {
    "magnitude": MethodEntry("magnitude", "MagnitudeConfig", "MagnitudePruner"),
    "wanda": MethodEntry("wanda", "WandaConfig", "WandaPruner"),
    "sparsegpt": MethodEntry("sparsegpt", "SparseGPTConfig", "SparseGPTPruner"),
    "fista": MethodEntry("fista.method", "FISTAConfig", "FISTAPruner"),
    "barber": MethodEntry("barber.method", "BarberConfig", "BarberPruner"),
    "llm-rank": MethodEntry("llm_rank", "LLMRankConfig", "LLMRankPruner"),
    "mutual-info": MethodEntry("mutual_info.method", "MutualInfoConfig", "MutualInfoPruner"),
    "l1-norm-structured": MethodEntry("structured.baselines", "L1NormStructuredConfig", "L1NormStructuredPruner"),
    "activation-norm-structured": MethodEntry(
        "structured.baselines", "ActivationNormStructuredConfig", "ActivationNormStructuredPruner"
    ),
    "depth": MethodEntry("depth", "DepthConfig", "DepthPruner"),
    "expert-pruning": MethodEntry("experts", "ExpertPruningConfig", "ExpertPruner"),
    "hidden-size": MethodEntry("hidden_size", "HiddenSizeConfig", "HiddenSizePruner"),
    "budget": MethodEntry("budget.method", "BudgetConfig", "BudgetPruner"),
}


def _entry(name: object) -> MethodEntry:
    if not isinstance(name, str) or name not in METHODS:
        raise UnknownMethodError(
            f"unknown pruning method {name!r}; known methods: {', '.join(sorted(METHODS))}. "
            "Check the 'method' key (in config.json: pruning_config.method)"
        )
    return METHODS[name]


def _load(entry: MethodEntry, attribute: str) -> type:
    module = importlib.import_module(f"{__package__}.{entry.module}")
    return getattr(module, attribute)


def config_class(name: object) -> type:
    """The ``PruningConfig`` subclass registered as ``name``."""
    entry = _entry(name)
    return _load(entry, entry.config)


def pruner_class(name: object) -> type:
    """The ``LayerPruner`` subclass that runs the method registered as ``name``."""
    entry = _entry(name)
    return _load(entry, entry.pruner)


def registered_methods() -> dict[str, type]:
    """Method name -> config class, for every registered method."""
    return {name: config_class(name) for name in METHODS}
