"""2:4 inference: turn 2:4-pruned Linear weights into PyTorch's semi-structured sparse tensors.

``to_sparse_kernels(model)`` converts, in place, every decoder-layer Linear (and GPT-2
``Conv1D``, swapped for the equivalent ``nn.Linear``) whose weight is 2:4 sparse along its
input dimension, is float16/bfloat16, has a shape the kernel accepts and sits on a CUDA GPU
of compute capability 8.0 or newer. Everything else stays dense. The returned
``SparseKernelReport`` names each converted module and why each other one was left dense;
when nothing at all can be converted, ``SparseKernelError`` says why and what to change.
``sparse_kernel_plan(model)`` answers the same question without converting and without
looking at the device (what would convert on a supported GPU). Converted models are for
inference: save checkpoints before converting.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from ..errors import SparseKernelError
from ..methods.patterns import satisfies_nm
from ..walker.layout import DecoderLayout, Operator

logger = logging.get_logger(__name__)

MIN_CAPABILITY = (8, 0)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# sparse-operand (rows, cols) multiples per backend for float16/bfloat16, when torch does not say
_FALLBACK_SHAPES = {"cutlass": (32, 64), "cusparselt": (16, 16)}

FIXES = {
    "torch": "upgrade PyTorch to a build with torch.sparse.to_sparse_semi_structured (2.1 or newer)",
    "dtype": "cast the model to float16 or bfloat16 first (model.half() or model.to(torch.bfloat16))",
    "pattern": "prune with the 2:4 pattern first (e.g. SparseGPTConfig(sparsity=0.5, pattern='2:4'))",
    "shape": "these weights stay dense; the kernel only takes shapes that are multiples of its tile",
    "device": "move the model to a CUDA GPU first (model.to('cuda'))",
    "capability": "use a GPU of compute capability 8.0 or newer (Ampere: A100, A10, RTX 30xx; Ada; Hopper: H100)",
    "kernel": "the sparse kernel refused the weight; it stays dense",
    "converted": "nothing to do: the weight is already a semi-structured sparse tensor",
    "expert": "fused expert weights are multiplied by the experts module's own (grouped) matmuls, not by an "
              "nn.Linear: they stay dense (their zeros still shrink a compressed checkpoint)",
}




@dataclass(frozen=True)
class ModuleDecision:
    """One operator: ``reason`` is ``None`` when it converts (or would), else a key of ``FIXES``."""

    name: str
    shape: tuple[int, int]
    dtype: str
    device: str
    reason: str | None
    detail: str = ""


@dataclass
class SparseKernelReport:
    """Which decoder Linears use the 2:4 kernels (``converted``) and why the others stay dense (``skipped``)."""

    backend: str
    applied: bool
    decisions: list[ModuleDecision] = field(default_factory=list)

    @property
    def eligible(self) -> list[str]:
        """Modules that convert on a supported GPU (converted ones, when ``applied``)."""
        return [d.name for d in self.decisions if d.reason is None]

    @property
    def converted(self) -> list[str]:
        return self.eligible if self.applied else []

    @property
    def skipped(self) -> dict[str, str]:
        """Module name -> why it stays dense."""
        return {d.name: d.detail for d in self.decisions if d.reason is not None}

    @property
    def reasons(self) -> dict[str, str | None]:
        """Module name -> reason key (``None`` when converted or eligible)."""
        return {d.name: d.reason for d in self.decisions}

    def summary(self) -> str:
        verb = "converted" if self.applied else "eligible"
        lines = [f"2:4 sparse kernels ({self.backend}): {len(self.eligible)}/{len(self.decisions)} Linear {verb}"]
        for reason, count in sorted(Counter(d.reason for d in self.decisions if d.reason).items()):
            example = next(d for d in self.decisions if d.reason == reason)
            lines.append(f"  {count} dense because {example.detail} (e.g. {example.name}); fix: {FIXES[reason]}")
        return "\n".join(lines)

    __str__ = summary


def kernel_backend(backend: str = "auto") -> tuple[str, type | None]:
    """``(name, SparseSemiStructuredTensor subclass)`` that converts weights; class ``None`` without support."""
    sparse = torch.sparse
    cutlass = getattr(sparse, "SparseSemiStructuredTensorCUTLASS", None)
    cusparselt = getattr(sparse, "SparseSemiStructuredTensorCUSPARSELT", None)
    if backend == "auto":
        base = getattr(sparse, "SparseSemiStructuredTensor", None)
        forced = bool(getattr(base, "_FORCE_CUTLASS", False))
        available = getattr(getattr(torch.backends, "cusparselt", None), "is_available", lambda: False)()
        backend = "cusparselt" if available and not forced and cusparselt is not None else "cutlass"
    if backend not in _FALLBACK_SHAPES:
        raise ValueError(f"backend must be 'auto', 'cutlass' or 'cusparselt', got {backend!r}")
    return backend, cutlass if backend == "cutlass" else cusparselt


def tile_shape(backend: str, cls: type | None, dtype: torch.dtype) -> tuple[int, int]:
    """The (rows, cols) multiples a weight of ``dtype`` must have for ``backend``."""
    constraint = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
    if constraint is not None:
        return int(constraint.sparse_min_rows), int(constraint.sparse_min_cols)
    return _FALLBACK_SHAPES[backend]


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def _decide(op: Operator, backend: str, cls: type | None, check_device: bool) -> ModuleDecision:
    weight = op.module.weight if op.kind != "expert" else op.stored_weight()
    shape = (op.out_features, op.in_features)
    base = dict(name=op.name, shape=shape, dtype=str(weight.dtype).replace("torch.", ""), device=str(weight.device))
    if op.kind == "expert":
        return ModuleDecision(**base, reason="expert", detail="it is one expert's slice of a fused expert weight")
    sparse_base = getattr(torch.sparse, "SparseSemiStructuredTensor", None)
    if sparse_base is not None and (isinstance(weight, sparse_base) or isinstance(weight.data, sparse_base)):
        return ModuleDecision(**base, reason="converted", detail="it is already converted")
    if cls is None:
        return ModuleDecision(**base, reason="torch", detail=f"this PyTorch ({torch.__version__}) lacks the kernels")
    if weight.dtype not in KERNEL_DTYPES:
        return ModuleDecision(**base, reason="dtype", detail=f"the weights are {base['dtype']}, not float16/bfloat16")
    if 0 in shape or not satisfies_nm(op.read_weight(), 2, 4):
        return ModuleDecision(**base, reason="pattern",
                              detail="the weight is not 2:4 sparse along its input dimension")
    rows, cols = tile_shape(backend, cls, weight.dtype)
    if shape[0] % rows or shape[1] % cols:
        detail = f"its (out, in) shape {shape} is not a multiple of the {backend} tile {(rows, cols)}"
        return ModuleDecision(**base, reason="shape", detail=detail)
    if check_device:
        capability = _capability(weight.device)
        if weight.device.type != "cuda":
            return ModuleDecision(**base, reason="device", detail=f"it is on {weight.device}, not a CUDA GPU")
        if capability is None or capability < MIN_CAPABILITY:
            name = torch.cuda.get_device_name(weight.device)
            return ModuleDecision(**base, reason="capability",
                                  detail=f"{name} has compute capability {capability}, below {MIN_CAPABILITY}")
    return ModuleDecision(**base, reason=None, detail="")


def _operators(model: nn.Module) -> list[Operator]:
    layout = DecoderLayout(model)  # type: ignore[arg-type]
    return [op for index in range(len(layout)) for op in layout.operators(index)]


def sparse_kernel_plan(model: nn.Module, backend: str = "auto") -> SparseKernelReport:
    """What ``to_sparse_kernels`` would convert on a supported GPU (device not checked, nothing changed)."""
    name, cls = kernel_backend(backend)
    return SparseKernelReport(name, False, [_decide(op, name, cls, check_device=False) for op in _operators(model)])


def _as_linear(module: Conv1D) -> nn.Linear:
    """The ``nn.Linear`` computing what a GPT-2 ``Conv1D`` computes (weight transposed to (out, in))."""
    weight = module.weight
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    return linear


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _convert(model: nn.Module, op: Operator, cls: type) -> str | None:
    """Convert one operator; returns torch's message if the kernel refuses the weight."""
    linear = _as_linear(op.module) if isinstance(op.module, Conv1D) else op.module
    try:
        sparse = cls.from_dense(linear.weight.detach().contiguous())
    except RuntimeError as err:
        return str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
    linear.weight = nn.Parameter(sparse, requires_grad=False)
    if linear is not op.module:
        _replace(model, op.name, linear)
    return None


def to_sparse_kernels(model: nn.Module, backend: str = "auto") -> SparseKernelReport:
    """Move every eligible 2:4 decoder Linear of ``model`` onto the semi-structured sparse kernels, in place.

    Raises ``SparseKernelError`` (with ``.report``) when no weight can be converted; otherwise
    returns the report of converted and dense modules (logged as a summary).
    """
    name, cls = kernel_backend(backend)
    decisions = []
    for op in _operators(model):
        decision = _decide(op, name, cls, check_device=True)
        if decision.reason is None:
            refused = _convert(model, op, cls)  # type: ignore[arg-type]
            if refused is not None:
                decision = ModuleDecision(**{**decision.__dict__, "reason": "kernel", "detail": refused})
        decisions.append(decision)
    report = SparseKernelReport(name, True, decisions)
    already = any(d.reason == "converted" for d in decisions)
    if not report.converted and not already:
        raise SparseKernelError(f"no weight could use the 2:4 sparse kernels.\n{report.summary()}", report)
    logger.info("%s", report.summary())
    return report
