"""Model surgery: removing MLP neurons, attention heads, decoder layers and routed experts physically, and rebuilding
recorded shapes.

The model gets smaller and faster; per-layer sizes are recorded in
``config.json["pruning_config"]["structure"]`` and rebuilt by
``AutoPrunedModelForCausalLM.from_pretrained`` before the weights load.
"""

from .experts import remove_experts, set_expert_count
from .geometry import AttentionGeometry, LayerSizes, attention_geometry, layer_sizes
from .layers import remove_layers
from .reload import LOADER_ADVICE, apply_structure, rebuild_recorded_structure
from .shrink import shrink_attention, shrink_mlp
from .structure import ModelShape, StructureReport, model_shape, structure_record, structure_report, structure_summary

__all__ = [
    "LOADER_ADVICE",
    "AttentionGeometry",
    "LayerSizes",
    "ModelShape",
    "StructureReport",
    "apply_structure",
    "attention_geometry",
    "layer_sizes",
    "model_shape",
    "rebuild_recorded_structure",
    "remove_experts",
    "remove_layers",
    "set_expert_count",
    "shrink_attention",
    "shrink_mlp",
    "structure_record",
    "structure_report",
    "structure_summary",
]
