"""A fake Ollama v0.33.0-rc2 that answers byte for byte like the real one, deterministically.

Tests and benchmarks run against it instead of a real Ollama. It follows
`docs/OLLAMA.md` and Ollama's own source: gin routing (404/405 texts, trailing-slash
redirects), Go `encoding/json` binding and output, NDJSON and SSE framing, the OpenAI,
Responses and Anthropic compatibility layers, and the error bodies. It also records every
request it receives, so a test can prove what reached "Ollama" (and what never did), and it
exposes that record and its settings under `/_sim/`, a path prefix real Ollama never serves.
It never imports the gateway's packages: it is the independent truth the gateway is tested
against.

Generated text is a fixed word list cycled from a seed derived from the prompt, one token
per chunk. `prompt_eval_count` counts the prompt Ollama would render: each installed model
has a profile (profiles.py) with a real Go template, Modelfile SYSTEM and MESSAGEs, which
the simulator renders with its own Go text/template interpreter (gotemplate.py, held to
Go's output by tests/fixtures/templates) after building the message list as each API
family's Ollama code does; chatPrompt's truncation and the runner's num_ctx rule apply, and
the text is counted by a deterministic tokenizer (tokens.py) plus one BOS.

This module only re-exports the names importers use (`import ollama_simulator as sim`).
"""

from __future__ import annotations

from ollama_simulator.api_types import Message, Tool, bind_messages, bind_tools
from ollama_simulator.app import CONTROL_PREFIX, ROUTES, create_app
from ollama_simulator.catalog import ModelEntry, model_entry
from ollama_simulator.clock import Clock, FakeClock, SystemClock, rfc3339nano
from ollama_simulator.exceptions import (
    MSG_CLOUD_DISABLED,
    MSG_INVALID_NAME,
    MSG_MISSING_BODY,
    MSG_MODEL_REQUIRED,
    MSG_QUEUE_FULL,
    MSG_RAW_CONFLICT,
    ApiError,
    ClientGone,
)
from ollama_simulator.generation import Generation, Job, Piece, Plan, plan_generation
from ollama_simulator.gojson import (
    Binder,
    BindError,
    EmptyBody,
    Float32s,
    GoObject,
    _compact_json,
    _to_float32,
    bind_keep_alive,
    bind_root,
    go_float,
    go_json,
    parse_go_duration,
    parse_go_json,
)
from ollama_simulator.gotemplate import TemplateError
from ollama_simulator.names import ModelName, is_cloud_model, parse_model_name
from ollama_simulator.native import _embed_inputs
from ollama_simulator.openai import _openai_messages
from ollama_simulator.profiles import PROFILES, ModelProfile, profile_for
from ollama_simulator.prompt import Prompt, Think, chat_prompt
from ollama_simulator.prompt_template import PromptTemplate, parse_template
from ollama_simulator.recorder import GenerationRecord, PassRecord, Recorder, RequestRecord
from ollama_simulator.runner import (
    MSG_PROMPT_TOO_LONG,
    RunnerOptions,
    evaluated_tokens,
    prompt_tokens,
    runner_options,
)
from ollama_simulator.settings import (
    DEFAULT_MODELS,
    OLLAMA_VERSION,
    SimulatorSettings,
    settings_to_json,
    settings_with,
)
from ollama_simulator.state import RECORD_KEY, RECORDER_KEY, STATE_KEY, Call, SimulatorState
from ollama_simulator.tokens import (
    BOS_TOKENS,
    EMBED_TOKENS_PER_INPUT,
    Vocabulary,
    count_text_tokens,
    embed_prompt_tokens,
)

__all__ = [
    "BOS_TOKENS",
    "CONTROL_PREFIX",
    "DEFAULT_MODELS",
    "EMBED_TOKENS_PER_INPUT",
    "MSG_CLOUD_DISABLED",
    "MSG_INVALID_NAME",
    "MSG_MISSING_BODY",
    "MSG_MODEL_REQUIRED",
    "MSG_PROMPT_TOO_LONG",
    "MSG_QUEUE_FULL",
    "MSG_RAW_CONFLICT",
    "OLLAMA_VERSION",
    "PROFILES",
    "RECORDER_KEY",
    "RECORD_KEY",
    "ROUTES",
    "STATE_KEY",
    "ApiError",
    "BindError",
    "Binder",
    "Call",
    "ClientGone",
    "Clock",
    "EmptyBody",
    "FakeClock",
    "Float32s",
    "Generation",
    "GenerationRecord",
    "GoObject",
    "Job",
    "Message",
    "ModelEntry",
    "ModelName",
    "ModelProfile",
    "PassRecord",
    "Piece",
    "Plan",
    "Prompt",
    "PromptTemplate",
    "Recorder",
    "RequestRecord",
    "RunnerOptions",
    "SimulatorSettings",
    "SimulatorState",
    "SystemClock",
    "TemplateError",
    "Think",
    "Tool",
    "Vocabulary",
    "_compact_json",
    "_embed_inputs",
    "_openai_messages",
    "_to_float32",
    "bind_keep_alive",
    "bind_messages",
    "bind_root",
    "bind_tools",
    "chat_prompt",
    "count_text_tokens",
    "create_app",
    "embed_prompt_tokens",
    "evaluated_tokens",
    "go_float",
    "go_json",
    "is_cloud_model",
    "model_entry",
    "parse_go_duration",
    "parse_go_json",
    "parse_model_name",
    "parse_template",
    "plan_generation",
    "profile_for",
    "prompt_tokens",
    "rfc3339nano",
    "runner_options",
    "settings_to_json",
    "settings_with",
]
