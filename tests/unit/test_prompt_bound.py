"""The prompt bound of a request: the model's template and Modelfile, num_ctx, and the fallbacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stream_proxy import apis, prompt_bound
from stream_proxy.exceptions import Refused
from stream_proxy.models import ModelFacts, facts_from_show
from stream_proxy.template_bound import Analysis, analyse

LLAMA3 = (
    Path(__file__).parent.parent / "fixtures" / "ollama_templates" / "llama3-instruct.gotmpl"
).read_text()


def show(**fields: Any) -> dict[str, Any]:
    """An /api/show answer shaped as Ollama writes it."""
    answer: dict[str, Any] = {
        "template": LLAMA3,
        "parameters": 'stop                           "<|eot_id|>"',
        "model_info": {"general.architecture": "llama", "llama.context_length": 131072},
        "capabilities": ["completion", "tools"],
    }
    answer.update(fields)
    return answer


def bound(route: Any, document: dict[str, Any], facts: ModelFacts | None, fallback: int = 262144) -> int:
    size = apis.adapter(route).prompt(route, document)
    return prompt_bound.prompt_bound(route, document, size, facts, fallback_context=fallback)


def test_facts_from_show_reads_what_bounds_a_prompt() -> None:
    """System, Modelfile messages, num_ctx from the parameters text, the trained context length,
    thinking and a renderer are read from the answer as Ollama writes them."""
    facts = facts_from_show(
        show(
            system="You are terse.",
            messages=[{"role": "user", "content": "hé"}],
            parameters='num_ctx                        8192\nstop                           "<|eot_id|>"',
            capabilities=["completion", "thinking"],
            renderer="qwen3-coder",
        ),
        "sha256:abc",
    )
    assert (facts.system, facts.messages, facts.num_ctx, facts.context_length) == (
        14,
        (("user", 3),),
        8192,
        131072,
    )
    assert facts.thinking
    assert facts.rendered
    assert facts.digest == "sha256:abc"


def test_hi_against_llama3_is_bounded_above_what_ollama_renders() -> None:
    """'hi' through llama3-instruct renders to these 101 bytes (written out by hand from the
    template); the bound is at least that plus BOS, and not wildly more."""
    rendered = (
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    facts = facts_from_show(show(), None)
    document = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    value = bound("chat", document, facts)
    assert len(rendered.encode()) == 101
    assert 101 + 1 <= value < 1000


def test_a_long_system_prompt_is_in_the_bound() -> None:
    """A Modelfile SYSTEM of 2,000 bytes is rendered with every chat: the bound grows by it."""
    short = bound(
        "chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, facts_from_show(show(), None)
    )
    long = bound(
        "chat",
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        facts_from_show(show(system="x" * 2000), None),
    )
    assert long - short >= 2000


@pytest.mark.parametrize(
    ("route", "document", "replaced"),
    [
        (
            "chat",
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]},
            True,
        ),
        ("chat", {"messages": [{"ROLE": "system", "content": ""}, {"role": "user", "content": "hi"}]}, True),
        (
            "chat",
            {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]},
            False,
        ),
        ("chat", {"messages": [{"role": "System", "content": "Be brief."}]}, False),  # Go compares exactly
        ("openai_chat", {"messages": [{"role": "system", "content": "Be brief."}]}, True),
        # A list may convert to no message at all: the next one is then the first.
        (
            "openai_chat",
            {"messages": [{"role": "system", "content": []}, {"role": "user", "content": "hi"}]},
            False,
        ),
        ("generate", {"prompt": "hi", "system": "Be brief."}, True),
        ("generate", {"prompt": "hi", "system": ""}, False),
        ("anthropic_messages", {"max_tokens": 5, "system": "Be brief.", "messages": []}, False),
    ],
)
def test_a_system_of_the_request_replaces_the_modelfile_system(
    route: Any, document: dict[str, Any], replaced: bool
) -> None:
    """Ollama leaves the Modelfile SYSTEM out when the first message is a system message (or a
    generate has its own `system`): the bound leaves it out exactly where the body shows that."""
    body = {"model": "m", **document}
    plain = bound(route, body, facts_from_show(show(), None))
    with_system = bound(route, body, facts_from_show(show(system="x" * 2000), None))
    assert (with_system - plain >= 2000) is not replaced
    if replaced:
        assert with_system == plain


def test_num_ctx_caps_the_bound() -> None:
    """options.num_ctx smaller than the byte bound is the bound; the trained length caps a larger one."""
    facts = facts_from_show(show(), None)
    text = "word " * 2000
    small = {"model": "m", "messages": [{"role": "user", "content": text}], "options": {"num_ctx": 512}}
    assert bound("chat", small, facts) == 512
    huge = {"model": "m", "images": ["aGk="], "prompt": "hi", "options": {"num_ctx": 10_000_000}}
    assert bound("generate", huge, facts) == 131072


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (None, 262144),  # Ollama did not describe the model: the fallback num_ctx
        (facts_from_show(show(template="{% for m in messages %}{{ m.content }}{% endfor %}"), None), 131072),
        (facts_from_show(show(renderer="harmony"), None), 131072),
        (ModelFacts(None, Analysis(None, None), 0, (), 131072, 4096, False, False), 4096),
    ],
)
def test_without_a_template_bound_num_ctx_is_the_bound(facts: ModelFacts | None, expected: int) -> None:
    """Unknown model, a Jinja template, a built-in renderer, no template bound: the num_ctx in
    effect (the Modelfile's when set), never a guess."""
    document = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert bound("chat", document, facts) == expected


@pytest.mark.parametrize(
    "document",
    [
        {"model": "m", "prompt": "hi", "images": ["aGk="]},
        {"model": "m", "prompt": "hi", "context": [1, 2, 3]},
        {"model": "m", "prompt": "hi", "template": "{{ range .Messages }}{{ end }}"},
    ],
)
def test_images_context_and_client_templates_are_bounded_by_num_ctx(document: dict[str, Any]) -> None:
    """Image tokens are not bytes, context tokens are detokenized by Ollama, a client template
    expands freely: each of these requests reserves the num_ctx in effect."""
    assert bound("generate", document, facts_from_show(show(), None)) == 131072


def test_raw_generate_is_its_prompt() -> None:
    """raw: true sends the prompt untemplated: its bytes plus the tokenizer's own tokens."""
    document = {"model": "m", "prompt": "abcdef", "raw": True}
    assert bound("generate", document, facts_from_show(show(), None)) == 6 + prompt_bound.SPECIAL_TOKENS


def test_go_json_size_counts_go_escaping() -> None:
    """Go's json.Marshal writes <, >, & and U+2028 as 6-byte escapes; a number as up to 24 bytes."""
    assert prompt_bound.go_json_size("<a&b>") == 2 + 5 + 3 * 5
    assert prompt_bound.go_json_size("\u2028") == 2 + 3 + 5
    assert prompt_bound.go_json_size({"n": 1e20}) == 2 + 3 + 24 + 2


@pytest.mark.parametrize(
    ("route", "document"),
    [
        ("chat", {"model": "q", "messages": [], "format": "json"}),
        ("openai_chat", {"model": "q", "messages": [], "response_format": {"type": "json_object"}}),
        ("openai_responses", {"model": "q", "input": "hi", "text": {"format": {"type": "json_schema"}}}),
    ],
)
def test_structured_output_from_a_thinking_model_is_refused(route: Any, document: dict[str, Any]) -> None:
    """Ollama's two passes (think, then answer with the thinking as prompt) are counted only once
    in its answer: refused for a thinking model or an undescribed one; fine with think: false."""
    thinking = facts_from_show(show(capabilities=["completion", "thinking"]), None)
    for facts in (thinking, None):
        with pytest.raises(Refused) as refused:
            prompt_bound.check_two_passes(route, document, facts)
        assert refused.value.status == 400
    prompt_bound.check_two_passes(route, document, facts_from_show(show(), None))
    if route == "chat":
        prompt_bound.check_two_passes(route, {**document, "think": False}, thinking)


def test_analysis_of_show_template_is_cached_in_facts() -> None:
    """The facts hold the template's analysis (not the text): one parse per model and digest."""
    facts = facts_from_show(show(), "d")
    assert facts.template == analyse(LLAMA3)


def test_every_string_of_the_body_is_in_the_bound() -> None:
    """A template that prints .ToolCallID: a 3,000-byte tool_call_id no adapter counts as text is
    still within the bound (every string of the body bounds every printed one)."""
    template = "{{ range .Messages }}[{{ .ToolCallID }}]{{ .Content }}{{ end }}"
    facts = facts_from_show(show(template=template), None)
    document = {
        "model": "m",
        "messages": [{"role": "tool", "content": "42", "tool_call_id": "c" * 3000}],
    }
    assert bound("chat", document, facts) >= 3000 + 2 + 2


def test_messages_ollama_splits_are_each_counted() -> None:
    """One Anthropic message of five tool results becomes five tool messages in Ollama: a
    template writing 100 literal bytes per message is bounded for five of them, not one."""
    template = "{{ range .Messages }}" + "x" * 100 + "{{ .Content }}{{ end }}"
    facts = facts_from_show(show(template=template), None)
    results = [{"type": "tool_result", "tool_use_id": f"t{i}", "content": "ok"} for i in range(5)]
    document = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": results}]}
    assert bound("anthropic_messages", document, facts) >= 5 * 100 + 5 * 2


def test_an_object_ollama_marshals_into_content_is_bounded_by_its_json() -> None:
    """Found by review: a web_search_tool_result's object content becomes json.Marshal text in a
    tool message; its 100,000-byte key and its escaped `<`s are within the bound."""
    facts = facts_from_show(show(), None)
    result = {"type": "web_search_tool_result", "tool_use_id": "x", "content": {"k" * 100_000: "<" * 1000}}
    document = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [result]}]}
    assert bound("anthropic_messages", document, facts) >= 100_000 + 6 * 1000


