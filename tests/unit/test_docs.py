"""The operator-facing documents stay in step with the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.config import all_variables

ROOT = Path(__file__).resolve().parents[2]
# Read by the local-stack tooling and the CLI's stack discovery, not by the services.
TOOLING = {"GATEWAY_SIM_TOKENS_PER_SECOND", "GATEWAY_STACK_FILE"}


@pytest.mark.parametrize("document", ["README.md", ".env.example"])
def test_every_variable_is_documented(document: str) -> None:
    """README's configuration table and .env.example name every GATEWAY_* variable the code reads,
    and no variable the code does not read."""
    text = (ROOT / document).read_text()
    names = {name for name, *_ in all_variables()}
    missing = sorted(n for n in names if n not in text)
    assert missing == []
    mentioned = set(re.findall(r"GATEWAY_[A-Z0-9_]*[A-Z0-9]", text))
    extra = sorted(mentioned - names - TOOLING)
    assert extra == [], "documented but not read by any component"


def test_readme_shows_the_two_commands() -> None:
    """The README gives exactly the two commands that run and test the gateway."""
    text = (ROOT / "README.md").read_text()
    assert "scripts/dev up" in text
    assert "scripts/test" in text


def test_generated_config_docs_are_current() -> None:
    """README's table and .env.example are exactly what scripts/gen_config_docs.py writes."""
    import gen_config_docs

    readme = (ROOT / "README.md").read_text()
    assert gen_config_docs.table() in readme
    assert (ROOT / ".env.example").read_text() == gen_config_docs.env_example()
