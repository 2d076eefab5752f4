"""Go's text/template/parse/lex.go: the template text as tokens, trim markers applied.

Text runs (with the space before a `{{- ` or after a ` -}}` trimmed away), comments,
delimiters and the items of an action: spaces, fields, variables, identifiers, keywords,
strings, numbers and punctuation. A lexing error becomes an "error" token the parser reports
when it reaches it, as Go's concurrent lexer does.
"""

from __future__ import annotations

import re
from typing import Final

import attrs


@attrs.frozen
class Token:
    """One lexed item: its kind, its text and where it starts in the template."""

    kind: str  # text, comment, left, right, space, field, variable, identifier, ...
    value: str
    pos: int

    def describe(self) -> str:
        """item.String() as parse errors quote it."""
        if self.kind == "eof":
            return "EOF"
        if self.kind == "error":
            return self.value
        if self.kind == "keyword":
            return f"<{self.value}>"
        text = go_quote(self.value)
        if len(self.value) > 10:
            return go_quote(self.value[:10]) + "..."
        return text


def go_quote(text: str) -> str:
    """%q of a short token value, as parse errors quote it."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_SPACE: Final = " \t\r\n"
_KEYWORDS: Final = frozenset(
    {"block", "break", "continue", "define", "else", "end", "if", "range", "nil", "template", "with"}
)
_NUMBER_RE: Final = re.compile(
    r"[+-]?(?:0[xX][0-9a-fA-F_]*(?:\.[0-9a-fA-F_]*)?(?:[pP][+-]?[0-9_]*)?"
    r"|0[oO][0-7_]*|0[bB][01_]*"
    r"|[0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9_]*)?)i?"
)


def _alnum(char: str) -> bool:
    """isAlphaNumeric: "_", a letter (unicode.IsLetter) or a decimal digit (unicode.IsDigit)."""
    return char == "_" or char.isalpha() or char.isdecimal()


class _Lexer:
    """lex.go's state machine, run eagerly: a token list ending in eof or an error token."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.tokens: list[Token] = []
        self.paren_depth = 0

    def emit(self, kind: str, start: int, end: int) -> None:
        self.tokens.append(Token(kind, self.text[start:end], start))

    def error(self, message: str) -> None:
        self.tokens.append(Token("error", message, self.pos))

    def run(self) -> list[Token]:
        while self.lex_text():
            if not self.lex_action():
                break
        return self.tokens

    def lex_text(self) -> bool:
        """Text up to the next "{{" (trailing space trimmed for "{{- "); False at the end."""
        text = self.text
        start = self.pos
        found = text.find("{{", start)
        if found < 0:
            if len(text) > start:
                self.emit("text", start, len(text))
            self.tokens.append(Token("eof", "", len(text)))
            return False
        end = found
        if _left_trim(text, found + 2):
            end = len(text[start:found].rstrip(_SPACE)) + start
        if end > start:
            self.emit("text", start, end)
        self.pos = found
        return True

    def at_right(self) -> tuple[bool, bool]:
        text, pos = self.text, self.pos
        if _right_trim(text, pos) and text.startswith("}}", pos + 2):
            return True, True
        return text.startswith("}}", pos), False

    def skip_after_right(self, trim: bool) -> None:
        self.pos += 2
        if trim:
            rest = self.text[self.pos :]
            self.pos += len(rest) - len(rest.lstrip(_SPACE))

    def lex_action(self) -> bool:
        text = self.text
        start = self.pos
        self.pos += 2
        trim = _left_trim(text, self.pos)
        after = self.pos + (2 if trim else 0)
        if text.startswith("/*", after):
            return self.lex_comment(after)
        self.tokens.append(Token("left", "{{", start))
        self.pos = after
        self.paren_depth = 0
        return self.lex_inside()

    def lex_comment(self, start: int) -> bool:
        end = self.text.find("*/", start + 2)
        if end < 0:
            self.error("unclosed comment")
            return False
        self.pos = end + 2
        delim, trim = self.at_right()
        if not delim:
            self.error("comment ends before closing delimiter")
            return False
        self.tokens.append(Token("comment", self.text[start : self.pos], start))
        if trim:
            self.pos += 2
        self.skip_after_right(trim)
        return True

    def lex_inside(self) -> bool:
        text = self.text
        while True:
            delim, trim = self.at_right()
            if delim:
                if self.paren_depth:
                    self.error("unclosed left paren")
                    return False
                if trim:
                    self.pos += 2
                self.tokens.append(Token("right", "}}", self.pos))
                self.skip_after_right(trim)
                return True
            if self.pos >= len(text):
                self.error("unclosed action")
                return False
            char = text[self.pos]
            start = self.pos
            if char in _SPACE:
                self.lex_space()
                continue
            if char == "=":
                self.pos += 1
                self.emit("assign", start, self.pos)
            elif char == ":":
                if not text.startswith(":=", start):
                    self.pos += 1
                    self.error("expected :=")
                    return False
                self.pos += 2
                self.emit("declare", start, self.pos)
            elif char == "|":
                self.pos += 1
                self.emit("pipe", start, self.pos)
            elif char == '"':
                if not self.lex_quote():
                    return False
            elif char == "`":
                end = text.find("`", start + 1)
                if end < 0:
                    self.error("unterminated raw quoted string")
                    return False
                self.pos = end + 1
                self.emit("rawstring", start, self.pos)
            elif char == "'":
                if not self.lex_char():
                    return False
            elif char == "$":
                if not self.lex_field_or_variable("variable"):
                    return False
            elif char == "." and not text[start + 1 : start + 2].isdigit():
                if not self.lex_field_or_variable("field"):
                    return False
            elif char in "+-." or char.isdigit():
                if not self.lex_number():
                    return False
            elif _alnum(char):
                if not self.lex_identifier():
                    return False
            elif char == "(":
                self.pos += 1
                self.emit("lparen", start, self.pos)
                self.paren_depth += 1
            elif char == ")":
                self.pos += 1
                self.emit("rparen", start, self.pos)
                self.paren_depth -= 1
                if self.paren_depth < 0:
                    self.error("unexpected right paren U+0029 ')'")
                    return False
            elif ord(char) < 0x80 and char.isprintable():
                self.pos += 1
                self.emit("char", start, self.pos)
            else:
                self.pos += 1
                self.error(f"unrecognized character in action: U+{ord(char):04X}")
                return False

    def lex_space(self) -> None:
        text = self.text
        start = self.pos
        while self.pos < len(text) and text[self.pos] in _SPACE:
            self.pos += 1
        if _right_trim(text, self.pos - 1) and text.startswith("}}", self.pos + 1):
            self.pos -= 1
            if self.pos == start:
                return
        self.emit("space", start, self.pos)

    def at_terminator(self) -> bool:
        text, pos = self.text, self.pos
        if pos >= len(text):
            return True
        return text[pos] in _SPACE or text[pos] in ".,|:)(" or text.startswith("}}", pos)

    def lex_field_or_variable(self, kind: str) -> bool:
        start = self.pos
        self.pos += 1
        if self.at_terminator():
            self.emit("variable" if kind == "variable" else "dot", start, self.pos)
            return True
        while self.pos < len(self.text) and _alnum(self.text[self.pos]):
            self.pos += 1
        if not self.at_terminator():
            self.error(f"bad character U+{ord(self.text[self.pos]):04X} {self.text[self.pos]!r}")
            return False
        self.emit(kind, start, self.pos)
        return True

    def lex_identifier(self) -> bool:
        start = self.pos
        while self.pos < len(self.text) and _alnum(self.text[self.pos]):
            self.pos += 1
        if not self.at_terminator():
            self.error(f"bad character U+{ord(self.text[self.pos]):04X} {self.text[self.pos]!r}")
            return False
        word = self.text[start : self.pos]
        if word in _KEYWORDS:
            self.emit("nil" if word == "nil" else "keyword", start, self.pos)
        elif word in ("true", "false"):
            self.emit("bool", start, self.pos)
        else:
            self.emit("identifier", start, self.pos)
        return True

    def lex_number(self) -> bool:
        start = self.pos
        match = _NUMBER_RE.match(self.text, start)
        end = match.end() if match else start
        if end < len(self.text) and _alnum(self.text[end]):
            self.pos = end + 1
            self.error(f"bad number syntax: {go_quote(self.text[start : self.pos])}")
            return False
        self.pos = end
        self.emit("number", start, end)
        return True

    def lex_quote(self) -> bool:
        text = self.text
        start = self.pos
        index = start + 1
        while True:
            if index >= len(text) or text[index] == "\n":
                self.pos = index
                self.error("unterminated quoted string")
                return False
            if text[index] == "\\":
                index += 2
                continue
            if text[index] == '"':
                break
            index += 1
        self.pos = index + 1
        self.emit("string", start, self.pos)
        return True

    def lex_char(self) -> bool:
        text = self.text
        start = self.pos
        index = start + 1
        while True:
            if index >= len(text) or text[index] == "\n":
                self.pos = index
                self.error("unterminated character constant")
                return False
            if text[index] == "\\":
                index += 2
                continue
            if text[index] == "'":
                break
            index += 1
        self.pos = index + 1
        self.emit("charconstant", start, self.pos)
        return True


def _left_trim(text: str, pos: int) -> bool:
    return text[pos : pos + 1] == "-" and text[pos + 1 : pos + 2] in tuple(_SPACE)


def _right_trim(text: str, pos: int) -> bool:
    return text[pos : pos + 1] in tuple(_SPACE) and text[pos + 1 : pos + 2] == "-"


def lex(text: str) -> list[Token]:
    """The tokens of a template, ending with an "eof" or an "error" token."""
    return _Lexer(text).run()