def test_a_tool_name_copied_into_every_tool_message_is_bounded() -> None:
    """Found by review: Ollama's OpenAI layer names each tool message after the call it answers,
    so one 10,000-byte name may be printed once per tool message."""
    template = (
        '{{ range .Messages }}{{ if eq .Role "tool" }}<r n="{{ .ToolName }}">{{ .Content }}</r>'
        "{{ end }}{{ end }}"
    )
    facts = facts_from_show(show(template=template, model_info={"x.context_length": 10**8}), None)
    call = {"id": "c", "type": "function", "function": {"name": "n" * 10_000, "arguments": "{}"}}
    messages: list[dict[str, Any]] = [{"role": "assistant", "content": "", "tool_calls": [call]}]
    messages += [{"role": "tool", "tool_call_id": "c", "content": ""}] * 100
    assert bound("openai_chat", {"model": "m", "messages": messages}, facts) >= 100 * 10_000


def test_ollamas_default_template_says_nothing() -> None:
    """A model without a template of its own shows `{{ .Prompt }}` while llama-server renders it
    with its built-in chat template: bounded by num_ctx alone."""
    facts = facts_from_show(show(template="{{ .Prompt }}"), None)
    document = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert bound("chat", document, facts) == 131072


def test_audio_is_bounded_by_num_ctx() -> None:
    """An OpenAI input_audio part is stored as an image by Ollama: its tokens are not bytes."""
    part = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    document = {"model": "m", "messages": [{"role": "user", "content": [part]}]}
    assert bound("openai_chat", document, facts_from_show(show(), None)) == 131072
