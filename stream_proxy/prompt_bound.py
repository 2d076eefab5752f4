"""The prompt bound of one metered request (docs/ARCHITECTURE.md#prompt-bound).

A token is never shorter than one UTF-8 byte, so the bytes Ollama renders (the model's template
around what the body brings, its Modelfile SYSTEM and MESSAGEs) plus the few tokens a tokenizer
adds without bytes bound the prompt tokens; and Ollama never evaluates more than the num_ctx in
effect. The bound is the smaller of the two. Where the rendered bytes cannot be bounded (the model
is unknown or renders with built-in code, its template cannot be read, images, `context` tokens, a
client template) the num_ctx bound alone is used, never a guess.

What the body brings is measured coarsely and from above: every string a template can print
(content, thinking, names, ids, the system prompt) is bounded by all of the body's strings
together, roles by all of the roles, messages by the JSON objects of the conversation, tools and
tool calls by their JSON as Go writes it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

from shared import policy
from shared.config import ProxyOptions
from stream_proxy import apis, body, meter
from stream_proxy.exceptions import Refused
from stream_proxy.models import ModelCatalog, ModelFacts
from stream_proxy.template_bound import VARIABLES, evaluate

# Tokens a tokenizer adds that no byte of the prompt accounts for (BOS, EOS, a separator).
SPECIAL_TOKENS: Final = 8
# Bytes Ollama's conversion may add per message (a role it names, "\n\n" when it merges turns).
PER_MESSAGE: Final = 16
# Fields Go writes for a tool or a tool call although the request left them out.
PER_TOOL: Final = 128
# Routes whose prompt goes through the model's template as a chat.
CHAT: Final = frozenset({"chat", "openai_chat", "anthropic_messages", "openai_responses"})
TEMPLATED: Final = CHAT | {"generate", "openai_completions"}

# The bytes Go's json writes as an escape (controls, <, >, &, the quote, the backslash), and the two
# line separators it escapes (three bytes each in UTF-8).
_ESCAPED: Final = bytes(range(0x20)) + b'<>&"\\'
_SEPARATORS: Final = ("\u2028".encode(), "\u2029".encode())


def go_json_size(value: Any) -> int:
    """An upper bound on the bytes Go's json.Marshal writes for a decoded JSON value: strings
    escaped as Go escapes them (<, >, &, U+2028, U+2029 and controls as \\u00XX), every number as
    the longest float64 Go prints."""
    if isinstance(value, str):
        encoded = value.encode("utf-8", "surrogatepass")
        # Counted in a few C passes (a 9 MB string of `<` in 30 ms, not seconds): each escape is at
        # most 6 bytes where the string had 1 (or 3 for the separators).
        escapes = len(encoded) - len(encoded.translate(None, _ESCAPED))
        escapes += sum(encoded.count(s) for s in _SEPARATORS) if not value.isascii() else 0
        return len(encoded) + 2 + 5 * escapes
    if isinstance(value, bool) or value is None:
        return 5
    if isinstance(value, (int, float)):
        return 24
    if isinstance(value, list):
        return 2 + sum(go_json_size(v) + 1 for v in value)
    if isinstance(value, dict):
        return 2 + sum(go_json_size(k) + go_json_size(v) + 2 for k, v in value.items())
    return 24


def _objects(value: Any) -> int:
    """JSON objects in a value, and strings that are list elements: every message Ollama's
    conversion can make of a conversation (a message per content block, per tool result, per
    text part) and every tool call comes from at least one of them."""
    if isinstance(value, list):
        return sum(1 if isinstance(v, str) else _objects(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(_objects(v) for v in value.values())
    return 0


def _strings(value: Any) -> tuple[int, int, bool]:
    """(count, the longest Go JSON form, whether there is audio) of the strings of a document."""
    if isinstance(value, str):
        return 1, go_json_size(value), False
    if isinstance(value, (list, dict)):
        count, longest, audio = 0, 0, False
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            n, size, sound = _strings(item)
            audio = audio or sound or (isinstance(key, str) and body.fold(key) == "input_audio")
            count, longest = count + n + isinstance(key, str), max(longest, size)
            if isinstance(key, str):
                longest = max(longest, go_json_size(key))
        return count, longest, audio
    return 0, 0, False


# Top-level fields whose strings a template may print (what else a body holds, model, options,
# limits, stream flags, tools as their own JSON bound, never reaches the prompt as text).
RENDERED: Final = frozenset(
    {"messages", "input", "system", "instructions", "prompt", "suffix", "think", "reasoning"}
)
_CALL_KEYS: Final = frozenset({"tool_calls", "arguments", "input"})


def _has_calls(value: Any) -> bool:
    """Whether a conversation can hold a tool call at all: every form Ollama reads one from (native
    and OpenAI `tool_calls`, Anthropic `tool_use` blocks' `input`, Responses `function_call`
    items' `arguments`) has one of these keys."""
    if isinstance(value, list):
        return any(_has_calls(v) for v in value)
    if isinstance(value, dict):
        return any(body.fold(k) in _CALL_KEYS or _has_calls(v) for k, v in value.items())
    return False


def _conversation(document: dict[str, Any]) -> list[Any]:
    for name in ("messages", "input"):
        value = body.get(document, name)
        if isinstance(value, list):
            return value
    return []


def num_ctx(route: policy.Route, document: dict[str, Any], facts: ModelFacts | None, fallback: int) -> int:
    """The num_ctx Ollama runs the request with, or more: the request's (native routes), else the
    Modelfile's, else the trained context length, capped at the trained context length."""
    requested = None
    if policy.FAMILY.get(route) == "native":
        value = body.option(document, "num_ctx")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1:
            requested = int(value)
    if facts is None:
        return requested or fallback
    context = requested or facts.num_ctx or facts.context_length or fallback
    return min(context, facts.context_length) if facts.context_length else context


def check_two_passes(route: policy.Route, document: dict[str, Any], facts: ModelFacts | None) -> None:
    """A structured output from a thinking model is two generations in Ollama (the thinking, then
    the answer with the prompt and the thinking evaluated again) and only the second is counted in
    the answer: refused unless thinking is off (docs/DECISIONS.md)."""
    if route not in CHAT or not _structured(route, document):
        return
    if route == "chat" and body.get(document, "think") is False:
        return
    if facts is not None and not facts.thinking:
        return
    raise Refused(400, "a structured output (format) from a thinking model needs thinking off (think: false)")


def _structured(route: policy.Route, document: dict[str, Any]) -> bool:
    if route == "chat":
        value = body.get(document, "format")
        return value not in (None, "", "null")
    if route == "openai_chat":
        value = body.get(document, "response_format")
        return isinstance(value, dict) and body.get(value, "type") in ("json_object", "json_schema")
    if route == "openai_responses":
        text = body.get(document, "text")
        value = body.get(text, "format") if isinstance(text, dict) else None
        return isinstance(value, dict) and body.get(value, "type") in ("json_object", "json_schema")
    return False


async def request_bound(
    route: policy.Route,
    document: dict[str, Any],
    catalog: ModelCatalog,
    options: ProxyOptions,
    *,
    run: Callable[[Callable[[], int]], Awaitable[int]] | None = None,
) -> int:
    """The prompt bound the reservation takes: from the model's template and context; embeddings,
    which no template wraps, by their inputs' bytes. Refuses (400) what Ollama would count twice.
    `run` runs the walks over the body (the caller's parsing thread for a large one)."""
    adapter = apis.adapter(route)
    facts: ModelFacts | None = None
    if route in TEMPLATED:
        names = adapter.models(route, document) or []
        name = next((n for n in names if isinstance(n, str)), None)
        facts = await catalog.facts(name) if name is not None else None

    def compute() -> int:
        size = adapter.prompt(route, document)
        if route not in TEMPLATED:
            return size.bound(options.template_tokens_per_message, options.image_tokens)
        check_two_passes(route, document, facts)
        return prompt_bound(route, document, size, facts, fallback_context=options.fallback_context_tokens)

    return compute() if run is None else await run(compute)


def prompt_bound(
    route: policy.Route,
    document: dict[str, Any],
    size: meter.PromptSize,
    facts: ModelFacts | None,
    *,
    fallback_context: int,
) -> int:
    """The most prompt tokens Ollama can count for this request."""
    context = num_ctx(route, document, facts, fallback_context)
    rendered = _rendered(route, document, size, facts, _strings(document))
    return context if rendered is None else min(rendered + SPECIAL_TOKENS, context)


def _rendered(
    route: policy.Route,
    document: dict[str, Any],
    size: meter.PromptSize,
    facts: ModelFacts | None,
    strings: tuple[int, int, bool],
) -> int | None:
    """Bytes of the prompt Ollama renders, or None where they cannot be bounded."""
    if size.images or size.context_tokens or body.get(document, "context") is not None:
        return None
    if strings[2]:  # audio is stored as an image: its tokens are not bytes either
        return None
    generate = route in ("generate", "openai_completions")
    if generate and body.get(document, "raw") is True:
        return size.text_bytes
    if facts is None or facts.rendered or (generate and body.get(document, "template") not in (None, "")):
        return None
    suffix = (
        generate
        and body.get(document, "suffix") not in (None, "")
        and body.get(document, "prompt") not in (None, "")
    )
    poly = facts.template.suffix if suffix else facts.template.messages
    if poly is None:
        return None
    return evaluate(poly, _values(route, document, size, facts, strings))


def _replaces_system(route: policy.Route, document: dict[str, Any]) -> bool:
    """Whether Ollama leaves the Modelfile SYSTEM out: a generate with its own `system`, a chat whose
    first message is a system message (server/routes.go: `req.Messages[0].Role != "system"`). Only
    where the body shows it for certain: native chat, and OpenAI chat with a string content (a list
    may convert to no message at all)."""
    if route == "generate":
        system = body.get(document, "system")
        return isinstance(system, str) and system != ""
    if route not in ("chat", "openai_chat"):
        return False
    messages = body.get(document, "messages")
    first = messages[0] if isinstance(messages, list) and messages else None
    if not isinstance(first, dict) or body.get(first, "role") != "system":
        return False
    return route == "chat" or isinstance(body.get(first, "content"), str)


def _values(
    route: policy.Route,
    document: dict[str, Any],
    size: meter.PromptSize,
    facts: ModelFacts,
    strings: tuple[int, int, bool],
) -> dict[str, int]:
    conversation = _conversation(document)
    calls = _objects(conversation)
    # The adapter's count, or more when Ollama may split messages (a system prompt adds one).
    messages = max(size.messages, calls) + len(facts.messages) + 1
    count, longest, _ = strings
    system = 0 if _replaces_system(route, document) else facts.system
    added = system + sum(n for _, n in facts.messages) + 2 * messages  # "\n\n" of merged turns
    # Every string a template prints is a string of the body, or a part of it Ollama re-marshals
    # as JSON (a tool result object, arguments): all of them together are within the body's Go JSON.
    rendered = [v for k, v in document.items() if body.fold(k) in RENDERED]
    text = max(size.text_bytes, go_json_size(rendered)) + added
    roles = sum(
        len(str(body.get(m, "role") or "").encode("utf-8", "surrogatepass"))
        for m in conversation
        if isinstance(m, dict)
    )
    roles += sum(len(role.encode()) for role, _ in facts.messages) + PER_MESSAGE * messages
    with_calls = _has_calls(conversation)
    tools = body.get(document, "tools")
    tools = tools if isinstance(tools, list) else []
    values = dict.fromkeys(VARIABLES, text)
    json_text = 6 * text + 2 * (count + messages)
    for name in VARIABLES:
        if name.endswith("J"):
            values[name] = json_text
    values.update(
        R=roles,
        RJ=6 * roles + 2 * messages,
        M=messages,
        TURNS=messages + 1,
        T=len(tools),
        TT=1 if tools else 0,
        J=sum(go_json_size(t) for t in tools) + PER_TOOL * len(tools),
        K=calls if with_calls else 0,
        # Arguments sent as a JSON string are decoded and written again: a number of 4 bytes
        # ("1e20") may come back as 21, hence 6 bytes a byte.
        KJ=6 * go_json_size(conversation) + PER_TOOL * calls if with_calls else 0,
        # A tool message takes its tool name from the call it answers: any message may carry the
        # longest string of the body as its name.
        N=text + messages * longest,
        NJ=6 * (text + messages * longest) + 2 * messages,
    )
    return values
