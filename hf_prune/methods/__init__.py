"""Pruning methods: each module holds one method's config and its algorithm."""

from .barber import BarberConfig
from .base import LayerPruner
from .fista import FISTAConfig
from .llm_rank import LLMRankConfig
from .magnitude import MagnitudeConfig
from .mutual_info import MutualInfoConfig
from .sparsegpt import SparseGPTConfig
from .structured_baselines import ActivationNormStructuredConfig, L1NormStructuredConfig
from .wanda import WandaConfig

__all__ = [
    "ActivationNormStructuredConfig",
    "BarberConfig",
    "FISTAConfig",
    "L1NormStructuredConfig",
    "LLMRankConfig",
    "LayerPruner",
    "MagnitudeConfig",
    "MutualInfoConfig",
    "SparseGPTConfig",
    "WandaConfig",
]
