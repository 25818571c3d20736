"""The model's Triton interface, named as Triton's LLM backends (vLLM, TensorRT-LLM) name theirs, so that the
generate extension (`/v2/models/NAME/generate`, `/generate_stream`) and existing clients work unchanged.

One table read by both sides: the repository writer turns it into config.pbtxt, the model checks requests
against it. Every input is `optional` in the config (the server does not enforce required inputs when optional
ones exist), so the model itself asks for `text_input` (or `input_ids`, the token ids the OpenAI frontend sends
after applying the chat template).
"""

from __future__ import annotations

# name: (Triton data type, what it is) — all dims [-1]; scalars are one element
INPUTS = {
    "text_input": ("TYPE_STRING", "the prompt (UTF-8); encoded with BOS like llama-generate"),
    "input_ids": ("TYPE_INT64", "the prompt as token ids, instead of text_input"),
    "max_tokens": ("TYPE_INT32", "new tokens at most (default 64)"),
    "stream": ("TYPE_BOOL", "true: one response per new piece of text; false: one response at the end"),
    "temperature": ("TYPE_FP32", "0 = greedy (default)"),
    "top_k": ("TYPE_INT32", "0 = off"),
    "top_p": ("TYPE_FP32", "in (0, 1]"),
    "min_p": ("TYPE_FP32", "in [0, 1)"),
    "repetition_penalty": ("TYPE_FP32", "> 0, 1 = off"),
    "seed": ("TYPE_UINT64", "sampling seed"),
    "stop": ("TYPE_STRING", "stop strings: the text ends before the first one found"),
    "ignore_eos": ("TYPE_BOOL", "run to max_tokens past end-of-sequence (load tests, as vLLM's ignore_eos)"),
    "exclude_input_in_output": ("TYPE_BOOL", "non-streaming: false (default) puts the prompt before the answer"),
    "cache_prompt": ("TYPE_BOOL", "false: prefill the whole prompt, reusing no kept slot (llama.cpp's name)"),
    "cache_salt": ("TYPE_STRING", "prefixes are shared only between requests of the same salt (vLLM's name)"),
}
OUTPUTS = {
    "text_output": ("TYPE_STRING", "new text (streaming: since the previous response)"),
    "token_ids": ("TYPE_INT32", "new token ids (streaming: since the previous response)"),
    "finish_reason": ("TYPE_STRING", "'' until the last response, then stop | length | cancelled | error"),
    "cached_tokens": ("TYPE_INT32", "the last response only: prompt tokens reused from a kept slot"),
}
DEFAULT_MAX_TOKENS = 64

# config.pbtxt parameters the model reads
ARTIFACT, SLOTS, QUEUE, THREADS, BACKEND = "ARTIFACT", "SLOTS", "QUEUE", "THREADS", "BACKEND"
PREFIX_REUSE = "PREFIX_REUSE"  # "1" (default): a free slot keeps its sequence for a prompt that starts with it
PREFILL_CHUNK = "PREFILL_CHUNK"  # a longer prompt is prefilled this many tokens per step ("0": whole prompts)
DEFAULT_PREFILL_CHUNK = 256
EXECUTION_ENV_PATH = "EXECUTION_ENV_PATH"

# stopping: llama-serve names a directory in the server's environment; the model polls it for STOP_FILE (its
# content: the deadline, Unix time in seconds) and writes NAME.serving, NAME.drained and NAME.finalized (JSON) there
STOP_DIR_ENV = "LLAMA_SERVE_STOP_DIR"
STOP_FILE = "stop"

# custom metrics on Triton's metrics endpoint (all labelled with model="NAME")
METRIC_PREFIX = "llama_"
