"""The template bound against Ollama's own templates and the prompts Ollama renders from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_proxy import template_bound as tb

FIXTURES = Path(__file__).parent.parent / "fixtures" / "ollama_templates"
TEMPLATES = sorted(p.name for p in FIXTURES.glob("*.gotmpl"))

# The messages of Ollama's template_test.go TestTemplate, keyed as its testdata files are.
GREETING = ("user", "Hello, how are you?")
REPLY = ("assistant", "I'm doing great. How can I help you today?")
SHOW = ("user", "I'd like to show off how chat templating works!")
CASES = {
    "user": (GREETING,),
    "user-assistant-user": (GREETING, REPLY, SHOW),
    "system-user-assistant-user": (("system", "You are a helpful assistant."), GREETING, REPLY, SHOW),
}
# Templates Ollama's test renders with a trailing space it then strips.
TRAILING_SPACE = {
    "chatqa.gotmpl",
    "llama2-chat.gotmpl",
    "mistral-instruct.gotmpl",
    "openchat.gotmpl",
    "vicuna.gotmpl",
}


def values(messages: tuple[tuple[str, str], ...]) -> dict[str, int]:
    """The variables of a request, measured by hand: every count and byte length of what it sends."""
    size = dict.fromkeys(tb.VARIABLES, 0)
    for role, content in messages:
        size["M"] += 1
        size["R"] += len(role)
        size["RJ"] += len(role) + 2
        size["C"] += len(content.encode())
        size["CJ"] += len(content.encode()) + 2  # none of these strings needs escaping
        key = {"system": "CS", "user": "CU", "assistant": "CA"}[role]
        size[key] += len(content.encode())
        size[key + "J"] += len(content.encode()) + 2
    system = [content for role, content in messages if role == "system"]
    size["S"] = len("\n\n".join(system).encode())
    size["SJ"] = size["S"] + 2
    size["TURNS"] = size["M"] + 1
    return size


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_bound_is_never_below_what_ollama_renders(name: str, case: str) -> None:
    """For each of Ollama's templates, the bound for each test conversation is at least the bytes
    Ollama's own test says that template renders for it."""
    analysis = tb.analyse((FIXTURES / name).read_text())
    expected = (FIXTURES / f"{name}.{case}").read_bytes()
    if name in TRAILING_SPACE:
        expected += b" "
    assert analysis.messages is not None
    bound = tb.evaluate(analysis.messages, values(CASES[case]))
    assert bound >= len(expected)


def test_llama3_bound_counts_each_message_once() -> None:
    """llama3-instruct prints each message's role and content once inside its range, and its
    literal text once per message and once at the end: the bound is exactly that shape."""
    analysis = tb.analyse((FIXTURES / "llama3-instruct.gotmpl").read_text())
    assert analysis.messages is not None
    terms = analysis.messages
    assert terms[("C",)] == 1
    assert terms[("R",)] == 1
    assert set(terms) == {("M",), ("C",), ("R",), ()}


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{{ m.content }}{% endfor %}",  # llama-server's Jinja template
        "{{ .Messages }}",  # a struct slice printed as %v (images included)
        "{{ range .Messages }}{{ .Images }}{{ end }}",
        "{{ range .Messages }}{{ . }}{{ end }}",
        "{{ call .Foo }}",
        '{{ template "missing" . }}',
        '{{ define "a" }}{{ template "a" . }}{{ end }}{{ template "a" . }}',
        "{{ range .Messages }}{{ $x = .Content }}{{ end }}",  # undeclared
        '{{ $x := "" }}{{ range .Messages }}{{ $x = .Content }}{{ $x }}{{ end }}',  # printed, not reset
        '{{ $x := "" }}{{ range .Messages }}{{ $x = printf "%s%s" $x $x }}{{ end }}',  # doubles
        '{{ $x := "" }}{{ range .Messages }}{{ $x = .Content }}{{ printf "%s" $x }}{{ end }}',
        "{{ if .System }}",
        "{{ .System ",
        "{{ range $i, $m, $n := .Messages }}{{ end }}",
    ],
)
def test_what_cannot_be_bounded_has_no_bound(template: str) -> None:
    """Jinja, printed messages or images, unknown functions, undefined or recursive templates,
    reassigned sized variables and syntax errors all leave the chat path without a bound."""
    assert tb.analyse(template).messages is None


def test_nested_ranges_multiply() -> None:
    """Tools printed inside the messages range count once per message."""
    analysis = tb.analyse("{{ range .Messages }}{{ range $.Tools }}{{ . }}{{ end }}{{ end }}")
    assert analysis.messages is not None
    value = tb.evaluate(analysis.messages, {**dict.fromkeys(tb.VARIABLES, 0), "M": 3, "T": 2, "J": 100})
    assert value >= 3 * 100


def test_json_of_content_allows_go_escaping() -> None:
    """`json .Content` is bounded by the escaped form (CJ), not the raw bytes."""
    analysis = tb.analyse("{{ range .Messages }}{{ json .Content }}{{ end }}")
    assert analysis.messages == {("CJ",): 1}


def test_printf_and_or_take_the_larger_argument() -> None:
    """`or .System "x"` prints one of its arguments; printf may quote each argument (a legacy
    template: .System is the turn's system message, once per turn)."""
    analysis = tb.analyse('{{ or .System "default" }}{{ printf "%q" .System }}')
    assert analysis.messages is not None
    value = tb.evaluate(analysis.messages, {**dict.fromkeys(tb.VARIABLES, 0), "CS": 10, "TURNS": 1})
    assert value >= 10 + 6 * 10 + 2


