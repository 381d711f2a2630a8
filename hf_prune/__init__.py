"""hf_prune: post-training pruning of causal language models, on the transformers API."""

__version__ = "0.1.0"

from .architectures import UnsupportedArchitectureError, supported_model_types
from .calibration import CalibrationError
from .compressed import CompressedCheckpointError
from .config import OWLSettings, PruningConfig, registered_methods
from .evaluation import evaluate_perplexity
from .layer_pass import NonFiniteActivationError
from .lora import MergeReport, apply_lora, merge_lora_keep_sparsity
from .masks import SparsityMasks
from .methods import (
    ActivationNormStructuredConfig,
    BarberConfig,
    FISTAConfig,
    L1NormStructuredConfig,
    LLMRankConfig,
    MagnitudeConfig,
    MutualInfoConfig,
    SparseGPTConfig,
    WandaConfig,
)
from .modeling import AutoPrunedModelForCausalLM, PrunedModelForCausalLM
from .record import PruningRecordMismatchError, StructureMismatchError
from .report import PruningReport, measure_sparsity
from .sparse_kernels import SparseKernelError, SparseKernelReport, sparse_kernel_plan, to_sparse_kernels
from .training import SparsityCallback, prepare_for_training

__all__ = [
    "ActivationNormStructuredConfig",
    "AutoPrunedModelForCausalLM",
    "BarberConfig",
    "CalibrationError",
    "CompressedCheckpointError",
    "FISTAConfig",
    "L1NormStructuredConfig",
    "LLMRankConfig",
    "MagnitudeConfig",
    "MergeReport",
    "MutualInfoConfig",
    "NonFiniteActivationError",
    "OWLSettings",
    "PrunedModelForCausalLM",
    "PruningConfig",
    "PruningRecordMismatchError",
    "PruningReport",
    "SparseGPTConfig",
    "SparseKernelError",
    "SparseKernelReport",
    "SparsityCallback",
    "SparsityMasks",
    "StructureMismatchError",
    "UnsupportedArchitectureError",
    "WandaConfig",
    "__version__",
    "apply_lora",
    "evaluate_perplexity",
    "measure_sparsity",
    "merge_lora_keep_sparsity",
    "prepare_for_training",
    "registered_methods",
    "sparse_kernel_plan",
    "supported_model_types",
    "to_sparse_kernels",
]
