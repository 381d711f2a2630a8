"""Greedy generation with vLLM, run as a script (vLLM starts worker processes, so it needs a
``__main__`` guard): ``python vllm_greedy.py CHECKPOINT PROMPTS_JSON MAX_TOKENS`` prints one JSON
line ``{"token_ids": [[...], ...], "texts": [...]}``. Set ``VLLM_CPU_KVCACHE_SPACE`` (GiB) on a CPU.
"""

from __future__ import annotations

import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    checkpoint, prompts_path, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(prompts_path, encoding="utf-8") as handle:
        prompts = json.load(handle)
    llm = LLM(model=checkpoint, dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                           SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    result = {"token_ids": [list(o.outputs[0].token_ids) for o in outputs],
              "texts": [o.outputs[0].text for o in outputs]}
    print("VLLM_RESULT " + json.dumps(result), flush=True)
