"""Pruning configurations: one dataclass per method, validated and JSON round-trippable.

``PruningConfig`` holds what every method shares; subclasses add their own fields and a
``method`` name. ``PruningConfig.from_dict`` dispatches on that name. Nothing read from a
file is ever evaluated: values are checked against the dataclass fields and their types.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import PruningConfigError
from .methods.patterns import Pattern, parse_pattern
from .methods.registry import config_class, pruner_class
from .methods.registry import registered_methods as registered_methods

# Keys that a saved pruning record carries beside the configuration itself.
RECORD_KEYS = frozenset(
    {"method", "hf_prune_version", "calibration_used", "measured_sparsity", "layer_sparsity",
     "structure", "previous", "source", "evaluation", "compressed", "experts",
     "removed_experts", "distillation", "removed_channels", "budget_search"}
)
#: Deepest nesting of lists and dicts accepted in a config or record read from a file. A real
#: record nests 5 levels (previous -> run -> measured_sparsity -> modules -> value).
MAX_NESTING = 32
#: Integer fields are handed to torch as int64.
INT_LIMIT = 2**63
#: Devices a configuration may name: torch device types that hold real data ("meta" holds none).
_DEVICE_HELP = "'auto', 'cpu', 'cuda', 'cuda:1', 'mps'..."


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, so a hostile value cannot flood a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_nesting(value: Any, limit: int = MAX_NESTING, what: str = "pruning_config") -> None:
    """Raise ``PruningConfigError`` if ``value`` nests lists/dicts deeper than ``limit`` (checked without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, (list, tuple)):
            children = list(item)
        else:
            continue
        if depth >= limit:
            raise PruningConfigError(
                what, f"{what} nests lists and dicts more than {limit} levels deep; a pruning record never does. "
                "The file was crafted or damaged: save the pruned model again"
            )
        stack.extend((child, depth + 1) for child in children)


class _Mismatch(Exception):
    """A value does not have the type a field's annotation names."""


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return f"a list of {_describe(item).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "True or False", int: "an integer in [-2**63, 2**63)", float: "a finite number", str: "a string",
            dict: "a dict"}.get(hint, f"a {getattr(hint, '__name__', hint)}")


def _conform(value: Any, hint: Any) -> Any:
    """``value`` as the annotation ``hint`` wants it (ints become floats for float fields), or ``_Mismatch``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _conform(value, option)
            except _Mismatch:
                continue
        raise _Mismatch
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool) and -INT_LIMIT <= value < INT_LIMIT:
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch
        try:
            number = float(value)
        except OverflowError:
            raise _Mismatch from None
        if not math.isfinite(number):
            raise _Mismatch
        return number
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        (item,) = typing.get_args(hint) or (Any,)
        return [_conform(v, item) for v in value]
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise _Mismatch


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_field_types(obj: Any, prefix: str = "") -> None:
    """Check every dataclass field of ``obj`` against its annotation; ints in float fields become floats.

    Raises ``PruningConfigError`` naming the first field whose value has another type, is not
    finite, or is an integer beyond int64.
    """
    for name, hint in _field_hints(type(obj)).items():
        value = getattr(obj, name)
        try:
            conformed = _conform(value, hint)
        except _Mismatch:
            field = prefix + name
            raise PruningConfigError(
                field, f"{field} must be {_describe(hint)}, got {short_repr(value)} ({type(value).__name__})"
            ) from None
        if conformed is not value:
            object.__setattr__(obj, name, conformed)


def check_device(value: str, field: str = "device") -> None:
    """Raise ``PruningConfigError`` unless ``value`` is ``"auto"`` or a torch device that holds data."""
    if value == "auto":
        return
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError) as err:
        raise PruningConfigError(field, f"{field}: {short_repr(value)} is not a torch device ({err}); use "
                                 f"{_DEVICE_HELP}") from None
    if device.type == "meta":
        raise PruningConfigError(field, f"{field}: {value!r} holds no data, so nothing can be pruned on it; use "
                                 f"{_DEVICE_HELP}")


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
        check_field_types(self, prefix="owl.")
        if not self.threshold > 0:
            raise PruningConfigError("owl.threshold", f"owl.threshold must be > 0, got {self.threshold}")
        if not 0 <= self.max_shift < 1:
            raise PruningConfigError("owl.max_shift", f"owl.max_shift must be in [0, 1), got {self.max_shift}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OWLSettings:
        """Settings from their ``dataclasses.asdict`` form; unknown keys are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k if isinstance(k, str) else short_repr(k) for k in data if k not in names)
        if unknown:
            raise PruningConfigError("owl", f"unknown owl setting(s) {unknown}; valid: {sorted(names)}")
        return cls(**data)


