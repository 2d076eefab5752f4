"""Go's text/template/exec for the trees gotemplate parses, with missingkey=zero.

It follows exec.go and funcs.go (Go 1.19): the variable stack ($ first, declarations pushed
per scope, `=` assigning the nearest), field chains over structs and maps (a missing map key
is the element type's zero value; a pipeline step turns a nil interface into "no value"),
method calls (String), if/with/range with Go's truth, break and continue, and the builtins
and / or (short-circuit, returning an operand), not, eq / ne / lt / le / gt / ge (Go's basic
kinds, "incompatible types for comparison"), len, index, slice, print, printf and println.
Functions take their arguments as Go does: reflect.Value builtins see a missing value as an
error, `any` parameters see it as nil. Errors read like Go's
(`template: :1:3: executing "" at <.Foo>: can't evaluate field Foo in type string`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal

import attrs

from ollama_simulator.gofmt import GoUnsupported, fprint, sprint, sprintf, sprintln
from ollama_simulator.gotemplate import (
    ActionNode,
    BoolNode,
    BranchNode,
    BreakNode,
    ChainNode,
    CommandNode,
    CommentNode,
    ContinueNode,
    DotNode,
    FieldNode,
    IdentifierNode,
    ListNode,
    NilNode,
    Node,
    NumberNode,
    PipeNode,
    StringNode,
    TemplateError,
    TextNode,
    Tree,
    VariableNode,
)
from ollama_simulator.govalues import (
    MISSING,
    Bytes,
    GoMap,
    GoSlice,
    GoStruct,
    Stringer,
    Uint8,
    go_len,
    is_true,
    kind,
    map_items,
    map_lookup,
    slice_items,
    type_name,
)

Param = Literal["value", "any", "string"]


class CallError(Exception):
    """A function returned an error (exec wraps it as "error calling <name>: ...")."""


@attrs.frozen
class Function:
    """A template function: its parameter kinds (the last repeats when variadic) and body."""

    params: tuple[Param, ...]
    variadic: bool
    call: Callable[..., Any]


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


def _indirect_interface(value: Any) -> Any:
    return MISSING if value is None else value


_BASIC: Final = {"bool": "bool", "int": "int", "uint8": "uint", "float64": "float", "string": "string"}


def _basic_kind(value: Any) -> str | None:
    return _BASIC.get(kind(value))


def _eq(arg1: Any, *args: Any) -> bool:
    arg1 = _indirect_interface(arg1)
    if arg1 is not MISSING and kind(arg1) in ("slice", "map"):
        raise CallError(f"uncomparable type {type_name(arg1)}: {fprint(arg1)}")
    if not args:
        raise CallError("missing argument for comparison")
    k1 = _basic_kind(arg1)
    for raw in args:
        arg = _indirect_interface(raw)
        k2 = _basic_kind(arg)
        truth = False
        if k1 != k2:
            if {k1, k2} == {"int", "uint"}:
                truth = int(arg1) == int(arg)
            elif arg1 is not MISSING and arg is not MISSING:
                raise CallError("incompatible types for comparison")
        elif k1 is not None:
            truth = arg1 == arg
        elif arg is MISSING or arg1 is MISSING:
            truth = arg1 is arg
        else:
            if kind(arg) in ("slice", "map"):
                raise CallError(f"uncomparable type {type_name(arg)}: {fprint(arg)}")
            truth = arg1 is arg or (type(arg1) is type(arg) and arg1 == arg)
        if truth:
            return True
    return False


def _lt(arg1: Any, arg2: Any) -> bool:
    arg1, arg2 = _indirect_interface(arg1), _indirect_interface(arg2)
    k1, k2 = _basic_kind(arg1), _basic_kind(arg2)
    if k1 is None or k2 is None:
        raise CallError("invalid type for comparison")
    if k1 != k2:
        if {k1, k2} == {"int", "uint"}:
            return int(arg1) < int(arg2)
        raise CallError("incompatible types for comparison")
    if k1 == "bool":
        raise CallError("invalid type for comparison")
    if k1 == "string":
        return bool(arg1.encode("utf-8", "surrogatepass") < arg2.encode("utf-8", "surrogatepass"))
    return bool(arg1 < arg2)


def _le(arg1: Any, arg2: Any) -> bool:
    return _lt(arg1, arg2) or _eq(arg1, arg2)


def _gt(arg1: Any, arg2: Any) -> bool:
    return not _le(arg1, arg2)


def _ge(arg1: Any, arg2: Any) -> bool:
    return not _lt(arg1, arg2)


def _ne(arg1: Any, arg2: Any) -> bool:
    return not _eq(arg1, arg2)


def _not(arg: Any) -> bool:
    return not is_true(_indirect_interface(arg))


def _length(item: Any) -> int:
    if item is None:
        raise CallError("len of nil pointer")
    if kind(item) in ("slice", "map", "string"):
        return go_len(item)
    raise CallError(f"len of type {type_name(item)}")


def _index_arg(index: Any, cap: int) -> int:
    index = _indirect_interface(index)
    if index is MISSING:
        raise CallError("cannot index slice/array with nil")
    if kind(index) not in ("int", "uint8"):
        raise CallError(f"cannot index slice/array with type {type_name(index)}")
    if index < 0 or index > cap:
        raise CallError(f"index out of range: {index}")
    return int(index)


def _index(item: Any, *indexes: Any) -> Any:
    item = _indirect_interface(item)
    if item is MISSING:
        raise CallError("index of untyped nil")
    for raw in indexes:
        index = _indirect_interface(raw)
        if item is None or item is MISSING:
            raise CallError("index of nil pointer")
        match kind(item):
            case "slice" | "string":
                position = _index_arg(index, go_len(item))
                if position == go_len(item):
                    raise CallError("reflect: slice index out of range")
                if isinstance(item, str):
                    item = Uint8(item.encode("utf-8", "surrogatepass")[position])
                else:
                    item = slice_items(item)[position]
            case "map":
                if index is MISSING:
                    raise CallError("value is nil; should be of type string")
                if not isinstance(index, str):
                    raise CallError(f"value has type {type_name(index)}; should be string")
                item = map_lookup(item, index)
            case _:
                raise CallError(f"can't index item of type {type_name(item)}")
    return item


def _slice(item: Any, *indexes: Any) -> Any:
    item = _indirect_interface(item)
    if item is MISSING:
        raise CallError("slice of untyped nil")
    if len(indexes) > 3:
        raise CallError(f"too many slice indexes: {len(indexes)}")
    match kind(item):
        case "string":
            if len(indexes) == 3:
                raise CallError("cannot 3-index slice a string")
        case "slice":
            pass
        case _:
            raise CallError(f"can't slice item of type {type_name(item)}")
    size = go_len(item)
    bounds = [0, size, size]
    for position, index in enumerate(indexes):
        bounds[position] = _index_arg(index, size)
    if bounds[0] > bounds[1]:
        raise CallError(f"invalid slice index: {bounds[0]} > {bounds[1]}")
    if len(indexes) == 3 and bounds[1] > bounds[2]:
        raise CallError(f"invalid slice index: {bounds[1]} > {bounds[2]}")
    low, high = bounds[0], bounds[1]
    if isinstance(item, str):
        data = item.encode("utf-8", "surrogatepass")[low:high]
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise GoUnsupported("slicing a string inside a UTF-8 sequence") from None
    if isinstance(item, GoSlice):
        return GoSlice(item.go_type, slice_items(item)[low:high])
    if isinstance(item, Bytes):
        return Bytes(item.go_type, item.data[low:high])
    return list(slice_items(item)[low:high])


def _unsupported(name: str) -> Callable[..., Any]:
    def call(*_args: Any) -> Any:
        raise GoUnsupported(f"the {name} function")

    return call


BUILTINS: Final[Mapping[str, Function]] = {
    "and": Function(("value", "value"), True, lambda *_: None),  # evaluated lazily by _call
    "or": Function(("value", "value"), True, lambda *_: None),
    "not": Function(("value",), False, _not),
    "len": Function(("value",), False, _length),
    "index": Function(("value", "value"), True, _index),
    "slice": Function(("value", "value"), True, _slice),
    "eq": Function(("value", "value"), True, _eq),
    "ne": Function(("value", "value"), False, _ne),
    "lt": Function(("value", "value"), False, _lt),
    "le": Function(("value", "value"), False, _le),
    "gt": Function(("value", "value"), False, _gt),
    "ge": Function(("value", "value"), False, _ge),
    "print": Function(("any",), True, sprint),
    "printf": Function(("string", "any"), True, sprintf),
    "println": Function(("any",), True, sprintln),
    "call": Function(("value", "value"), True, _unsupported("call")),
    "html": Function(("any",), True, _unsupported("html")),
    "js": Function(("any",), True, _unsupported("js")),
    "urlquery": Function(("any",), True, _unsupported("urlquery")),
}


def _method(receiver: Any, name: str) -> Callable[[], Any] | None:
    """A method of the receiver's method set that templates can call without arguments."""
    if name == "String" and isinstance(receiver, Stringer):
        return receiver.go_string
    method = getattr(receiver, "go_methods", None)
    if method is None:
        return None
    found: Callable[[], Any] | None = method().get(name)
    return found


