"""hf_prune: post-training pruning of causal language models, on the transformers API.

The package is laid out by the path data takes (see the README's "How the code is laid out"):
``walker`` finds decoder layers and prunable weights, ``engine`` runs calibration data
through one layer at a time, ``methods`` decide what to remove (one module per method,
listed in ``methods.registry``), ``surgery`` removes neurons and heads, ``checkpoint``
saves and verifies, ``card`` writes the model card and publishes, ``training`` keeps the
zeros while fine-tuning and distils from the dense teacher, ``data`` loads calibration and evaluation text.
"""

__version__ = "0.1.0"

from .config import OWLSettings, PruningConfig, registered_methods
from .data.evaluation import evaluate_perplexity
from .errors import (
    CalibrationError,
    CompressedCheckpointError,
    HfPruneError,
    NonFiniteActivationError,
    PruningConfigError,
    PruningRecordError,
    PruningRecordMismatchError,
    SaveDirectoryError,
    SparseKernelError,
    StructureMismatchError,
    SurgeryIndexError,
    UnsupportedArchitectureError,
    UnsupportedOperatorError,
)
from .inference.sparse_kernels import SparseKernelReport, sparse_kernel_plan, to_sparse_kernels
from .methods.barber.method import BarberConfig
from .methods.budget.method import BudgetConfig
from .methods.depth import DepthConfig
from .methods.experts import ExpertPruningConfig
from .methods.fista.method import FISTAConfig
from .methods.hidden_size import HiddenSizeConfig
from .methods.llm_rank import LLMRankConfig
from .methods.magnitude import MagnitudeConfig
from .methods.mutual_info.method import MutualInfoConfig
from .methods.sparsegpt import SparseGPTConfig
from .methods.structured.baselines import ActivationNormStructuredConfig, L1NormStructuredConfig
from .methods.wanda import WandaConfig
from .modeling import AutoPrunedModelForCausalLM, PrunedModelForCausalLM
from .report import PruningReport, measure_sparsity
from .training.callback import SparsityCallback, prepare_for_training
from .training.distillation import (
    DistillationConfig,
    DistillationResult,
    DistillationTrainer,
    PerplexityCallback,
    distill,
    evaluate_kl,
)
from .training.lora import MergeReport, apply_lora, merge_lora_keep_sparsity
from .training.masks import SparsityMasks
from .walker.layout import supported_model_types

__all__ = [
    "ActivationNormStructuredConfig",
    "AutoPrunedModelForCausalLM",
    "BarberConfig",
    "CalibrationError",
    "CompressedCheckpointError",
    "BudgetConfig",
    "DepthConfig",
    "DistillationConfig",
    "DistillationResult",
    "DistillationTrainer",
    "ExpertPruningConfig",
    "HiddenSizeConfig",
    "FISTAConfig",
    "HfPruneError",
    "L1NormStructuredConfig",
    "LLMRankConfig",
    "MagnitudeConfig",
    "MergeReport",
    "MutualInfoConfig",
    "NonFiniteActivationError",
    "OWLSettings",
    "PerplexityCallback",
    "PrunedModelForCausalLM",
    "PruningConfig",
    "PruningConfigError",
    "PruningRecordError",
    "PruningRecordMismatchError",
    "PruningReport",
    "SaveDirectoryError",
    "SparseGPTConfig",
    "SparseKernelError",
    "SparseKernelReport",
    "SparsityCallback",
    "SparsityMasks",
    "StructureMismatchError",
    "SurgeryIndexError",
    "UnsupportedArchitectureError",
    "UnsupportedOperatorError",
    "WandaConfig",
    "__version__",
    "apply_lora",
    "distill",
    "evaluate_kl",
    "evaluate_perplexity",
    "measure_sparsity",
    "merge_lora_keep_sparsity",
    "prepare_for_training",
    "registered_methods",
    "sparse_kernel_plan",
    "supported_model_types",
    "to_sparse_kernels",
]