@dataclass
class PruningConfig:
    """Fields shared by every pruning method.

    Every field is checked at construction (and by ``from_dict``): a value of the wrong type
    or out of range raises ``PruningConfigError`` (a ``ValueError``) naming the field.

    Args:
        sparsity: share of weights removed from each targeted row, in [0, 1). For an N:M
            pattern it may be left ``None`` (it is ``1 - N/M``).
        pattern: ``"unstructured"``, or ``"N:M"`` such as ``"2:4"`` or ``"4:8"``.
        targets: glob patterns on module names (full, or relative to the decoder layer, e.g.
            ``"mlp.*"``), a list (or tuple, or one string); default every Linear inside the
            decoder layers. Embeddings and the LM head are never pruned.
        calibration: a dataset name (``"c4"``, ``"wikitext2"``, ``"c4-sample"`` for the bundled
            offline sample) or a path to a ``.txt`` / ``.jsonl`` file (the saved record keeps
            only its file name).
        num_samples: calibration sequences.
        seq_len: tokens per calibration sequence (at most the model's context length).
        seed: seed for choosing the calibration windows, in [0, 2**63).
        device: ``"auto"`` (the GPU when there is one), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        owl: OWL non-uniform layer sparsity; ``None`` (off), ``True`` or an ``OWLSettings``.
        batch_size: calibration sequences sent through a layer at once. ``None`` sends all of
            them in one pass. A smaller value lowers activation memory; each layer then takes
            two passes (statistics, then outputs), and ``true_sequential`` must be False.
        true_sequential: where a layer's later operators take their statistics. True: from
            the outputs of the layer's already pruned earlier operators (o_proj sees the pruned
            q/k/v, the MLP the pruned attention); each operator is pruned inside the layer's
            one forward pass as soon as its statistics are complete. False: every operator
            of a layer from the layer's dense pass, all pruned together afterwards, as in the
            Wanda and SparseGPT reference code and llm-compressor; a second pass computes the
            pruned layer's outputs. ``None`` (default): the method's choice (its config's
            ``default_true_sequential()``), or False when ``batch_size`` splits the samples.
            Either way the next layer is calibrated on the pruned layer's outputs.
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
    true_sequential: bool | None = None
    expert_token_floor: int = 32
    expert_gate_weighting: bool = False

    def default_true_sequential(self) -> bool:
        """The method's ``true_sequential`` when the field is ``None``: True (one pass per layer) unless a
        method measured better otherwise."""
        return True

    @property
    def resolved_true_sequential(self) -> bool:
        """``true_sequential``, or the method's default when it is ``None``."""
        return self.default_true_sequential() if self.true_sequential is None else self.true_sequential

    def _normalize_fields(self) -> None:
        """Turn the accepted shorthands into the annotated types (before the type check)."""
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.targets, (set, frozenset)):
            raise PruningConfigError(
                "targets", f"targets must be a list of module-name patterns, got a {type(self.targets).__name__} "
                f"{short_repr(self.targets)}: pass a list (sorted(...)), which keeps the saved record in order"
            )
        if self.owl is True:
            self.owl = OWLSettings()
        elif self.owl is False:
            self.owl = None
        elif isinstance(self.owl, dict):
            self.owl = OWLSettings.from_dict(self.owl)
        if self.owl is not None and not isinstance(self.owl, OWLSettings):
            raise PruningConfigError("owl", f"owl must be None, True or OWLSettings, got {short_repr(self.owl)}")

    def _resolve_amount(self, count_field: str, count_minimum: int, count_meaning: str, amount_meaning: str,
                        default: float) -> None:
        """For whole-model structured methods: settle ``amount`` (a share removed) against an exact count.

        Either ``count_field`` (at least ``count_minimum``) or ``amount`` may be given, not both; without
        either, ``amount`` is ``sparsity`` or ``default``. ``sparsity`` then mirrors ``amount`` (0 with a count).
        """
        count = getattr(self, count_field)
        if count is not None:
            if count < count_minimum:
                kind = "positive" if count_minimum > 0 else "non-negative"
                raise PruningConfigError(count_field, f"{count_field} must be a {kind} integer ({count_meaning}), "
                                         f"got {count!r}")
            if self.amount is not None:
                raise PruningConfigError("amount", f"pass either amount (the share of {amount_meaning} removed) or "
                                         f"{count_field} ({count_meaning}), not both")
            self.sparsity = 0.0
            return
        self._settle_amount(amount_meaning, default)

    def _settle_amount(self, amount_meaning: str, default: float) -> None:
        """``amount`` (a share of ``amount_meaning`` removed, default ``sparsity`` or ``default``) in [0, 1),
        agreeing with ``sparsity``, which then mirrors it."""
        if self.amount is None:
            self.amount = self.sparsity if self.sparsity is not None else default
        if not 0 <= self.amount < 1:
            raise PruningConfigError("amount", f"amount must be in [0, 1) (the share of {amount_meaning} "
                                     f"removed), got {self.amount!r}")
        if self.sparsity is not None and not math.isclose(self.sparsity, self.amount, abs_tol=1e-9):
            raise PruningConfigError("amount", f"amount={self.amount} and sparsity={self.sparsity} differ; pass "
                                     "only amount")
        self.sparsity = self.amount

    def _check_types(self) -> None:
        """Normalise shorthands, then check every field's type (``PruningConfigError`` naming it)."""
        self._normalize_fields()
        check_field_types(self)

    def __post_init__(self) -> None:
        self._check_types()
        try:
            pattern = parse_pattern(self.pattern)
        except ValueError as err:
            raise PruningConfigError("pattern", str(err)) from None
        self.pattern = str(pattern)
        if pattern.is_nm:
            implied = pattern.implied_sparsity
            if self.sparsity is None:
                self.sparsity = implied
            elif not math.isclose(self.sparsity, implied, abs_tol=1e-9):
                raise PruningConfigError(
                    "sparsity", f"sparsity={self.sparsity} contradicts pattern {pattern}, which removes "
                    f"{implied:g} of the weights: pass sparsity={implied:g} or leave it unset"
                )
        if self.sparsity is None:
            raise PruningConfigError("sparsity", "sparsity must be a number in [0, 1), got None (only an N:M "
                                     "pattern implies it)")
        if not 0.0 <= self.sparsity < 1.0:
            raise PruningConfigError(
                "sparsity", f"sparsity must be in [0, 1) (the share of weights removed), got {self.sparsity}; "
                "for example 0.5 removes half of each row"
            )
        if self.targets is not None and not all(self.targets):
            raise PruningConfigError("targets", f"targets must be non-empty module-name patterns, got "
                                     f"{short_repr(self.targets)}")
        for name in ("num_samples", "seq_len"):
            value = getattr(self, name)
            if value < 1:
                raise PruningConfigError(name, f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.seed < INT_LIMIT:
            raise PruningConfigError("seed", f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise PruningConfigError("batch_size", f"batch_size must be a positive integer or None, got "
                                     f"{self.batch_size!r}")
        if self.true_sequential is True and self.batch_size is not None and self.batch_size < self.num_samples:
            raise PruningConfigError(
                "true_sequential", f"true_sequential=True prunes each operator inside one pass over all "
                f"{self.num_samples} calibration samples, but batch_size={self.batch_size} splits them: pass "
                "true_sequential=False (every operator of a layer calibrated on its dense pass) or leave batch_size "
                "unset"
            )
        if not self.calibration:
            raise PruningConfigError("calibration", "calibration must be a dataset name or a file path")
        if self.expert_token_floor < 0:
            raise PruningConfigError("expert_token_floor", "expert_token_floor must be a non-negative integer "
                                     f"(calibration tokens), got {self.expert_token_floor!r}")
        check_device(self.device)
        if self.owl is not None and pattern.is_nm:
            raise PruningConfigError(
                "owl", "owl sets a different sparsity per layer, which an N:M pattern fixes: "
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
        """Build the config named by ``data["method"]``; record-only keys are ignored.

        Anything that is not a valid configuration raises one of the library's errors
        (``PruningConfigError``, or ``UnknownMethodError`` for the method name).
        """
        if not isinstance(data, dict):
            raise PruningConfigError("pruning_config", f"a pruning config must be a dict, got "
                                     f"{type(data).__name__}")
        check_nesting(data)
        method = data.get("method", cls.method or None)
        target_cls = config_class(method)
        names = {f.name for f in dataclasses.fields(target_cls)}
        unknown = [k for k in data if k not in names and k not in RECORD_KEYS]
        if unknown:
            shown = sorted(k if isinstance(k, str) else short_repr(k) for k in unknown)
            raise PruningConfigError(
                str(shown[0]), f"unknown field(s) {shown} for pruning method {method!r}; valid fields: {sorted(names)}"
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
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise PruningConfigError("pruning_config", f"a pruning config must be a JSON object: {err}") from None
        return cls.from_dict(data)
