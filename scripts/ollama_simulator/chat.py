"""ChatHandler's way from api messages to a job: every family that becomes an /api/chat uses it.

/api/chat, /v1/chat/completions, /v1/messages, /v1/responses and /v1/audio/transcriptions
all end in server/routes.go ChatHandler: capability checks (tools need a template that
uses .Tools), the runner's options, the Modelfile MESSAGEs and SYSTEM, chatPrompt, and for
a request with `format` on a thinking model the two passes of structured outputs: the
first generates the thinking and stops where content starts, the second re-renders the
conversation with that thinking as an assistant message and runs with the format.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from ollama_simulator.api_types import Message, Tool
from ollama_simulator.catalog import ModelEntry
from ollama_simulator.exceptions import ApiError
from ollama_simulator.generation import Job, ModelCall
from ollama_simulator.prompt import Counter, Prompt, Think, chat_messages, chat_prompt
from ollama_simulator.runner import RunnerOptions, runner_options
from ollama_simulator.state import Call
from ollama_simulator.tokens import count_text_tokens


def today(call: Call) -> datetime.date:
    """currentDate's date: the day the request arrived (UTC)."""
    return datetime.datetime.fromtimestamp(call.record.received_at_ns / 1e9, datetime.UTC).date()


def check_capabilities(entry: ModelEntry, *wanted: str) -> None:
    """CheckCapabilities through scheduleRunner: "<model> does not support tools"."""
    missing = "\n".join(name for name in wanted if name not in entry.capabilities)  # errors.Join
    if missing:
        raise ApiError(400, f"{entry.full_name} does not support {missing}")


def counter(call: Call) -> Counter:
    """llama-server's /tokenize (no BOS) in the configured tokenizer mode."""
    mode = call.settings.tokenizer
    return lambda text: count_text_tokens(text, mode)


def chat_job(
    call: Call,
    *,
    model: str,
    entry: ModelEntry,
    messages: Sequence[Message],
    tools: Sequence[Tool] | None,
    think: Think,
    options: Mapping[str, Any] | None,
    limit: int | None,
    keep_alive_ns: int | None = None,
    truncate: bool | None = None,
    shift: bool | None = None,
    structured: bool = False,
    tool: ModelCall | None = None,
) -> Job:
    """The job ChatHandler runs; `structured` is a request with `format` set."""
    if tools:
        check_capabilities(entry, "tools")
    runner = runner_options(call.settings, entry.profile, options, truncate=truncate, shift=shift)
    msgs = chat_messages(entry.profile, entry.family, entry.name.model, messages)
    prompt = _prompt(call, entry, messages=msgs, tools=tools, think=think, runner=runner)

    def second_pass(thinking: str) -> Prompt:
        replay = [*msgs, Message("assistant", thinking=thinking)]
        return _prompt(call, entry, messages=replay, tools=tools, think=think, runner=runner)

    return Job(
        "chat",
        model,
        entry,
        prompt,
        think.enabled and entry.thinks,
        limit,
        runner,
        keep_alive_ns,
        tool=tool,
        second_pass=second_pass if structured and think.enabled and entry.thinks else None,
    )


def _prompt(
    call: Call,
    entry: ModelEntry,
    *,
    messages: Sequence[Message],
    tools: Sequence[Tool] | None,
    think: Think,
    runner: RunnerOptions,
) -> Prompt:
    return chat_prompt(
        entry.profile.template,
        messages,
        tools,
        think,
        num_ctx=runner.num_ctx,
        truncate=runner.truncate,
        count=counter(call),
        projector=call.settings.tokens_per_image > 0,
        today=today(call),
    )
