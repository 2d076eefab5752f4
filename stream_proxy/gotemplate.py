"""Go text/template as Ollama's templates use it, read (never executed) for stream_proxy/template_bound.py.

The lexer keeps the byte size of literal text and the words of each action; the parser builds
the if / with / range / define / template tree. Trim markers and comments are dropped (trimming
only removes bytes, so sizes stay upper bounds). Whatever is not Go template syntax this reader
knows raises Unbounded.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final

import attrs


class Unbounded(Exception):
    """The template may print something this reader cannot bound."""


# --- the template's syntax ---------------------------------------------------------------------


@attrs.frozen
class Text:
    size: int


@attrs.frozen
class Action:
    words: tuple[str, ...]


_TOKEN: Final = re.compile(
    r"""\s*(?:
      (?P<str>"(?:[^"\\]|\\.)*"|`[^`]*`|'(?:[^'\\]|\\.)*')
     |(?P<op>:=|=|\||\(|\)|,)
     |(?P<word>[^\s|(),=:"`']+(?::(?!=)[^\s|(),=:"`']*)*)
    )""",
    re.VERBOSE,
)


def _words(action: str) -> tuple[str, ...]:
    words: list[str] = []
    at = 0
    action = action.strip()
    while at < len(action):
        match = _TOKEN.match(action, at)
        if match is None or match.end() == at:
            raise Unbounded(f"cannot read action {action[:40]!r}")
        words.append(match.group().strip())
        at = match.end()
        while at < len(action) and action[at].isspace():
            at += 1
    return tuple(words)


def lex(template: str) -> Iterator[Text | Action]:
    """Text and actions; trim markers and comments are dropped (trimming only removes bytes)."""
    if "{%" in template:
        raise Unbounded("a Jinja template (llama-server's own chat template)")
    at = 0
    while True:
        start = template.find("{{", at)
        if start < 0:
            yield Text(len(template[at:].encode("utf-8", "surrogatepass")))
            return
        yield Text(len(template[at:start].encode("utf-8", "surrogatepass")))
        inner_start = start + 2
        if template.startswith("- ", inner_start) or template.startswith("-\n", inner_start):
            inner_start += 1
        end = _action_end(template, inner_start)
        inner = template[inner_start:end]
        if inner.endswith(" -") or inner.endswith("\n-"):
            inner = inner[:-1]
        at = end + 2
        stripped = inner.strip()
        if stripped.startswith("/*"):
            if not stripped.endswith("*/"):
                raise Unbounded("unterminated comment")
            continue
        yield Action(_words(stripped))


def _action_end(template: str, at: int) -> int:
    """Where the action's `}}` is, quotes skipped."""
    quote = ""
    while at < len(template) - 1:
        char = template[at]
        if quote:
            if char == "\\" and quote != "`":
                at += 2
                continue
            if char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif template.startswith("/*", at):
            close = template.find("*/", at + 2)
            if close < 0:
                raise Unbounded("unterminated comment")
            at = close + 2
            continue
        elif template.startswith("}}", at):
            return at
        at += 1
    raise Unbounded("unterminated action")


# --- the tree ------------------------------------------------------------------------------------


@attrs.frozen
class Print:
    words: tuple[str, ...]


@attrs.frozen
class Branch:
    keyword: str  # if | with | range
    words: tuple[str, ...]
    body: tuple[Node, ...]
    otherwise: tuple[Node, ...]


@attrs.frozen
class Include:
    name: str
    words: tuple[str, ...]


@attrs.frozen
class Jump:
    """`break` or `continue`: skips what follows in the range body."""

    keyword: str


Node = Text | Print | Branch | Include | Jump


@attrs.define
class _Parser:
    items: list[Text | Action]
    at: int = 0
    defined: dict[str, tuple[Node, ...]] = attrs.field(factory=dict)

    def parse(self) -> tuple[Node, ...]:
        nodes, stop = self._list()
        if stop is not None:
            raise Unbounded(f"unexpected {stop[0]}")
        return nodes

    def _list(self) -> tuple[tuple[Node, ...], tuple[str, ...] | None]:
        nodes: list[Node] = []
        while self.at < len(self.items):
            item = self.items[self.at]
            self.at += 1
            if isinstance(item, Text):
                if item.size:
                    nodes.append(item)
                continue
            words = item.words
            if not words:
                raise Unbounded("empty action")
            head = words[0]
            if head in ("end", "else"):
                return tuple(nodes), words
            if head in ("if", "with", "range"):
                nodes.append(self._branch(head, words[1:]))
            elif head in ("define", "block"):
                name = literal(words[1]) if len(words) > 1 else None
                if name is None:
                    raise Unbounded(f"{head} without a name")
                body, stop = self._list()
                if stop is None or stop[0] != "end":
                    raise Unbounded(f"{head} without end")
                if name in self.defined or name == "":  # Go's rules for redefinitions differ
                    raise Unbounded(f"template {name!r} defined twice or replacing the root")
                self.defined[name] = body
                if head == "block":
                    nodes.append(Include(name, words[2:]))
            elif head == "template":
                name = literal(words[1]) if len(words) > 1 else None
                if name is None:
                    raise Unbounded("template without a name")
                nodes.append(Include(name, words[2:]))
            elif head in ("break", "continue"):
                nodes.append(Jump(head))
            else:
                nodes.append(Print(words))
        return tuple(nodes), None

    def _branch(self, keyword: str, words: tuple[str, ...]) -> Branch:
        body, stop = self._list()
        if stop is None:
            raise Unbounded(f"{keyword} without end")
        otherwise: tuple[Node, ...] = ()
        if stop[0] == "else":
            if len(stop) > 1:  # else if … / else with …: the rest is a branch ending at our end
                if stop[1] not in ("if", "with"):
                    raise Unbounded(f"else {stop[1]}")
                otherwise = (self._branch(stop[1], stop[2:]),)
            else:
                otherwise, stop = self._list()
                if stop is None or stop[0] != "end":
                    raise Unbounded(f"{keyword} … else without end")
        return Branch(keyword, words, body, otherwise)


def literal(word: str) -> str | None:
    if len(word) >= 2 and word[0] == word[-1] and word[0] in '"`':
        return _unquote(word)
    return None


_ESCAPES: Final = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "'": "'", "a": "\a", "b": "\b"}


def _unquote(word: str) -> str:
    if word[0] == "`":
        return word[1:-1]
    out: list[str] = []
    chars = iter(word[1:-1])
    for char in chars:
        if char == "\\":
            escaped = next(chars, "")
            if escaped not in _ESCAPES:
                raise Unbounded(f"escape \\{escaped} in {word[:20]!r}")
            out.append(_ESCAPES[escaped])
        else:
            out.append(char)
    return "".join(out)


def parse(template: str) -> tuple[tuple[Node, ...], dict[str, tuple[Node, ...]]]:
    parser = _Parser(list(lex(template)))
    nodes = parser.parse()
    return nodes, parser.defined


def identifiers(template: str) -> set[str]:
    """Lower-cased field and variable names, as Ollama's Template.Vars collects them."""
    names: set[str] = set()
    for item in lex(template):
        if isinstance(item, Action):
            for word in item.words:
                if word[:1] in (".", "$") and literal(word) is None:
                    # A field's names, or a variable's: `$messages` is "$messages", `$.Messages`
                    # is "$" and "Messages" (parse.VariableNode.Ident).
                    names.update(part.lower() for part in word.split(".") if part)
    return names
