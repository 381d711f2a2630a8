"""``PrunedModelForCausalLM`` and ``AutoPrunedModelForCausalLM``: transformers models that prune.

The mixin sits before the model's own transformers class, with the same class name, so
``config.json["architectures"]`` stays the transformers one and plain
``AutoModelForCausalLM`` loads unstructured and N:M checkpoints unchanged.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoTokenizer, PreTrainedModel
from transformers.utils import logging

from .checkpoint.compressed import compress_checkpoint, compressed_layout, load_compressed
from .checkpoint.provenance import describe_source, is_repo_id
from .checkpoint.record import make_record, validate_record, verify_record
from .checkpoint.saving import check_not_source, source_directories, staged_directory
from .checkpoint.standard_config import standard_export, write_standard_config
from .config import PruningConfig
from .data.calibration import CalibrationInput, CalibrationSet, build_calibration, model_limits
from .engine.loop import check_pruning_plan, prune_model
from .errors import ModelNotFoundError, PruningRecordError, StructureMismatchError
from .report import PruningReport, channel_summary, expert_summary, measure_sparsity, zeroing_runs
from .surgery import LOADER_ADVICE, model_shape, rebuild_recorded_structure, structure_record, structure_summary

logger = logging.get_logger(__name__)

# from_pretrained keyword arguments that also locate the tokenizer and the config
_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "gguf_file", "trust_remote_code",
               "force_download", "proxies")


def detach_gguf_quantizer(model: PreTrainedModel) -> None:
    """Drop the GGUF quantizer transformers attaches when loading a GGUF file.

    The weights are already dequantized to float; without this ``save_pretrained`` refuses.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model.config, "quantization_config", None)
    method = getattr(config, "quant_method", None) or (config or {}).get("quant_method") if config else None
    if quantizer is None and config is None:
        return
    if str(getattr(method, "value", method)).lower() != "gguf":
        return
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
        return
    for owner, name in ((model, "hf_quantizer"), (model.config, "quantization_config"), (model, "quantization_method")):
        if hasattr(owner, name):
            delattr(owner, name)
    model.is_quantized = False


def load_model_config(pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs: Any) -> Any:
    """``AutoConfig.from_pretrained``, with one clear ``ModelNotFoundError`` when there is no such model.

    A path that does not exist and cannot be a hub id (``/data/model``, ``./out``) fails at once,
    without asking the Hub; a name that looks like a hub id (``org/name``) and is not a local
    directory is tried on the Hub, and the error says so (and whether ``HF_HUB_OFFLINE`` kept
    the Hub from being asked).
    """
    source = os.fspath(pretrained_model_name_or_path)
    path = Path(source).expanduser()
    if not path.exists() and not is_repo_id(source):
        raise ModelNotFoundError(
            f"model path {source} does not exist; pass an existing model directory, a .gguf file, or a hub id "
            "such as HuggingFaceTB/SmolLM2-135M"
        )
    located = hub_kwargs.get("gguf_file") or hub_kwargs.get("subfolder")
    if path.is_dir() and not located and not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{source} holds no config.json, so it is not a saved transformers model (for a GGUF file, pass the "
            ".gguf path, or gguf_file=)"
        )
    try:
        return AutoConfig.from_pretrained(source, **hub_kwargs)
    except RecursionError:
        raise PruningRecordError(
            f"the config.json of {source} nests lists or dicts too deeply to be read; no checkpoint saved by "
            "transformers or hf_prune does: it was crafted or damaged"
        ) from None
    except OSError as err:
        if path.exists():
            raise
        from huggingface_hub import constants

        tried = ("HF_HUB_OFFLINE is set, so only the local hub cache was searched" if constants.HF_HUB_OFFLINE
                 else "the Hugging Face Hub was asked")
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(
            f"{source} is not a local directory, and as a hub model id it could not be loaded ({tried}: {reason})"
        ) from err


