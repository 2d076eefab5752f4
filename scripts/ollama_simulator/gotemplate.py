"""Go's text/template/parse for the subset Ollama's templates use: the parser and node tree.

It follows parse.go over golex.py's tokens (Go 1.19, the version scripts/template_fixtures
renders with):
text and actions with `{{-` / `-}}` trim markers, comments, if / else if / else, range
(with `$i, $v :=`, else, break, continue), with, variable declarations and assignments,
pipelines, field chains, parenthesized pipelines and string, number, bool and nil
literals. `define`, `template` and `block` are refused with a TemplateError rather than
half supported. Errors read like Go's (`template: :1: function "foo" not defined`).
Executing a tree is goexec's job.
"""

from __future__ import annotations

from typing import Final

import attrs

from ollama_simulator.golex import Token, go_quote, lex


class TemplateError(Exception):
    """A template Go would refuse to parse or fail to execute; the message is Go's."""


# --------------------------------------------------------------------------- nodes


@attrs.frozen
class TextNode:
    pos: int
    text: str


@attrs.frozen
class CommentNode:
    pos: int
    text: str


@attrs.frozen
class DotNode:
    pos: int

    def __str__(self) -> str:
        return "."


@attrs.frozen
class NilNode:
    pos: int

    def __str__(self) -> str:
        return "nil"


@attrs.frozen
class BoolNode:
    pos: int
    value: bool

    def __str__(self) -> str:
        return "true" if self.value else "false"


@attrs.frozen
class NumberNode:
    pos: int
    text: str
    value: int | float

    def __str__(self) -> str:
        return self.text


@attrs.frozen
class StringNode:
    pos: int
    quoted: str
    text: str

    def __str__(self) -> str:
        return self.quoted


@attrs.frozen
class FieldNode:
    pos: int
    ident: tuple[str, ...]

    def __str__(self) -> str:
        return "".join("." + name for name in self.ident)


@attrs.frozen
class VariableNode:
    pos: int
    ident: tuple[str, ...]

    def __str__(self) -> str:
        return ".".join(self.ident)


@attrs.frozen
class IdentifierNode:
    pos: int
    ident: str

    def __str__(self) -> str:
        return self.ident


@attrs.frozen
class ChainNode:
    pos: int
    node: Node
    field: tuple[str, ...]

    def __str__(self) -> str:
        inner = f"({self.node})" if isinstance(self.node, PipeNode) else str(self.node)
        return inner + "".join("." + name for name in self.field)


@attrs.frozen
class CommandNode:
    pos: int
    args: tuple[Node, ...]

    def __str__(self) -> str:
        return " ".join(f"({arg})" if isinstance(arg, PipeNode) else str(arg) for arg in self.args)


@attrs.frozen
class PipeNode:
    pos: int
    line: int
    is_assign: bool
    decl: tuple[VariableNode, ...]
    cmds: tuple[CommandNode, ...]

    def __str__(self) -> str:
        head = ""
        if self.decl:
            head = ", ".join(str(v) for v in self.decl) + (" = " if self.is_assign else " := ")
        return head + " | ".join(str(cmd) for cmd in self.cmds)


@attrs.frozen
class ActionNode:
    pos: int
    line: int
    pipe: PipeNode

    def __str__(self) -> str:
        return f"{{{{{self.pipe}}}}}"


@attrs.frozen
class ListNode:
    pos: int
    nodes: tuple[Node, ...]


@attrs.frozen
class BranchNode:
    """An if, range or with: `kind` says which."""

    kind: str
    pos: int
    line: int
    pipe: PipeNode
    list: ListNode
    else_list: ListNode | None

    def __str__(self) -> str:
        return f"{{{{{self.kind} {self.pipe}}}}}"


@attrs.frozen
class BreakNode:
    pos: int
    line: int

    def __str__(self) -> str:
        return "{{break}}"


@attrs.frozen
class ContinueNode:
    pos: int
    line: int

    def __str__(self) -> str:
        return "{{continue}}"


