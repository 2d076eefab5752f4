"""The runner's side of a prompt: num_ctx in effect, the prompt-length rule, the tokens evaluated.

num_ctx is the request's options.num_ctx, else the Modelfile's, else the server default
(OLLAMA_CONTEXT_LENGTH: the `default_num_ctx` setting), raised to at least 4 and capped at
the model's trained context length (server/sched.go getRunner, llm/server.go
NewLlamaServer). llm/llama_server.go completionPromptForRequest then checks prompts of at
least num_ctx bytes that are not carrying media and are allowed to truncate: one that
tokenizes (with BOS) to more than num_ctx - 1 tokens is cut to num_keep (+1 for the BOS)
plus its tail, num_ctx - max((num_ctx - keep) / 2, 1) tokens in all, when context shift is
on (the default; `shift: false` turns it off), and is refused with a 400 otherwise. What
still does not fit (media, or truncate false) is refused by llama-server itself. The
tokens llama-server evaluates are the prompt's text tokens (each "[img-N]" marker replaced
by the image), one BOS and `tokens_per_image` per image.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

import attrs

from ollama_simulator.exceptions import ApiError
from ollama_simulator.profiles import ModelProfile
from ollama_simulator.prompt import Prompt
from ollama_simulator.settings import SimulatorSettings
from ollama_simulator.tokens import BOS_TOKENS, count_text_tokens

DEFAULT_NUM_KEEP: Final = 4


MSG_PROMPT_TOO_LONG: Final = (
    "the prompt is longer than the context length currently available to the model; shorten the "
    "prompt, adjust the context length in settings, or use a model with a longer context length"
)


def int_option(options: Mapping[str, Any] | None, key: str) -> int | None:
    """One integer option as Options.FromMap reads it (exact key; null ignored; floats truncated)."""
    if options is None or options.get(key) is None:
        return None
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(500, f"option {json.dumps(key)} must be of type integer")
    return int(value)


@attrs.frozen
class RunnerOptions:
    """The options the runner is loaded and called with."""

    num_ctx: int
    num_keep: int
    truncate: bool = True
    shift: bool = True


def runner_options(
    settings: SimulatorSettings,
    profile: ModelProfile,
    options: Mapping[str, Any] | None,
    *,
    truncate: bool | None = None,
    shift: bool | None = None,
) -> RunnerOptions:
    """modelOptions + getRunner + NewLlamaServer for one request."""
    modelfile = profile.options
    num_ctx = int_option(options, "num_ctx")
    if num_ctx is None:
        num_ctx = int_option(modelfile, "num_ctx")
    if num_ctx is None:
        num_ctx = settings.default_num_ctx
    num_ctx = min(max(num_ctx, 4), profile.context_length)
    num_keep = int_option(options, "num_keep")
    if num_keep is None:
        num_keep = int_option(modelfile, "num_keep")
    return RunnerOptions(
        num_ctx=num_ctx,
        num_keep=DEFAULT_NUM_KEEP if num_keep is None else num_keep,
        truncate=truncate is not False,
        shift=shift is not False,
    )


def prompt_tokens(prompt: Prompt, settings: SimulatorSettings) -> int:
    """Tokens llama-server evaluates for a whole prompt: text, BOS and the images."""
    text = prompt.text
    segments: list[str] = []
    for media in range(prompt.images):  # the runner swaps each [img-N] for the media marker
        marker = f"[img-{media}]"
        if marker in text:
            head, text = text.split(marker, 1)
            segments.append(head)
    segments.append(text)
    words = sum(count_text_tokens(segment, settings.tokenizer) for segment in segments)
    return words + BOS_TOKENS + settings.tokens_per_image * prompt.images


def _exceeds(tokens: int, num_ctx: int) -> ApiError:
    """llama-server's exceed_context_size_error body, which Ollama passes on as the message."""
    body = {
        "error": {
            "code": 400,
            "message": (
                f"request ({tokens} tokens) exceeds the available context size ({num_ctx} tokens), "
                "try increasing it"
            ),
            "type": "exceed_context_size_error",
            "n_prompt_tokens": tokens,
            "n_ctx": num_ctx,
        }
    }
    return ApiError(400, json.dumps(body, separators=(",", ":")))


def evaluated_tokens(prompt: Prompt, runner: RunnerOptions, settings: SimulatorSettings) -> int:
    """The prompt tokens the runner evaluates, or the 400 Ollama or llama-server answers."""
    tokens = prompt_tokens(prompt, settings)
    num_ctx = runner.num_ctx
    size = len(prompt.text.encode("utf-8", "surrogatepass"))
    if not runner.truncate or prompt.images or num_ctx <= 1 or size < num_ctx:
        if tokens >= num_ctx:
            raise _exceeds(tokens, num_ctx)
        return tokens
    limit = num_ctx - 1
    if tokens <= limit:
        return tokens
    if not runner.shift:
        raise ApiError(400, MSG_PROMPT_TOO_LONG)
    keep = min((tokens if runner.num_keep < 0 else runner.num_keep) + BOS_TOKENS, limit)
    return num_ctx - max((num_ctx - keep) // 2, 1)  # contextShiftPromptLimit