class PrunedModelForCausalLM:
    """Mixin over a transformers causal-LM class: loads, prunes, reports and saves."""

    pruning_config: PruningConfig | None = None

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        """Build as transformers does, then shrink the layers to the sizes a structured record names."""
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]
        rebuild_recorded_structure(self)  # type: ignore[arg-type]

    @classmethod
    def is_custom_code(cls) -> bool:
        """Whether the wrapped transformers class is custom code (hf_prune adds methods, no modeling code).

        transformers treats every class defined outside its package as custom code and then skips
        the weight initialisation of modules without parameters of their own; Falcon-H1's model
        fills its mixers' ``mup_vector`` buffers that way, which were left as uninitialised memory.
        """
        base = next(k for k in cls.__mro__[1:] if issubclass(k, PreTrainedModel)
                    and not issubclass(k, PrunedModelForCausalLM))
        return base.is_custom_code()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        pruning_config: PruningConfig | dict | None = None,
        calibration_data: CalibrationInput | None = None,
        tokenizer: Any = None,
        verify_pruning: bool = True,
        **kwargs: Any,
    ) -> PrunedModelForCausalLM:
        """Load like transformers, then prune with ``pruning_config`` if given.

        A checkpoint saved by hf_prune is recognised from ``config.json["pruning_config"]``:
        its record is checked against the weights and it is not pruned again unless a new
        ``pruning_config`` is passed (which is then applied on top).
        """
        try:
            loader = super().from_pretrained  # type: ignore[misc]
            if compressed_layout(kwargs.get("config")) is not None:  # values + bitmask: rebuilt dense, then loaded
                model = load_compressed(loader, pretrained_model_name_or_path, *model_args, hub_keys=_HUB_KWARGS,
                                        model_class=cls, **kwargs)
            else:
                model = loader(pretrained_model_name_or_path, *model_args, **kwargs)
        except RuntimeError as err:
            if "mismatch" not in str(err).lower():
                raise
            raise StructureMismatchError(
                f"the weights in {pretrained_model_name_or_path} do not have the layer shapes of the config they were "
                f"loaded with. {LOADER_ADVICE}; pass no `config=` that lacks the record. transformers said: "
                f"{str(err).strip().splitlines()[-1] if str(err).strip() else err!r}"
            ) from err
        detach_gguf_quantizer(model)
        model._hf_prune_sources = source_directories(pretrained_model_name_or_path)
        model._hf_prune_tokenizer_source = (
            pretrained_model_name_or_path, {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        )
        record = getattr(model.config, "pruning_config", None)
        if record:
            validate_record(record, require_measurement=verify_pruning)
            model.pruning_config = PruningConfig.from_dict(record)
            if verify_pruning:
                verify_record(model, record, str(pretrained_model_name_or_path))
        if pruning_config is not None:
            model.prune(pruning_config, calibration_data=calibration_data, tokenizer=tokenizer)
        return model

    @property
    def is_pruned(self) -> bool:
        return bool(getattr(self.config, "pruning_config", None))

    def _load_tokenizer(self) -> Any:
        source, hub_kwargs = getattr(self, "_hf_prune_tokenizer_source", (self.name_or_path, {}))
        return AutoTokenizer.from_pretrained(source, **hub_kwargs)

    def prune(
        self,
        pruning_config: PruningConfig | dict,
        calibration_data: CalibrationInput | None = None,
        tokenizer: Any = None,
    ) -> PruningReport:
        """Prune this model in place and record how; returns what was removed (see ``pruning_report``).

        Everything the shapes decide (pattern against every targeted width, targets, device) is
        checked before any calibration text is read. ``calibration_data`` may also be a
        ``CalibrationSet`` built beforehand with ``hf_prune.data.calibration.build_calibration``.
        """
        config = PruningConfig.from_dict(pruning_config) if isinstance(pruning_config, dict) else pruning_config
        if not isinstance(config, PruningConfig):
            raise TypeError(f"pruning_config must be a PruningConfig or a dict, got {type(pruning_config).__name__}")
        check_pruning_plan(self, config)  # type: ignore[arg-type]
        if tokenizer is not None:
            self._hf_prune_tokenizer = tokenizer  # saved beside the weights by save_pretrained
        calibration = None
        if isinstance(calibration_data, CalibrationSet):
            calibration = calibration_data
        elif config.uses_calibration:
            import torch

            if tokenizer is None and not isinstance(calibration_data, torch.Tensor):
                tokenizer = self._hf_prune_tokenizer = self._load_tokenizer()
            calibration = build_calibration(
                calibration_data, tokenizer, config.calibration, config.num_samples, config.seq_len, config.seed,
                limits=model_limits(self),
            )
        source = describe_source(self)  # type: ignore[arg-type]
        shape_before = model_shape(self)  # type: ignore[arg-type]
        run = prune_model(self, config, calibration)  # type: ignore[arg-type]
        report = measure_sparsity(self)  # type: ignore[arg-type]
        previous = getattr(self.config, "pruning_config", None)
        self.config.pruning_config = make_record(
            config, calibration.record if calibration else None, run.layer_sparsity, report, previous,
            structure=structure_record(self, shape_before, previous, run.kept_layers),  # type: ignore[arg-type]
        )
        self.config.pruning_config["source"] = source
        if run.experts is not None:
            self.config.pruning_config["experts"] = run.experts
        self.config.pruning_config.update(run.record_entries or {})
        self.pruning_config = config
        self._describe_removal(report)
        logger.info("pruned with %s in %.1fs: %s", config.method, run.seconds, report.summary())
        return report

    def pruning_report(self) -> PruningReport:
        """What pruning did, measured now from the weights.

        Sparsity per Linear, per layer and overall; after structured pruning also the MLP
        neurons, attention heads and layers removed and the parameter count before -> after
        (``report.structure``). ``print(report)`` shows a table; ``report.summary()`` one line.
        """
        return self._describe_removal(measure_sparsity(self))  # type: ignore[arg-type]

    def _describe_removal(self, report: PruningReport) -> PruningReport:
        record = getattr(self.config, "pruning_config", None)
        report.structure = structure_summary(self)  # type: ignore[arg-type]
        report.experts = expert_summary(record)
        report.channels = channel_summary(record)
        report.zeroed = report.removed_nothing or zeroing_runs(record) > 0
        return report

    def _tokenizer_to_save(self, tokenizer: Any) -> Any:
        """The tokenizer ``save_pretrained`` writes: the one given, the one the model was pruned with, or
        the one beside the source it was loaded from; ``None`` when there is none."""
        if tokenizer is False:
            return None
        if tokenizer is not None:
            if not hasattr(tokenizer, "save_pretrained"):
                raise TypeError(f"tokenizer= must be a transformers tokenizer (with save_pretrained) or False, got "
                                f"{type(tokenizer).__name__}")
            return tokenizer
        if hasattr(getattr(self, "_hf_prune_tokenizer", None), "save_pretrained"):
            return self._hf_prune_tokenizer
        if getattr(self, "_hf_prune_tokenizer_source", None) is None:
            return None  # built from a config: nothing to load a tokenizer from
        try:
            return self._load_tokenizer()
        except Exception as err:  # noqa: BLE001 - a source without a tokenizer: save the model alone
            logger.warning(
                "no tokenizer was saved: none could be loaded from %s (%s). Pass tokenizer=... to save_pretrained "
                "so that the folder can be loaded and pruned again on its own",
                self._hf_prune_tokenizer_source[0], type(err).__name__,
            )
            return None

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save as transformers does (safetensors, zeros baked in), atomically.

        Refuses the directory the model was loaded from; if anything fails, nothing is left
        half-written in ``save_directory``. When structured pruning left every layer with the
        same sizes, ``config.json`` states them in the family's own fields
        (``hf_prune.checkpoint.standard_config``), so plain transformers and vLLM load it. A
        pruned model also gets its model card (``README.md``) and per-layer plot; ``model_card=False`` skips them, a
        ``hf_prune.card.CardInfo`` adds what the record cannot know (base model, license, notes).
        ``compressed=True`` stores sparse weights as non-zero values plus a bitmask
        (``hf_prune.compressed``); such checkpoints load only with ``AutoPrunedModelForCausalLM``.
        The tokenizer is saved beside the weights, so the folder is a complete model (for
        ``hf-prune prune --model``, vLLM, the Hub): ``tokenizer=`` the one to write, by default the
        one given to ``prune`` or else the one loaded from the model's source when there is one;
        ``tokenizer=False`` writes none.
        Under torch.distributed only rank 0 writes (every rank holds the whole pruned model).
        """
        from .engine.distributed import is_main_process

        if not (kwargs.get("is_main_process", True) and is_main_process()):
            logger.info("not the main process: %s is left to rank 0", save_directory)
            return
        check_not_source(save_directory, getattr(self, "_hf_prune_sources", set()))
        push = kwargs.pop("push_to_hub", False)
        model_card = kwargs.pop("model_card", True)
        compressed = kwargs.pop("compressed", False)
        tokenizer = kwargs.pop("tokenizer", None)
        if compressed and not self.is_pruned:
            raise ValueError("compressed=True is for pruned models (it stores their zeros as a bitmask); prune first")
        from .engine.offload import offloaded_shard_size

        shard_size = offloaded_shard_size(self)  # type: ignore[arg-type]
        if shard_size is not None and "max_shard_size" not in kwargs:  # offloaded: save a layer's worth at a time
            kwargs["max_shard_size"] = shard_size
        with staged_directory(save_directory) as staging, warnings.catch_warnings():
            if shard_size is not None:  # transformers warns of its 50GB default shard, which does not apply here
                warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
            super().save_pretrained(staging, *args, **kwargs)  # type: ignore[misc]
            tokenizer = self._tokenizer_to_save(tokenizer)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            if self.is_pruned:  # uniform layer sizes go into the config's own fields (plain transformers, vLLM)
                export = standard_export(self)  # type: ignore[arg-type]
                if not export.standard:
                    logger.warning("config.json keeps the dense layer sizes because %s; the per-layer sizes are in "
                                   "its pruning record, so only hf_prune's AutoPrunedModelForCausalLM loads %s",
                                   export.reason, save_directory)
                write_standard_config(staging, export)
            if compressed:  # before the card, which reports the stored sizes and the loader to use
                compress_checkpoint(staging)
            if model_card is not False and self.is_pruned:
                from .card.render import CardInfo, write_card

                write_card(staging, model_card if isinstance(model_card, CardInfo) else None)
        if push:
            self.push_to_hub(kwargs.get("repo_id") or Path(save_directory).name)  # type: ignore[attr-defined]

    def push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        """Upload the pruned model with its generated card; see ``hf_prune.hub.push_pruned_model``.

        Saves to a temporary folder (weights, config with the pruning record, tokenizer,
        README.md card, per-layer plot), then creates the repo if needed and uploads it in one
        commit. A model without a pruning record is pushed by transformers unchanged. Under
        torch.distributed only rank 0 pushes.
        """
        from .engine.distributed import is_main_process

        if not is_main_process():
            logger.info("not the main process: pushing %s is left to rank 0", repo_id)
            return None
        if not self.is_pruned:
            return super().push_to_hub(repo_id, *args, **kwargs)  # type: ignore[misc]
        from .card.hub import push_pruned_model

        return push_pruned_model(self, repo_id, *args, **kwargs)


_PRUNED_CLASSES: dict[type, type] = {}


def pruned_class_for(base: type[PreTrainedModel]) -> type:
    """The ``PrunedModelForCausalLM`` subclass of a transformers class, with the same name."""
    if base not in _PRUNED_CLASSES:
        _PRUNED_CLASSES[base] = type(
            base.__name__, (PrunedModelForCausalLM, base), {"__module__": __name__, "__qualname__": base.__qualname__}
        )
    return _PRUNED_CLASSES[base]


class AutoPrunedModelForCausalLM:
    """Like ``AutoModelForCausalLM``, returning a model that can prune and knows it was pruned."""

    def __init__(self) -> None:
        raise OSError("use AutoPrunedModelForCausalLM.from_pretrained(...) or .from_config(...)")

    @classmethod
    def model_class(cls, config: Any) -> type:
        base = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
        if base is None:
            raise ValueError(
                f"{type(config).__name__} (model_type {getattr(config, 'model_type', None)!r}) has no causal-LM "
                "class in transformers; hf_prune prunes decoder-only causal language models"
            )
        return pruned_class_for(base)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any):
        """Same arguments as ``AutoModelForCausalLM.from_pretrained`` plus ``pruning_config``,
        ``calibration_data``, ``tokenizer`` and ``verify_pruning``."""
        config = kwargs.pop("config", None)
        if config is None:
            hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            config = load_model_config(pretrained_model_name_or_path, **hub_kwargs)
        model_cls = cls.model_class(config)
        return model_cls.from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any):
        """A randomly initialised model of ``config``'s architecture (for tests and experiments)."""
        return cls.model_class(config)._from_config(config, **kwargs)
