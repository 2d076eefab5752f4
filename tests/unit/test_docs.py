"""The operator-facing documents stay in step with the code."""

from __future__ import annotations

import re
import subprocess
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


# Working notes that lived outside the repository; the project's own docs/ replaced them.
OUTSIDE_PAGES = re.compile(
    r"DESIGN\.md|ollama-protocol\.md|ollama-0\.33-apis\.md|caddy-notes\.md|embedded-stack\.md"
    r"|lessons-from-peers\.md|STYLE\.md"
)
DOC_ANCHOR = re.compile(r"docs/([A-Za-z0-9_.-]+\.md)#([A-Za-z0-9_-]+)")


def _tracked_texts() -> list[tuple[str, str]]:
    """(path, text) of every git-tracked file that exists and is text, this file excluded."""
    # CI runs on a fresh clone; without git the check cannot be made, and must not pass silently.
    assert (ROOT / ".git").exists(), "not a git checkout: the tracked files cannot be listed"
    listed = subprocess.run(
        ["git", "ls-files", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    this = Path(__file__).resolve().relative_to(ROOT).as_posix()
    texts = []
    for name in filter(None, listed.split("\0")):
        path = ROOT / name
        if name == this or not path.is_file():
            continue
        raw = path.read_bytes()
        if b"\0" not in raw:
            texts.append((name, raw.decode("utf-8", "replace")))
    return texts


def anchor(heading: str) -> str:
    """A Markdown heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(document: str) -> set[str]:
    """Every heading anchor of a Markdown document (code blocks skipped)."""
    found: set[str] = set()
    fenced = False
    for line in document.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            found.add(anchor(match[1]))
    return found


def test_no_file_cites_the_outside_working_notes() -> None:
    """No tracked file cites DESIGN.md, ollama-protocol.md, ollama-0.33-apis.md, caddy-notes.md,
    embedded-stack.md, lessons-from-peers.md or STYLE.md: those pages are not in the repository, so a
    newcomer cannot follow them; the facts live in docs/ARCHITECTURE.md and docs/OLLAMA.md."""
    citations = [
        f"{name}:{number}: {line.strip()[:120]}"
        for name, text in _tracked_texts()
        for number, line in enumerate(text.splitlines(), 1)
        if OUTSIDE_PAGES.search(line)
    ]
    assert citations == []


def test_every_docs_anchor_reference_resolves() -> None:
    """Every `docs/X.md#anchor` reference in a tracked file names an existing document and one of its
    headings (GitHub-style anchors), so code citing a section leads to it."""
    documents: dict[str, set[str] | None] = {}
    broken = []
    for name, text in _tracked_texts():
        for number, line in enumerate(text.splitlines(), 1):
            for document, target in DOC_ANCHOR.findall(line):
                if document not in documents:
                    path = ROOT / "docs" / document
                    documents[document] = anchors(path.read_text()) if path.is_file() else None
                headings = documents[document]
                if headings is None or target not in headings:
                    broken.append(f"{name}:{number}: docs/{document}#{target}")
    assert broken == []
