"""Input capture hands each layer's output on the way the model reads it (tensor or tuple)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from hf_prune.engine.capture import capture_layer_inputs
from hf_prune.walker.layout import DecoderLayout


@pytest.mark.parametrize("family", ["llama", "falcon_h1"])
def test_capture_gives_every_layer_its_real_input_and_call(family, token_ids):
    """Falcon-H1's model reads ``layer_outputs[0]``: with four layers a tensor handed on came apart
    row by row until the fourth layer got a 0-dim tensor."""
    model = tiny_model(family, layers=4).eval()
    layout = DecoderLayout(model)
    seen: dict[int, torch.Tensor] = {}

    def keep_input(module, args, kwargs, index):
        seen[index] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handles = [layer.register_forward_pre_hook(lambda m, a, k, index=index: keep_input(m, a, k, index),
                                               with_kwargs=True) for index, layer in enumerate(layout.layers)]
    with torch.no_grad():
        model(token_ids[:1], use_cache=False)
    for handle in handles:
        handle.remove()
    hidden, calls = capture_layer_inputs(layout, token_ids)
    assert hidden.shape == (token_ids.shape[0], token_ids.shape[1], model.config.hidden_size)
    torch.testing.assert_close(hidden[:1], seen[0], rtol=0, atol=0)
    assert len(calls) == 4 and all(call is not None for call in calls)
    with torch.no_grad():  # each layer run on the real input of the one before gives that one's real input
        out = hidden[:1]
        for index in range(3):
            call = calls[index]
            out = layout.layers[index](out, *call.args, **call.kwargs)
            out = out[0] if isinstance(out, tuple) else out
            torch.testing.assert_close(out, seen[index + 1], rtol=1e-5, atol=1e-5)
