"""Pruning methods: each module holds one method's config and its algorithm."""

from .base import LayerPruner
from .magnitude import MagnitudeConfig
from .sparsegpt import SparseGPTConfig
from .wanda import WandaConfig

__all__ = ["LayerPruner", "MagnitudeConfig", "SparseGPTConfig", "WandaConfig"]
