"""The layer walker: a causal LM's decoder layers and the prunable weights inside them.

``layout.DecoderLayout`` finds the layers (``discovery``) and their operators: Linear and
Conv1D projections, and each expert's slice of fused expert weights (``experts``); ``roles``
tells a layer's MLP and attention projections apart by name, for structured methods.
"""

from .experts import ExpertBank, ExpertLayout
from .layout import DecoderLayout, Operator, supported_model_types
from .roles import ArchitectureSpec

__all__ = ["ArchitectureSpec", "DecoderLayout", "ExpertBank", "ExpertLayout", "Operator", "supported_model_types"]