def test_suffix_path_prints_prompt_and_suffix() -> None:
    """A generate with a suffix renders .Prompt and .Suffix, nothing else."""
    analysis = tb.analyse("<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>")
    assert analysis.suffix == {("P",): 1, ("X",): 1, (): 18}


def test_a_system_prompt_accumulated_and_reset_counts_once() -> None:
    """The idiom of six of Ollama's templates: system messages gathered in a variable, printed at
    the next user turn and reset to "". Everything added is printed at most once (plus after the
    range): the bound holds every content once for the variable and once for the messages."""
    template = (
        '{{- $system := "" }}{{- range .Messages }}'
        '{{- if eq .Role "system" }}{{ $system = printf "%s\n\n%s" $system .Content }}'
        '{{- else }}{{ if $system }}{{ $system }}{{ $system = "" }}{{ end }}{{ .Content }}{{ end }}'
        "{{- end }}"
    )
    analysis = tb.analyse(template)
    assert analysis.messages == {("C",): 2, ("M",): 2}


@pytest.mark.parametrize(
    "template",
    [
        '{{ block "s" . }}{{ range .Messages }}{{ .Content }}{{ end }}{{ end }}{{ define "s" }}{{ end }}',
        '{{ define "" }}{{ range .Messages }}{{ .Content }}{{ end }}{{ end }}',
        '{{ range .Messages }}{{ printf "%9999999d" 1 }}{{ end }}',
        '{{ range .Messages }}{{ printf "%[1]s%[1]s%[1]s" .Content }}{{ end }}',
        '{{ $x := "" }}{{ $y := "" }}{{ range .Messages }}{{ $y = printf "%s%s" $y .Content }}'
        '{{ $x = printf "%s%s" $x $y }}{{ end }}{{ $x }}',
        '{{ $x := "" }}{{ range .Messages }}{{ $x = printf "%s%s" $x .Content }}{{ $x }}{{ continue }}'
        '{{ $x = "" }}{{ end }}',
        "{{ () }}",
        "{{ len () }}",
        "{{ if 1 }}" * 3000 + "{{ end }}" * 3000,
    ],
)
def test_what_go_reads_otherwise_has_no_bound(template: str) -> None:
    """Found by review: Go keeps a non-empty block over an empty redefinition and lets `define ""`
    replace the root; printf widths and argument indexes print more than their argument; an
    accumulator fed from another, or printed before a `continue` that skips its reset, grows
    quadratically; empty parentheses and deep nesting: none of these gets a bound, none crashes."""
    assert tb.analyse(template).messages is None


def test_templates_calling_templates_stop_being_read() -> None:
    """Seven defines each calling the next eight times (8^7 executions): the reading gives up
    within its visit budget instead of stalling the event loop."""
    parts = ['{{ define "t7" }}{{ range .Messages }}{{ .Content }}{{ end }}{{ end }}']
    for level in range(6, -1, -1):
        calls = f'{{{{ template "t{level + 1}" . }}}}' * 8
        parts.append(f'{{{{ define "t{level}" }}}}{calls}{{{{ end }}}}')
    parts.append('{{ template "t0" . }}')
    assert tb.analyse("".join(parts)).messages is None


def test_a_variable_named_messages_does_not_make_the_messages_path() -> None:
    """Go's Vars records `$messages` as "$messages": a template naming only that variable runs
    the legacy path (once per turn, .Prompt and .Response printed)."""
    analysis = tb.analyse("{{ $messages := 0 }}[INST] {{ .Prompt }} [/INST]")
    assert analysis.messages is not None
    value = tb.evaluate(
        analysis.messages, {**dict.fromkeys(tb.VARIABLES, 0), "CU": 150_000, "CA": 10, "TURNS": 4}
    )
    assert value >= 150_000 + 10


def test_prompt_and_suffix_print_no_value_on_the_messages_path() -> None:
    """On the messages path .Prompt and .Suffix are missing keys: `<no value>`, and `null` as json."""
    analysis = tb.analyse("{{ range .Messages }}{{ $.Prompt }}{{ json $.Suffix }}{{ end }}")
    assert analysis.messages is not None
    assert tb.evaluate(analysis.messages, {**dict.fromkeys(tb.VARIABLES, 0), "M": 3}) >= 14 * 3


def test_a_branch_that_needs_tools_costs_nothing_without_them() -> None:
    """`if and $.Tools $last` (llama3.2's tools preamble inside its range) and `if .ToolCalls` run
    only when there are tools or calls: without them those branches add nothing, with them they
    count in full."""
    template = (
        "{{ range $i, $m := .Messages }}{{ if and $.Tools true }}" + "p" * 300 + "{{ end }}"
        "{{ if .ToolCalls }}" + "c" * 50 + "{{ range .ToolCalls }}{{ .Function.Name }}{{ end }}{{ end }}"
        "{{ .Content }}{{ end }}"
    )
    analysis = tb.analyse(template)
    assert analysis.messages is not None
    base = {**dict.fromkeys(tb.VARIABLES, 0), "M": 2, "C": 10}
    assert tb.evaluate(analysis.messages, base) == 10
    with_tools = tb.evaluate(analysis.messages, {**base, "T": 1, "TT": 1, "J": 40})
    assert with_tools >= 10 + 2 * 300
    with_calls = tb.evaluate(analysis.messages, {**base, "K": 1, "KJ": 30})
    assert with_calls >= 10 + 50 + 30
