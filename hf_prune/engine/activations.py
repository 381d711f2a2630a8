"""Where calibration activations live: on the device when they fit, else on the CPU a batch at a time."""

from __future__ import annotations

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

#: share of the device's free memory that calibration activations may take (inputs and
#: outputs of a layer are both alive, so each counts once; the rest is left for the layer's
#: weights and its intermediate tensors)
ACTIVATION_FRACTION = 0.25


def activation_bytes(samples: int, seq_len: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of one ``[samples, seq_len, hidden]`` hidden-state tensor."""
    return samples * seq_len * hidden * torch.empty((), dtype=dtype).element_size()


def plan_activations(nbytes: int, samples: int, device: torch.device, free_bytes: int | None,
                     fraction: float = ACTIVATION_FRACTION) -> tuple[torch.device, int | None]:
    """Where the calibration hidden states live, and the largest batch that fits.

    ``nbytes`` is the size of all samples' hidden states; ``free_bytes`` the device's free
    memory (``None``: unknown or CPU, keep them with the layer). When the inputs and outputs
    of a layer (``2 * nbytes``) fit in ``fraction`` of the free memory they stay on
    ``device`` and the batch is not limited; otherwise they stay on the CPU and batches of at
    most the returned size are moved to the device per forward.
    """
    if device.type == "cpu" or free_bytes is None or 2 * nbytes <= fraction * free_bytes:
        return device, None
    per_sample = max(1, nbytes // max(samples, 1))
    batch = max(1, int(fraction * free_bytes) // (4 * per_sample))
    return torch.device("cpu"), min(batch, samples)


def place_activations(hidden: torch.Tensor, device: torch.device, batch_size: int) -> tuple[torch.Tensor, int]:
    """``hidden`` where :func:`plan_activations` puts it, and the batch size that fits the device."""
    samples = hidden.shape[0]
    storage, fitting_batch = plan_activations(
        activation_bytes(*hidden.shape, hidden.dtype), samples, device, free_device_bytes(device)
    )
    if fitting_batch is not None and fitting_batch < batch_size:
        logger.warning("calibration activations do not fit on %s: kept on the CPU, %d samples per forward",
                       device, fitting_batch)
        batch_size = fitting_batch
    return hidden.to(storage), batch_size


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device (``None`` elsewhere)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)