@attrs.define
class _State:
    tree: Tree
    functions: Mapping[str, Function]
    zero_missing: bool
    root: Any
    out: list[str] = attrs.field(factory=list)
    vars: list[tuple[str, Any]] = attrs.field(factory=list)
    node: Node | None = None

    def error(self, message: str) -> TemplateError:
        if self.node is None:
            return TemplateError(f"template: : {message}")
        context = str(self.node)
        if len(context) > 20:
            context = context[:20] + "..."
        location = self.tree.location(self.node.pos)
        return TemplateError(f'template: {location}: executing "" at <{context}>: {message}')

    # ----------------------------------------------------------------- variables

    def push(self, name: str, value: Any) -> None:
        self.vars.append((name, value))

    def set_var(self, name: str, value: Any) -> None:
        for index in range(len(self.vars) - 1, -1, -1):
            if self.vars[index][0] == name:
                self.vars[index] = (name, value)
                return
        raise self.error(f"undefined variable: {name}")

    def set_top_var(self, depth: int, value: Any) -> None:
        name = self.vars[-depth][0]
        self.vars[-depth] = (name, value)

    def var_value(self, name: str) -> Any:
        for stored, value in reversed(self.vars):
            if stored == name:
                return value
        raise self.error(f"undefined variable: {name}")

    # ----------------------------------------------------------------- walking

    def walk(self, dot: Any, node: Node) -> None:
        self.node = node
        if isinstance(node, ActionNode):
            value = self.eval_pipeline(dot, node.pipe)
            if not node.pipe.decl:
                self.print(node, value)
        elif isinstance(node, TextNode):
            self.out.append(node.text)
        elif isinstance(node, ListNode):
            for child in node.nodes:
                self.walk(dot, child)
        elif isinstance(node, BranchNode):
            if node.kind == "range":
                self.walk_range(dot, node)
            else:
                self.walk_if_or_with(dot, node)
        elif isinstance(node, BreakNode):
            raise _Break
        elif isinstance(node, ContinueNode):
            raise _Continue
        elif not isinstance(node, CommentNode):
            raise self.error(f"unknown node: {node}")

    def print(self, node: Node, value: Any) -> None:
        self.node = node
        if value is MISSING:
            self.out.append("<no value>")
            return
        try:
            self.out.append(fprint(value))
        except GoUnsupported as e:
            raise self.error(f"the simulator cannot print this value ({e})") from None

    def walk_if_or_with(self, dot: Any, node: BranchNode) -> None:
        mark = len(self.vars)
        try:
            value = self.eval_pipeline(dot, node.pipe)
            if is_true(_indirect_interface(value)):
                self.walk(value if node.kind == "with" else dot, node.list)
            elif node.else_list is not None:
                self.walk(dot, node.else_list)
        finally:
            del self.vars[mark:]

    def walk_range(self, dot: Any, node: BranchNode) -> None:
        self.node = node
        mark = len(self.vars)
        try:
            value = self.eval_pipeline(dot, node.pipe)
            inner = len(self.vars)
            match kind(value):
                case "slice":
                    pairs: Sequence[tuple[Any, Any]] = list(enumerate(slice_items(value)))
                case "map":
                    pairs = map_items(value)
                case "invalid":
                    pairs = []
                case "int":
                    raise self.error("range over an integer needs Go 1.22 (the fixtures render with 1.19)")
                case _:
                    raise self.error(f"range can't iterate over {fprint(value)}")
            for key, element in pairs:
                if node.pipe.decl:
                    self.set_top_var(1, element)
                if len(node.pipe.decl) > 1:
                    self.set_top_var(2, key)
                try:
                    self.walk(element, node.list)
                except _Continue:
                    pass
                except _Break:
                    return
                finally:
                    del self.vars[inner:]
            if not pairs and node.else_list is not None:
                self.walk(dot, node.else_list)
        finally:
            del self.vars[mark:]

    # ----------------------------------------------------------------- evaluation

    def eval_pipeline(self, dot: Any, pipe: PipeNode) -> Any:
        self.node = pipe
        value: Any = MISSING
        final_missing = True
        for cmd in pipe.cmds:
            value = self.eval_command(dot, cmd, None if final_missing else value, final_missing)
            final_missing = False
            if value is None:  # a nil interface{} becomes "no value"
                value = MISSING
        for variable in pipe.decl:
            if pipe.is_assign:
                self.set_var(variable.ident[0], value)
            else:
                self.push(variable.ident[0], value)
        return value

    def eval_command(self, dot: Any, cmd: CommandNode, final: Any, no_final: bool) -> Any:
        first = cmd.args[0]
        if isinstance(first, FieldNode):
            self.node = first
            return self.eval_field_chain(dot, first.ident, args=cmd.args, final=final, no_final=no_final)
        if isinstance(first, ChainNode):
            return self.eval_chain(dot, first, cmd.args, final, no_final)
        if isinstance(first, IdentifierNode):
            return self.eval_function(dot, first, cmd, final, no_final)
        if isinstance(first, PipeNode):
            self.not_a_function(cmd.args, no_final)
            return self.eval_pipeline(dot, first)
        if isinstance(first, VariableNode):
            return self.eval_variable(first, cmd.args, final, no_final)
        self.node = first
        self.not_a_function(cmd.args, no_final)
        if isinstance(first, BoolNode):
            return first.value
        if isinstance(first, DotNode):
            return dot
        if isinstance(first, NilNode):
            raise self.error("nil is not a command")
        if isinstance(first, NumberNode):
            return first.value
        if isinstance(first, StringNode):
            return first.text
        raise self.error(f"can't evaluate command {first}")

    def not_a_function(self, args: Sequence[Node], no_final: bool) -> None:
        if len(args) > 1 or not no_final:
            raise self.error(f"can't give argument to non-function {args[0]}")

    def eval_variable(self, node: VariableNode, args: Sequence[Node], final: Any, no_final: bool) -> Any:
        self.node = node
        value = self.var_value(node.ident[0])
        if len(node.ident) == 1:
            self.not_a_function(args, no_final)
            return value
        return self.eval_field_chain(value, node.ident[1:], args=args, final=final, no_final=no_final)

    def eval_chain(self, dot: Any, node: ChainNode, args: Sequence[Node], final: Any, no_final: bool) -> Any:
        self.node = node
        if len(node.field) == 0:
            raise self.error("internal error: no fields in evalChainNode")
        if isinstance(node.node, NilNode):
            raise self.error(f"indirection through explicit nil in {node}")
        receiver = self.eval_arg(dot, "any", node.node)
        return self.eval_field_chain(receiver, node.field, args=args, final=final, no_final=no_final)

    def eval_field_chain(
        self, receiver: Any, ident: Sequence[str], *, args: Sequence[Node], final: Any, no_final: bool
    ) -> Any:
        static = self.static_type(receiver)
        for name in ident[:-1]:
            receiver, static = self.eval_field(name, receiver, static, args=(), final=None, no_final=True)
        return self.eval_field(ident[-1], receiver, static, args=args, final=final, no_final=no_final)[0]

    def static_type(self, value: Any) -> str:
        """The reflect type Go reports for a receiver: generic JSON values sit in interfaces."""
        if value is not self.root and isinstance(value, str | bool | int | float | list | dict):
            return "interface {}"
        return type_name(value)

    def eval_field(
        self, name: str, receiver: Any, static: str, *, args: Sequence[Node], final: Any, no_final: bool
    ) -> tuple[Any, str]:
        """One step of a field chain: the value and the static type Go would give it."""
        if receiver is MISSING:
            return MISSING, "interface {}"
        if receiver is None:
            raise self.error(f"nil pointer evaluating interface {{}}.{name}")
        method = _method(receiver, name)
        if method is not None:
            if len(args) > 1 or not no_final:
                count = len(args) - 1 + (0 if no_final else 1)
                raise self.error(f"wrong number of args for {name}: want 0 got {count}")
            result = method()
            return result, type_name(result)
        has_args = len(args) > 1 or not no_final
        if isinstance(receiver, GoStruct):
            try:
                value = receiver.field(name)
            except KeyError:
                pass
            else:
                if has_args:
                    raise self.error(f"{name} has arguments but cannot be invoked as function")
                return value, "interface {}" if name in receiver.go_any_fields else type_name(value)
        elif isinstance(receiver, GoMap | dict):
            if has_args:
                raise self.error(f"{name} is not a method but has arguments")
            zero = receiver.zero if isinstance(receiver, GoMap) else None
            element = "interface {}" if zero is None else type_name(zero)
            if not self.zero_missing and not _has_key(receiver, name):
                return MISSING, element  # missingkey=default: the invalid value
            return map_lookup(receiver, name), element
        raise self.error(f"can't evaluate field {name} in type {static}")

    def eval_function(
        self, dot: Any, node: IdentifierNode, cmd: CommandNode, final: Any, no_final: bool
    ) -> Any:
        self.node = node
        name = node.ident
        function = self.functions.get(name)
        if function is None:
            raise self.error(f'"{name}" is not a defined function')
        args = cmd.args[1:]
        count = len(args) + (0 if no_final else 1)
        fixed = len(function.params) - 1 if function.variadic else len(function.params)
        if function.variadic:
            if count < fixed:
                raise self.error(f"wrong number of args for {name}: want at least {fixed} got {len(args)}")
        elif count != fixed:
            raise self.error(f"wrong number of args for {name}: want {fixed} got {count}")
        if name in ("and", "or"):
            return self.and_or(dot, name, args, final, no_final)
        values = [self.eval_arg(dot, self.param(function, index), arg) for index, arg in enumerate(args)]
        if not no_final:
            values.append(self.validate(final, self.param(function, len(args))))
        try:
            return function.call(*values)
        except CallError as e:
            self.node = cmd
            raise self.error(f"error calling {name}: {e}") from None
        except GoUnsupported as e:
            self.node = cmd
            raise self.error(f"the simulator does not support {e}") from None

    @staticmethod
    def param(function: Function, index: int) -> Param:
        return function.params[min(index, len(function.params) - 1)]

    def and_or(self, dot: Any, name: str, args: Sequence[Node], final: Any, no_final: bool) -> Any:
        value: Any = MISSING
        for arg in args:
            value = self.eval_arg(dot, "value", arg)
            if is_true(_indirect_interface(value)) == (name == "or"):
                return value
        if not no_final:
            value = self.validate(final, "value")
        return value

    def eval_arg(self, dot: Any, param: Param, node: Node) -> Any:
        self.node = node
        if isinstance(node, DotNode):
            return self.validate(dot, param)
        if isinstance(node, NilNode):
            if param == "any":
                return None
            expected = "reflect.Value" if param == "value" else "string"
            raise self.error(f"cannot assign nil to {expected}")
        if isinstance(node, FieldNode):
            value = self.eval_field_chain(dot, node.ident, args=(node,), final=None, no_final=True)
            return self.validate(value, param)
        if isinstance(node, VariableNode):
            return self.validate(self.eval_variable(node, (), None, True), param)
        if isinstance(node, PipeNode):
            return self.validate(self.eval_pipeline(dot, node), param)
        if isinstance(node, IdentifierNode):
            fake = CommandNode(node.pos, (node,))
            return self.validate(self.eval_function(dot, node, fake, None, True), param)
        if isinstance(node, ChainNode):
            return self.validate(self.eval_chain(dot, node, (), None, True), param)
        if param == "string":
            if isinstance(node, StringNode):
                return node.text
            raise self.error(f"expected string; found {node}")
        if isinstance(node, BoolNode):
            return node.value
        if isinstance(node, NumberNode):
            return node.value
        if isinstance(node, StringNode):
            return node.text
        raise self.error(f"can't handle {node} for arg of type {param}")

    def validate(self, value: Any, param: Param) -> Any:
        if value is MISSING:
            if param == "any":
                return None
            expected = "reflect.Value" if param == "value" else "string"
            raise self.error(f"invalid value; expected {expected}")
        if param == "string" and not isinstance(value, str):
            raise self.error(f"wrong type for value; expected string; got {type_name(value)}")
        return value


def _has_key(value: GoMap | dict[str, Any], name: str) -> bool:
    if isinstance(value, GoMap):
        return name in (value.items or {})
    return name in value


def execute(
    tree: Tree, data: Any, functions: Mapping[str, Function], *, missing_key_zero: bool = True
) -> str:
    """Execute a parsed template over `data` with the builtins plus `functions`.

    Ollama sets Option("missingkey=zero"); without it a missing map key is "no value".
    """
    state = _State(tree, {**BUILTINS, **functions}, missing_key_zero, data)
    state.push("$", data)
    state.walk(data, tree.root)
    return "".join(state.out)


FUNCTION_NAMES: Final = frozenset(BUILTINS)
