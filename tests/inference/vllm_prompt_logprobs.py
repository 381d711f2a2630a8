"""Prompt log-probabilities from vLLM, run as a script (vLLM starts worker processes, so it needs a
``__main__`` guard): ``python vllm_prompt_logprobs.py CHECKPOINT PROMPTS_JSON`` prints one JSON line
``{"logprobs": [[...], ...]}``: for each prompt, the log-probability vLLM gives each of its tokens after
the first, from the tokens before it. Set ``VLLM_CPU_KVCACHE_SPACE`` (GiB) on a CPU.
"""

from __future__ import annotations

import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    checkpoint, prompts_path = sys.argv[1], sys.argv[2]
    with open(prompts_path, encoding="utf-8") as handle:
        prompts = json.load(handle)
    llm = LLM(model=checkpoint, dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                           SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0))
    result = [[entry[token].logprob for token, entry in zip(ids[1:], output.prompt_logprobs[1:])]
              for ids, output in zip(prompts, outputs)]
    print("VLLM_RESULT " + json.dumps({"logprobs": result}), flush=True)
