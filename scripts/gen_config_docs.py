"""Regenerate the configuration table in README.md (between markers) and `.env.example`."""

from __future__ import annotations

import re
import sys

import localstack
from shared.config import all_variables

BEGIN, END = "<!-- config-table:begin -->", "<!-- config-table:end -->"


def table() -> str:
    """The Markdown table of every variable."""
    lines = ["| variable | default | secret | meaning |", "|---|---|---|---|"]
    for name, default, secret, text in all_variables():
        shown = "(required)" if default is None else (f"`{default}`" if default != "" else "(empty)")
        lines.append(f"| `{name}` | {shown} | {'yes' if secret else ''} | {text} |")
    return "\n".join(lines)


def env_example() -> str:
    """`.env.example`: every variable with its default, secrets and required ones empty."""
    out = [
        "# Every variable the gateway reads. Copy to .env and fill in the required ones.",
        '# Secrets: generate with  python3 -c "import secrets; print(secrets.token_urlsafe(32))"',
    ]
    for name, default, secret, text in all_variables():
        notes = (" (secret)" if secret else "") + (" (required)" if default is None else "")
        out += [f"# {text}{notes}", f"{name}={'' if default is None else default}"]
    return "\n".join(out) + "\n"


def main() -> int:
    """Rewrite both files in place."""
    readme = localstack.ROOT / "README.md"
    text = readme.read_text()
    block = f"{BEGIN}\n{table()}\n{END}"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        sys.stderr.write("README.md has no config-table markers\n")
        return 1
    readme.write_text(text)
    (localstack.ROOT / ".env.example").write_text(env_example())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