Node = (
    TextNode
    | CommentNode
    | DotNode
    | NilNode
    | BoolNode
    | NumberNode
    | StringNode
    | FieldNode
    | VariableNode
    | IdentifierNode
    | ChainNode
    | CommandNode
    | PipeNode
    | ActionNode
    | ListNode
    | BranchNode
    | BreakNode
    | ContinueNode
)


# --------------------------------------------------------------------------- parser


_GO_ESCAPES: Final = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def unquote(quoted: str) -> str:
    """strconv.Unquote of a template string literal (double quotes or backquotes)."""
    if quoted.startswith("`"):
        return quoted[1:-1].replace("\r", "")
    body = quoted[1:-1]
    out: list[str] = []
    index = 0
    while index < len(body):
        char = body[index]
        if char != "\\":
            out.append(char)
            index += 1
            continue
        escape = body[index + 1 : index + 2]
        if escape in _GO_ESCAPES:
            out.append(_GO_ESCAPES[escape])
            index += 2
        elif escape in ('"', "\\", "'"):
            if escape == "'":
                raise TemplateError("invalid syntax")
            out.append(escape)
            index += 2
        elif escape in ("x", "u", "U"):
            size = {"x": 2, "u": 4, "U": 8}[escape]
            digits = body[index + 2 : index + 2 + size]
            if len(digits) != size or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise TemplateError("invalid syntax")
            code = int(digits, 16)
            if escape == "x" and code >= 0x80:
                raise TemplateError("byte escapes above \\x7f are not supported")
            out.append(chr(code))
            index += 2 + size
        elif escape in "01234567" and escape:
            digits = body[index + 1 : index + 4]
            if len(digits) != 3 or not all(c in "01234567" for c in digits):
                raise TemplateError("invalid syntax")
            if int(digits, 8) >= 0x80:
                raise TemplateError("byte escapes above \\x7f are not supported")
            out.append(chr(int(digits, 8)))
            index += 4
        else:
            raise TemplateError("invalid syntax")
    return "".join(out)


def _number(token: Token) -> int | float:
    text = token.value
    if token.kind == "charconstant":
        body = unquote('"' + text[1:-1].replace('"', '\\"') + '"')
        if len(body) != 1:
            raise TemplateError(f"malformed character constant: {text}")
        return ord(body)
    if text.endswith("i"):
        raise TemplateError(f"complex constants are not supported: {text}")
    clean = text.replace("_", "")
    try:
        if (
            clean.lower().lstrip("+-").startswith(("0x", "0o", "0b"))
            and "." not in clean
            and "p" not in clean.lower()
        ):
            return int(clean, 0)
        if any(c in clean for c in ".eE") or "p" in clean.lower():
            return float(clean) if "p" not in clean.lower() else float.fromhex(clean)
        return int(clean, 10)
    except ValueError:
        raise TemplateError(f"illegal number syntax: {go_quote(text)}") from None


@attrs.define
class Tree:
    """A parsed template: the root list and the source (for error locations)."""

    text: str
    root: ListNode

    def location(self, pos: int) -> str:
        """ErrorContext's location: ":line:column" (column a 0-based byte offset)."""
        before = self.text[:pos]
        newline = before.rfind("\n")
        column = before[newline + 1 :] if newline >= 0 else before
        return f":{1 + before.count(chr(10))}:{len(column.encode('utf-8', 'surrogatepass'))}"


