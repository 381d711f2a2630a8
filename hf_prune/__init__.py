"""hf_prune: post-training pruning of causal language models, on the transformers API."""

__version__ = "0.1.0"

from .architectures import UnsupportedArchitectureError, supported_model_types
from .calibration import CalibrationError
from .config import OWLSettings, PruningConfig, registered_methods
from .evaluation import evaluate_perplexity
from .layer_pass import NonFiniteActivationError
from .methods import MagnitudeConfig, SparseGPTConfig, WandaConfig
from .modeling import AutoPrunedModelForCausalLM, PrunedModelForCausalLM
from .record import PruningRecordMismatchError
from .report import PruningReport, measure_sparsity

__all__ = [
    "AutoPrunedModelForCausalLM",
    "CalibrationError",
    "MagnitudeConfig",
    "NonFiniteActivationError",
    "OWLSettings",
    "PrunedModelForCausalLM",
    "PruningConfig",
    "PruningRecordMismatchError",
    "PruningReport",
    "SparseGPTConfig",
    "UnsupportedArchitectureError",
    "WandaConfig",
    "__version__",
    "evaluate_perplexity",
    "measure_sparsity",
    "registered_methods",
    "supported_model_types",
]
