"""The simulator's Go template interpreter renders every fixture exactly as Go's text/template did.

tests/fixtures/templates/*.json are written by scripts/template_fixtures (Go's own
text/template plus a port of Ollama's template value code); each case holds a template, its
input and Go's output or error message. "ollama" cases bind the input JSON with the
simulator's request binders and render through its port of Template.Execute; "generic" cases
run the interpreter over generic JSON data with Ollama's FuncMap and missingkey=zero.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest

from ollama_simulator.api_types import bind_messages, bind_tools, go_any
from ollama_simulator.goexec import execute
from ollama_simulator.gojson import Binder, GoObject
from ollama_simulator.gotemplate import TemplateError, parse
from ollama_simulator.profiles import PROFILES
from ollama_simulator.prompt_template import OLLAMA_FUNCTION_NAMES, _funcs, parse_template

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "templates"
FILES = ("interpreter.json", "model_templates.json", "ollama_templates.json")


def _cases() -> list[Any]:
    cases: list[Any] = []
    for name in FILES:
        with (FIXTURES / name).open(encoding="utf-8") as handle:
            document = json.load(handle, object_pairs_hook=GoObject)
        cases.extend(pytest.param(case, id=f"{name}:{case['name']}") for case in document["cases"])
    return cases


def _render(case: GoObject) -> str:
    today = datetime.date.fromisoformat(case["today"])
    data = case["input"]
    if case["mode"] == "generic":
        tree = parse(case["template"], OLLAMA_FUNCTION_NAMES)
        return execute(tree, go_any(data), _funcs(today))
    bind = Binder("ChatRequest")
    template = parse_template(case["template"])
    return template.execute(
        messages=bind_messages(data.folded.get("messages"), bind),
        tools=bind_tools(data.folded.get("tools"), bind),
        prompt=data.get("prompt", ""),
        suffix=data.get("suffix", ""),
        think=data.get("think", False),
        think_level=data.get("think_level", ""),
        is_think_set=data.get("is_think_set", False),
        today=today,
    )


def test_fixtures_exist() -> None:
    """The fixture files are committed and each holds cases (a missing file would test nothing)."""
    assert all(len(json.loads((FIXTURES / name).read_text())["cases"]) > 10 for name in FILES)


def test_the_models_render_the_templates_go_rendered() -> None:
    """Every profile's template is one Go rendered (a template edited without regenerating the
    fixtures would otherwise go untested)."""
    document = json.loads((FIXTURES / "model_templates.json").read_text())
    rendered = {case["template"] for case in document["cases"]}
    for profile in PROFILES.values():
        assert profile.embedding or profile.template_text in rendered, profile.name


@pytest.mark.parametrize("case", _cases())
def test_renders_like_go(case: GoObject) -> None:
    """Go's output byte for byte, or Go's error message when Go refused the template or input."""
    if case["error"] is not None:
        with pytest.raises(TemplateError) as raised:
            _render(case)
        assert str(raised.value) == case["error"]
    else:
        assert _render(case) == case["output"]