class _Parser:
    """parse.go's Tree methods over the token list (look-ahead and backing up by index)."""

    def __init__(self, text: str, functions: frozenset[str]) -> None:
        self.text = text
        self.tokens = lex(text)
        self.index = 0
        self.functions = functions
        self.vars: list[str] = ["$"]
        self.range_depth = 0
        self.last = self.tokens[0]

    def line(self, token: Token) -> int:
        return 1 + self.text.count("\n", 0, token.pos)

    def error(self, message: str) -> TemplateError:
        return TemplateError(f"template: :{self.line(self.last)}: {message}")

    def next(self) -> Token:
        token = self.tokens[min(self.index, len(self.tokens) - 1)]
        self.index += 1
        self.last = token
        return token

    def backup(self) -> None:
        self.index -= 1

    def peek(self) -> Token:
        return self.tokens[min(self.index, len(self.tokens) - 1)]

    def next_non_space(self) -> Token:
        token = self.next()
        while token.kind == "space":
            token = self.next()
        return token

    def peek_non_space(self) -> Token:
        token = self.next_non_space()
        self.backup()
        return token

    def unexpected(self, token: Token, context: str) -> TemplateError:
        if token.kind == "error":
            return self.error(token.value)
        return self.error(f"unexpected {token.describe()} in {context}")

    def parse(self) -> ListNode:
        nodes: list[Node] = []
        start = self.peek().pos
        while self.peek().kind != "eof":
            if self.peek().kind == "error":
                raise self.unexpected(self.next(), "input")
            node = self.text_or_action()
            if isinstance(node, _End | _Else):
                raise self.error(f"unexpected {node}")
            nodes.append(node)
        return ListNode(start, tuple(nodes))

    def text_or_action(self) -> Node | _End | _Else:
        token = self.next_non_space()
        if token.kind == "text":
            return TextNode(token.pos, token.value)
        if token.kind == "comment":
            return CommentNode(token.pos, token.value)
        if token.kind == "left":
            return self.action()
        raise self.unexpected(token, "input")

    def action(self) -> Node | _End | _Else:
        token = self.next_non_space()
        if token.kind == "keyword":
            word = token.value
            if word in ("break", "continue"):
                closing = self.next_non_space()
                if closing.kind != "right":
                    raise self.unexpected(closing, f"{{{{{word}}}}}")
                if self.range_depth == 0:
                    raise self.error(f"{{{{{word}}}}} outside {{{{range}}}}")
                line = self.line(token)
                return BreakNode(token.pos, line) if word == "break" else ContinueNode(token.pos, line)
            if word == "else":
                peek = self.peek_non_space()
                if peek.kind == "keyword" and peek.value == "if":
                    return _Else(peek.pos)
                closing = self.next_non_space()
                if closing.kind != "right":
                    raise self.unexpected(closing, "else")
                return _Else(closing.pos)
            if word == "end":
                closing = self.next_non_space()
                if closing.kind != "right":
                    raise self.unexpected(closing, "end")
                return _End(closing.pos)
            if word in ("if", "range", "with"):
                return self.control(word)
            raise self.error(f"{{{{{word}}}}} is not supported by the simulator's template engine")
        self.backup()
        first = self.peek()
        return ActionNode(first.pos, self.line(first), self.pipeline("command", "right"))

    def control(self, kind: str) -> BranchNode:
        mark = len(self.vars)
        try:
            pipe = self.pipeline(kind, "right")
            if kind == "range":
                self.range_depth += 1
            body, terminator = self.item_list()
            if kind == "range":
                self.range_depth -= 1
            else_list: ListNode | None = None
            if isinstance(terminator, _Else):
                peek = self.peek()
                if kind == "if" and peek.kind == "keyword" and peek.value == "if":
                    self.next()
                    nested = self.control("if")
                    else_list = ListNode(terminator.pos, (nested,))
                else:
                    else_list, terminator = self.item_list()
                    if not isinstance(terminator, _End):
                        raise self.error(f"expected end; found {terminator}")
            return BranchNode(kind, pipe.pos, pipe.line, pipe, body, else_list)
        finally:
            del self.vars[mark:]

    def item_list(self) -> tuple[ListNode, _End | _Else]:
        start = self.peek_non_space().pos
        nodes: list[Node] = []
        while self.peek_non_space().kind != "eof":
            node = self.text_or_action()
            if isinstance(node, _End | _Else):
                return ListNode(start, tuple(nodes)), node
            nodes.append(node)
        self.next_non_space()
        raise self.error("unexpected EOF")

    def pipeline(self, context: str, end: str) -> PipeNode:
        start = self.peek_non_space()
        decl: list[VariableNode] = []
        is_assign = False
        while True:
            saved = self.index
            variable = self.next_non_space()
            if variable.kind != "variable":
                self.index = saved
                break
            following = self.peek_non_space()
            if following.kind in ("assign", "declare"):
                is_assign = following.kind == "assign"
                self.next_non_space()
                decl.append(VariableNode(variable.pos, (variable.value,)))
                self.vars.append(variable.value)
                break
            if following.kind == "char" and following.value == ",":
                self.next_non_space()
                decl.append(VariableNode(variable.pos, (variable.value,)))
                self.vars.append(variable.value)
                if context == "range" and len(decl) < 2:
                    if self.peek_non_space().kind in ("variable", "right", "rparen"):
                        continue
                    raise self.error("range can only initialize variables")
                raise self.error(f"too many declarations in {context}")
            self.index = saved
            break
        cmds: list[CommandNode] = []
        while True:
            token = self.next_non_space()
            if token.kind == end:
                if not cmds:
                    raise self.error(f"missing value for {context}")
                for index, cmd in enumerate(cmds[1:], start=2):
                    if isinstance(cmd.args[0], BoolNode | DotNode | NilNode | NumberNode | StringNode):
                        raise self.error(f"non executable command in pipeline stage {index}")
                return PipeNode(start.pos, self.line(start), is_assign, tuple(decl), tuple(cmds))
            if token.kind in _OPERAND_START:
                self.backup()
                cmds.append(self.command())
            else:
                raise self.unexpected(token, context)

    def command(self) -> CommandNode:
        start = self.peek_non_space().pos
        args: list[Node] = []
        while True:
            self.peek_non_space()
            operand = self.operand()
            if operand is not None:
                args.append(operand)
            token = self.next()
            if token.kind == "space":
                continue
            if token.kind in ("right", "rparen"):
                self.backup()
            elif token.kind != "pipe":
                raise self.unexpected(token, "operand")
            break
        if not args:
            raise self.error("empty command")
        return CommandNode(start, tuple(args))

    def operand(self) -> Node | None:
        node = self.term()
        if node is None:
            return None
        if self.peek().kind == "field":
            start = self.peek().pos
            fields: list[str] = []
            while self.peek().kind == "field":
                fields.append(self.next().value[1:])
            # parse.go gives the merged node the chain's position: the first added field's.
            if isinstance(node, FieldNode):
                return FieldNode(start, (*node.ident, *fields))
            if isinstance(node, VariableNode):
                return VariableNode(start, (*node.ident, *fields))
            if isinstance(node, BoolNode | StringNode | NumberNode | NilNode | DotNode):
                raise self.error(f"unexpected . after term {go_quote(str(node))}")
            return ChainNode(start, node, tuple(fields))
        return node

    def term(self) -> Node | None:
        token = self.next_non_space()
        kind = token.kind
        if kind == "identifier":
            if token.value not in self.functions:
                raise self.error(f"function {go_quote(token.value)} not defined")
            return IdentifierNode(token.pos, token.value)
        if kind == "dot":
            return DotNode(token.pos)
        if kind == "nil":
            return NilNode(token.pos)
        if kind == "variable":
            name = token.value
            if name not in self.vars:
                raise self.error(f"undefined variable {go_quote(name)}")
            return VariableNode(token.pos, (name,))
        if kind == "field":
            return FieldNode(token.pos, tuple(token.value[1:].split(".")))
        if kind == "bool":
            return BoolNode(token.pos, token.value == "true")
        if kind in ("number", "charconstant"):
            try:
                return NumberNode(token.pos, token.value, _number(token))
            except TemplateError as e:
                raise self.error(str(e)) from None
        if kind == "lparen":
            return self.pipeline("parenthesized pipeline", "rparen")
        if kind in ("string", "rawstring"):
            try:
                return StringNode(token.pos, token.value, unquote(token.value))
            except TemplateError as e:
                raise self.error(str(e)) from None
        self.backup()
        return None


_OPERAND_START: Final = frozenset(
    {
        "bool",
        "charconstant",
        "dot",
        "field",
        "identifier",
        "number",
        "nil",
        "rawstring",
        "string",
        "variable",
        "lparen",
    }
)


@attrs.frozen
class _End:
    pos: int

    def __str__(self) -> str:
        return "{{end}}"


@attrs.frozen
class _Else:
    pos: int

    def __str__(self) -> str:
        return "{{else}}"


def parse(text: str, functions: frozenset[str]) -> Tree:
    """Parse like template.New("").Funcs(...).Parse(text); `functions` are the defined names."""
    return Tree(text, _Parser(text, functions).parse())
