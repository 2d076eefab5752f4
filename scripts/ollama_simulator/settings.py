"""What the simulated Ollama is told to do: the settings and their JSON form."""

from __future__ import annotations

from typing import Any, Final, Literal

import attrs
import cattrs

from ollama_simulator.names import is_cloud_model, parse_model_name

PROFILE_NAMES: Final = ("llama3.2", "assistant", "qwen3", "embedding")

OLLAMA_VERSION: Final = "0.33.0-rc2"


DEFAULT_MODELS: Final = ("llama3.2:latest", "qwen3:8b", "all-minilm:latest")


def _at_least_zero(_instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _model_names(_instance: object, _attribute: attrs.Attribute[Any], value: Any) -> None:
    bad = [name for name in value if parse_model_name(name) is None or is_cloud_model(name)]
    if bad:
        raise ValueError(f"models: invalid model names {bad!r}")


def _profiles(_instance: object, _attribute: attrs.Attribute[Any], value: Any) -> None:
    bad = {name: p for name, p in value.items() if parse_model_name(name) is None or p not in PROFILE_NAMES}
    if bad:
        raise ValueError(f"model_profiles: unknown models or profiles {bad!r} (profiles: {PROFILE_NAMES})")


def _at_least_four(_instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value < 4:
        raise ValueError(f"{attribute.name} must be >= 4, got {value!r}")


@attrs.frozen(kw_only=True)
class SimulatorSettings:
    """How the simulated Ollama behaves; replaceable at runtime through `POST /_sim/settings`.

    The prompt side: `models` are installed with a profile each (profiles.py: template, SYSTEM,
    MESSAGEs, PARAMETERs, context length), chosen by `model_profiles` or the name rule below;
    `default_num_ctx` is the server's default context, `tokenizer` how prompts are counted,
    `tokens_per_image` what an attached image costs. For example
    `{"models": ["mybot:latest"], "model_profiles": {"mybot:latest": "assistant"},
    "tokenizer": "bytes", "default_num_ctx": 8192}`.
    """

    # Generation pace: tokens per second after the first (0 = as fast as possible) and the
    # delay before the first chunk (model load plus prompt processing).
    tokens_per_second: float = attrs.field(default=0.0, validator=_at_least_zero)
    time_to_first_token: float = attrs.field(default=0.0, validator=_at_least_zero)
    # Content tokens of a generation that sets no limit (its natural end, done_reason "stop").
    completion_tokens: int = attrs.field(default=12, validator=_at_least_zero)
    # Thinking tokens emitted first by thinking-capable models (qwen3, ...) unless think=false.
    thinking_tokens: int = attrs.field(default=4, validator=_at_least_zero)
    # Fail after this many token chunks (at most all of them: the error then replaces the
    # final chunk): native streams get an {"error"} line and no done chunk, OpenAI streams
    # one junk chunk and no [DONE]; 0 fails before the first chunk (a real 500), as does any
    # value with stream:false. None = never fail.
    fail_after_chunks: int | None = attrs.field(default=None, validator=_at_least_zero)
    failure_message: str = "an error was encountered while running the model: unexpected EOF"
    # Every inference request gets 503 "server busy" (OLLAMA_MAX_QUEUE exceeded).
    queue_full: bool = False
    # Installed models (local only: cloud names are always refused, as with OLLAMA_NO_CLOUD=1).
    models: tuple[str, ...] = attrs.field(default=DEFAULT_MODELS, converter=tuple, validator=_model_names)
    version: str = OLLAMA_VERSION
    # When non-empty, content tokens are these strings (cycled) instead of the word list.
    reply: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    embedding_dimensions: int = attrs.field(default=384, validator=_at_least_zero)
    # Prompt tokens per attached image (real vision models use hundreds). A non-zero value
    # also makes chatPrompt's truncation count 768 per image, as for a model with a projector.
    tokens_per_image: int = attrs.field(default=0, validator=_at_least_zero)
    # How prompt_eval_count counts the rendered prompt (see tokens.py): "words" (a token per
    # <|special|> marker, word run or punctuation mark) or "bytes" (a token per UTF-8 byte,
    # the worst case); either way plus one BOS.
    tokenizer: Literal["words", "bytes"] = "words"
    # The server's default context (OLLAMA_CONTEXT_LENGTH): the num_ctx of a request whose
    # options and Modelfile set none; every num_ctx is capped at the model's context_length.
    default_num_ctx: int = attrs.field(default=4096, validator=_at_least_four)
    # Which model profile (profiles.py) an installed model gets, by model name, for example
    # {"mybot:latest": "assistant"}. Unlisted names follow the name rule: embedders by name
    # (minilm, embed, bge, e5-) get "embedding", thinking families (qwen3, deepseek-r1,
    # gpt-oss, magistral, phi4-reasoning) "qwen3", names starting with "assistant" the
    # long-SYSTEM "assistant" persona, everything else "llama3.2".
    model_profiles: dict[str, str] = attrs.field(factory=dict, validator=_profiles)
    # The DNS-rebinding Host check Ollama applies when it listens on loopback, and the CORS
    # Origin check.
    host_check: bool = True
    cors_check: bool = True
    # When the request offers tools, the model calls the first one (arguments derived from its
    # schema) after its content, as each family's Ollama code reports a tool call.
    tool_call: bool = False
    # False: the model ignores the request's completion limit (num_predict, max_tokens,
    # max_completion_tokens, max_output_tokens) and generates its natural completion_tokens with
    # done_reason "stop", as a backend that does not honour the limit would; the gateway must
    # then cut the stream itself. The record still shows the requested completion_limit.
    honour_limit: bool = True
    # Requests kept for `/_sim/requests` (oldest dropped first); benchmarks keep few.
    max_records: int = attrs.field(default=100_000, validator=_at_least_zero)


_settings_converter = cattrs.Converter(forbid_extra_keys=True)


def settings_to_json(settings: SimulatorSettings) -> dict[str, Any]:
    """The settings as plain JSON (tuples become lists)."""
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in attrs.asdict(settings, recurse=False).items()
    }


def settings_with(settings: SimulatorSettings, patch: dict[str, Any]) -> SimulatorSettings:
    """A copy of `settings` with the fields named in `patch` replaced; unknown keys are errors."""
    merged = {**settings_to_json(settings), **patch}
    return _settings_converter.structure(merged, SimulatorSettings)
