"""Pruning configurations: one dataclass per method, validated and JSON round-trippable.

``PruningConfig`` holds what every method shares; subclasses add their own fields and a
``method`` name. ``PruningConfig.from_dict`` dispatches on that name. Nothing read from a
file is ever evaluated: values are checked against the dataclass fields and their types.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from .methods.patterns import Pattern, parse_pattern
from .methods.registry import config_class, pruner_class
from .methods.registry import registered_methods as registered_methods

# Keys that a saved pruning record carries beside the configuration itself.
RECORD_KEYS = frozenset(
    {"method", "hf_prune_version", "calibration_used", "measured_sparsity", "layer_sparsity",
     "structure", "previous", "source", "evaluation", "compressed", "experts"}
)


@dataclass
class OWLSettings:
    """Outlier-weighted layerwise sparsity (arXiv 2310.05175).

    Layers whose ``|W| * ||X||`` scores have more outliers (entries above
    ``threshold`` times the layer mean) get a lower sparsity, within ``max_shift`` of the
    target; the sparsities average to the target.
    """

    threshold: float = 5.0
    max_shift: float = 0.08

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"owl.threshold must be > 0, got {self.threshold}")
        if not 0 <= self.max_shift < 1:
            raise ValueError(f"owl.max_shift must be in [0, 1), got {self.max_shift}")


@dataclass
class PruningConfig:
    """Fields shared by every pruning method.

    Args:
        sparsity: share of weights removed from each targeted row, in [0, 1). For an N:M
            pattern it may be left ``None`` (it is ``1 - N/M``).
        pattern: ``"unstructured"``, or ``"N:M"`` such as ``"2:4"`` or ``"4:8"``.
        targets: glob patterns on module names (full, or relative to the decoder layer, e.g.
            ``"mlp.*"``); default every Linear inside the decoder layers. Embeddings and the
            LM head are never pruned.
        calibration: a dataset name (``"c4"``, ``"wikitext2"``, ``"c4-sample"`` for the bundled
            offline sample) or a path to a ``.txt`` / ``.jsonl`` file.
        num_samples: calibration sequences.
        seq_len: tokens per calibration sequence.
        seed: seed for choosing the calibration windows.
        device: ``"auto"`` (the GPU when there is one), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        owl: OWL non-uniform layer sparsity; ``None`` (off), ``True`` or an ``OWLSettings``.
        batch_size: calibration sequences sent through a layer at once. ``None`` sends all of
            them in one pass, which prunes each operator as soon as its inputs are known (one
            forward pass per layer, inputs already reflect the pruned operators before it).
            A smaller value lowers activation memory and uses two passes per layer.
        expert_token_floor: mixture-of-experts models: an expert routed fewer calibration tokens
            than this is pruned by magnitude (no data) instead of by the method's statistics;
            the pruning record lists every expert's token count and those that fell back.
        expert_gate_weighting: weight each token in an expert's statistics by the router's gate
            value for it (how much of the expert's output the token receives).
    """

    method: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = True
    paper: ClassVar[str] = ""

    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    targets: list[str] | None = None
    calibration: str = "c4"
    num_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    device: str = "auto"
    owl: OWLSettings | None = None
    batch_size: int | None = None
    expert_token_floor: int = 32
    expert_gate_weighting: bool = False

    def __post_init__(self) -> None:
        pattern = parse_pattern(self.pattern)
        self.pattern = str(pattern)
        if pattern.is_nm:
            implied = pattern.implied_sparsity
            if self.sparsity is None:
                self.sparsity = implied
            elif not math.isclose(self.sparsity, implied, abs_tol=1e-9):
                raise ValueError(
                    f"sparsity={self.sparsity} contradicts pattern {pattern}, which removes "
                    f"{implied:g} of the weights: pass sparsity={implied:g} or leave it unset"
                )
        if self.sparsity is None or isinstance(self.sparsity, bool) or not isinstance(
            self.sparsity, (int, float)
        ):
            raise ValueError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if not 0.0 <= float(self.sparsity) < 1.0 or math.isnan(self.sparsity):
            raise ValueError(
                f"sparsity must be in [0, 1) (the share of weights removed), got {self.sparsity}; "
                "for example 0.5 removes half of each row"
            )
        self.sparsity = float(self.sparsity)
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if self.targets is not None and not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"targets must be a list of module-name patterns, got {self.targets!r}")
        for name in ("num_samples", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {self.batch_size!r}")
        if isinstance(self.expert_token_floor, bool) or not isinstance(self.expert_token_floor, int) or (
                self.expert_token_floor < 0):
            raise ValueError(f"expert_token_floor must be a non-negative integer (calibration tokens), got "
                             f"{self.expert_token_floor!r}")
        if not isinstance(self.expert_gate_weighting, bool):
            raise ValueError(f"expert_gate_weighting must be True or False, got {self.expert_gate_weighting!r}")
        if not isinstance(self.calibration, str) or not self.calibration:
            raise ValueError("calibration must be a dataset name or a file path")
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a string such as 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.owl is True:
            self.owl = OWLSettings()
        elif self.owl is False:
            self.owl = None
        elif isinstance(self.owl, dict):
            self.owl = OWLSettings(**self.owl)
        if self.owl is not None:
            if not isinstance(self.owl, OWLSettings):
                raise ValueError(f"owl must be None, True or OWLSettings, got {self.owl!r}")
            if pattern.is_nm:
                raise ValueError(
                    "owl sets a different sparsity per layer, which an N:M pattern fixes: "
                    "use pattern='unstructured' with owl, or turn owl off"
                )

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def uses_calibration(self) -> bool:
        """Whether running this configuration needs calibration activations."""
        return self.needs_calibration or self.owl is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with a ``method`` key, accepted by ``from_dict``."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value = value.to_dict() if isinstance(value, PruningConfig) else dataclasses.asdict(value)
            out[f.name] = value
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        """Build the config named by ``data["method"]``; record-only keys are ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"a pruning config must be a dict, got {type(data).__name__}")
        method = data.get("method", cls.method or None)
        target_cls = config_class(method)
        names = {f.name for f in dataclasses.fields(target_cls)}
        unknown = set(data) - names - RECORD_KEYS
        if unknown:
            raise ValueError(
                f"unknown field(s) {sorted(unknown)} for pruning method {method!r}; "
                f"valid fields: {sorted(names)}"
            )
        kwargs = {k: v for k, v in data.items() if k in names}
        return target_cls._decode_fields(kwargs)

    @classmethod
    def _decode_fields(cls, kwargs: dict[str, Any]) -> PruningConfig:
        """Turn nested JSON values back into their dataclasses; subclasses extend this."""
        return cls(**kwargs)

    def make_pruner(self) -> Any:
        """The ``LayerPruner`` the engine drives for this configuration (from the method registry)."""
        if not self.method:
            raise TypeError(
                f"{type(self).__name__} is not a pruning method; use a method config such as WandaConfig"
            )
        return pruner_class(self.method)(self)

    @classmethod
    def from_json_string(cls, text: str) -> PruningConfig:
        return cls.from_dict(json.loads(text))

