"""How many bytes a model's Go template can write around a request (docs/ARCHITECTURE.md#prompt-bound).

Ollama renders every chat and templated generate through the model's Go `text/template` (the one
`/api/show` reports) before it tokenizes. This module reads that template without executing it and
returns a polynomial in the sizes of what a request brings (messages, their bytes, tools, tool
calls, the system prompt): an upper bound on the rendered bytes for every request of that shape.

Soundness over tightness: literal text counts untrimmed; both branches of an `if` count as the
larger one; a `range` counts its body once per element; a value printed counts as the largest
form it can take (a string as sent, or as Go's `json` escapes it). Anything this reader does not
know (a function it has no bound for, a field that may print images, a Jinja template, a syntax
error) makes the template unbounded, and the caller falls back to the context-length bound.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import attrs

from stream_proxy.gotemplate import (
    Branch,
    Include,
    Jump,
    Node,
    Print,
    Text,
    Unbounded,
    identifiers,
    literal,
    parse,
)

Monomial = tuple[str, ...]
Poly = dict[Monomial, int]

# Bytes that a printed struct or container may add beyond its JSON (Go's %v of a struct, nil
# pointers as "<nil>", empty struct fields json.Marshal writes although the request omitted them).
SLACK: Final = 64
# The longest decimal an int or float64 prints as (json.Marshal, %v): "-1.2345678901234567e-308".
NUMBER: Final = 24
# What a missing map key prints with missingkey=zero.
NO_VALUE: Final = len("<no value>")


# --- polynomials ------------------------------------------------------------------------------


def const(n: int) -> Poly:
    return {(): n} if n else {}


def var(name: str, coefficient: int = 1, plus: int = 0) -> Poly:
    poly: Poly = {(name,): coefficient}
    if plus:
        poly[()] = plus
    return poly


def add(*polys: Poly) -> Poly:
    total: Poly = {}
    for poly in polys:
        for monomial, coefficient in poly.items():
            total[monomial] = total.get(monomial, 0) + coefficient
    return total


def larger(a: Poly, b: Poly) -> Poly:
    """Coefficient-wise maximum: ≥ both, since every variable is ≥ 0."""
    return {m: max(a.get(m, 0), b.get(m, 0)) for m in a.keys() | b.keys()}


def times(poly: Poly, name: str) -> Poly:
    return {tuple(sorted((*m, name))): c for m, c in poly.items()}


def evaluate(poly: Poly, values: Mapping[str, int]) -> int:
    """The polynomial's value; a variable without a value is an error (it would be a guess)."""
    total = 0
    for monomial, coefficient in poly.items():
        product = coefficient
        for name in monomial:
            product *= values[name]
        total += product
    return total


def scaled(poly: Poly, factor: int, plus: int = 0) -> Poly:
    return add({m: c * factor for m, c in poly.items()}, const(plus))


def renamed(poly: Poly, names: Mapping[str, str]) -> Poly:
    """Each variable in `names` replaced by another (an element's size by its collection's total)."""
    return add(*({tuple(sorted(names.get(v, v) for v in m)): c} for m, c in poly.items()))


# --- what a value can print -----------------------------------------------------------------------

# The variables a request is measured by (stream_proxy/prompt.py measures them), each a byte count
# unless said otherwise; a J suffix is the same strings as Go's `json` writes them:
#   M  messages rendered (a count)    R RJ  roles    C CJ  contents    H HJ  thinking
#   N NJ  tool names and tool call ids           K  tool calls (a count)   KJ  their Go JSON
#   S SJ  the system prompt (.System)            T  tools (a count)        J  their Go JSON
#   P PJ  generate's prompt   X XJ  its suffix   TL TLJ  the think level
#   TURNS  executions of a legacy template (messages + 1); CS CU CA  system, user and assistant
#   contents (a legacy template's .System, .Prompt and .Response)
MESSAGE_VARIABLES: Final = ("R", "RJ", "C", "CJ", "H", "HJ", "N", "NJ", "K", "KJ")
MESSAGE_TEXT: Final = ("Role", "Content", "Thinking", "ToolName", "ToolCallID")
VARIABLES: Final = (
    "TT",  # 1 when the request has tools, else 0
    *MESSAGE_VARIABLES,
    "M",
    "S",
    "SJ",
    "T",
    "J",
    "P",
    "PJ",
    "X",
    "XJ",
    "TL",
    "TLJ",
    "TURNS",
    "CS",
    "CU",
    "CA",
    "CSJ",
    "CUJ",
    "CAJ",
)


@attrs.frozen
class Kind:
    """A value as far as its printed size goes.

    `printed` / `json`: bounds of printing it as is / through `json` (None: unbounded); `shape`
    says how its fields resolve (`root`, `turn`, `suffix`, `message`, `json`, `missing`, `leaf`);
    `names` are the variables of a message (t, j, k, kj) or of a JSON-like part (its bound);
    `ranged`: the collection ranging over it walks.
    """

    shape: str
    printed: Poly | None = None
    json: Poly | None = None
    names: tuple[str, ...] = ()
    ranged: Domain | None = None


@attrs.frozen
class Domain:
    """A collection: how many elements (a variable), each element's kind, and what each of the
    element's variables sums to over the collection."""

    count: str
    element: Kind
    totals: Mapping[str, str]


LEAF_UNKNOWN: Final = Kind("leaf")
MISSING: Final = Kind("missing", {(): NO_VALUE}, {(): len("null")})  # nil: <no value>, json null
# Nodes one reading may visit (templates calling templates can multiply them): beyond, no bound.
MAX_VISITS: Final = 20_000
# Templates longer than this are not read (the reading runs on the event loop).
MAX_TEMPLATE: Final = 256 * 1024


def small(n: int) -> Kind:
    return Kind("leaf", const(n), const(6 * n + 2))


def text(raw: str, json: str) -> Kind:
    return Kind("leaf", var(raw), var(json))


def jsonlike(bound: str) -> Kind:
    """A tool, a tool call or any part of one: its JSON (Go's escaping, the fields Go adds) is at
    most `bound` + SLACK bytes, and so is every field or element of it."""
    return Kind("json", var(bound, plus=SLACK), var(bound, plus=SLACK), (bound,))


@attrs.define
class _Reader:
    """One walk over a parsed template in one of Ollama's three ways of executing it."""

    mode: str  # messages | legacy | suffix
    defined: Mapping[str, tuple[Node, ...]]
    fresh_n: int = 0
    depth: int = 0
    # Variables reassigned inside the range being read: name -> (placeholder variable, the most
    # one assignment adds per element); see _range.
    accumulating: dict[str, tuple[str, Poly]] = attrs.field(factory=dict)
    visits: int = 0

    def fresh(self, stem: str) -> str:
        self.fresh_n += 1
        return f"{stem}.{self.fresh_n}"

    # values

    def root(self) -> Kind:
        return Kind({"messages": "root", "legacy": "turn", "suffix": "suffix"}[self.mode])

    def messages(self) -> Kind:
        names = {stem: self.fresh(stem) for stem in MESSAGE_VARIABLES}
        element = Kind("message", names=tuple(names.values()))
        return Kind("list", ranged=Domain("M", element, {v: stem for stem, v in names.items()}))

    def tools(self) -> Kind:
        each = self.fresh("tool")
        domain = Domain("T", jsonlike(each), {each: "J"})
        return Kind("list", add(var("J"), var("T", SLACK), const(SLACK)), var("J", plus=SLACK), ranged=domain)

    def field(self, kind: Kind, name: str) -> Kind:
        if kind.shape in ("root", "turn", "suffix"):
            return self._root_field(kind.shape, name)
        if kind.shape == "message":
            r, rj, c, cj, h, hj, n, nj, k, kj = kind.names
            if name in MESSAGE_TEXT:
                raw, json = {"Role": (r, rj), "Content": (c, cj), "Thinking": (h, hj)}.get(name, (n, nj))
                return text(raw, json)
            if name == "ToolCalls":
                each = self.fresh("call")
                return Kind(
                    "list",
                    add(var(kj), var(k, SLACK), const(SLACK)),
                    var(kj, plus=SLACK),
                    ranged=Domain(k, jsonlike(each), {each: kj}),
                )
            return LEAF_UNKNOWN  # Images (bytes) and fields Go would refuse
        if kind.shape == "json":
            return kind
        if kind.shape == "missing":
            return MISSING
        return LEAF_UNKNOWN

    def _root_field(self, shape: str, name: str) -> Kind:
        if name in ("Think", "IsThinkSet"):
            return small(len("false"))
        if name == "ThinkLevel":
            return text("TL", "TLJ")
        if name == "Response":
            return text("a.turn", "aj.turn") if shape == "turn" else small(0)
        if shape == "root":
            if name == "System":
                return text("S", "SJ")
            if name == "Messages":
                return self.messages()
            if name == "Tools":
                return self.tools()
            if name in ("Prompt", "Suffix"):
                return MISSING  # not in the map the messages path executes with
        elif shape == "turn":
            if name == "System":
                return text("s.turn", "sj.turn")
            if name == "Prompt":
                return text("u.turn", "uj.turn")
            if name == "Suffix":
                return small(0)
        elif name in ("Prompt", "Suffix"):
            return text("P", "PJ") if name == "Prompt" else text("X", "XJ")
        return MISSING

    def element(self, kind: Kind) -> Kind:
        """Some element of a collection (index, first, …): its variables are the totals."""
        if kind.ranged is not None:
            element = kind.ranged.element
            names = kind.ranged.totals
            return attrs.evolve(
                element,
                printed=None if element.printed is None else renamed(element.printed, names),
                json=None if element.json is None else renamed(element.json, names),
                names=tuple(names.get(n, n) for n in element.names),
            )
        if kind.shape == "json":
            return kind
        if kind.shape == "missing":
            return MISSING
        return small(NUMBER) if kind.printed is not None else LEAF_UNKNOWN

    def ranged(self, kind: Kind) -> Domain | None:
        """The collection ranging over `kind` walks (None: nothing, as over nil)."""
        if kind.ranged is not None:
            return kind.ranged
        if kind.shape == "json":
            each = self.fresh("part")
            return Domain(kind.names[0], jsonlike(each), {each: kind.names[0]})
        if kind.shape == "missing":
            return None
        raise Unbounded(f"range over a {kind.shape} value")

    # pipelines

    def pipeline(self, words: Sequence[str], dot: Kind, scopes: list[dict[str, Kind]]) -> Kind:
        """The value of a pipeline; a declaration (`$x :=`, `$i, $v :=`) or assignment is applied."""
        declared, assign, rest = _declaration(words)
        kind = self._commands(_commands(rest), dot, scopes)
        for name in declared:
            if assign and name in self.accumulating:
                self._accumulate(name, kind)
            elif assign:
                _reassign(scopes, name, kind)
            else:
                scopes[-1][name] = kind
        return kind

    def _accumulate(self, name: str, kind: Kind) -> None:
        """`$x = E` inside the range: E may hold the old value once (`printf "%s…" $x …`) plus
        what this element adds; the added part is kept (the larger over all assignments)."""
        placeholder, added = self.accumulating[name]
        if kind.printed is None:
            raise Unbounded(f"assignment of an unbounded value to {name}")
        rest = dict(kind.printed)
        if rest.pop((placeholder,), 0) > 1 or any(v.startswith("acc.") for m in rest for v in m):
            raise Unbounded(f"{name} grows faster than once per element, or from another variable")
        self.accumulating[name] = (placeholder, larger(added, rest))

    def _commands(
        self, commands: list[list[str | list[object]]], dot: Kind, scopes: list[dict[str, Kind]]
    ) -> Kind:
        result: Kind | None = None
        for command in commands:
            args: list[str | list[object]] = list(command)
            head = args[0]
            if isinstance(head, str) and _is_function(head):
                kinds = [self._operand(a, dot, scopes) for a in args[1:]]
                if result is not None:
                    kinds.append(result)
                result = self._call(head, args[1:], kinds)
            elif len(args) > 1 or result is not None:
                raise Unbounded("arguments to a non-function")
            else:
                result = self._operand(head, dot, scopes)
        if result is None:
            raise Unbounded("empty pipeline")
        return result

    def _operand(self, word: str | list[object], dot: Kind, scopes: list[dict[str, Kind]]) -> Kind:
        if isinstance(word, list):
            return self._commands(word, dot, scopes)  # type: ignore[arg-type]  # nested commands
        quoted = literal(word)
        if quoted is not None:
            return small(len(quoted.encode("utf-8", "surrogatepass")))
        if word in ("true", "false", "nil") or word[:1].isdigit() or word[:1] in "-+'":
            return small(NUMBER)
        if word == ".":
            return dot
        if word.startswith("."):
            base, path = dot, word[1:].split(".")
        elif word.startswith("$"):
            name, _, rest = word.partition(".")
            base, path = _lookup(scopes, name), rest.split(".") if rest else []
        else:
            raise Unbounded(f"operand {word[:20]!r}")
        for part in path:
            if not part:
                raise Unbounded(f"field {word[:20]!r}")
            base = self.field(base, part)
        return base

    def _call(self, name: str, words: Sequence[str | list[object]], kinds: list[Kind]) -> Kind:
        if name in ("and", "or"):
            return _joined(kinds)
        if name in ("not", "eq", "ne", "lt", "le", "gt", "ge"):
            return small(len("false"))
        if name == "len":
            return small(NUMBER)
        if name in ("index", "slice"):
            if not kinds:
                raise Unbounded(f"{name} without arguments")
            kind = kinds[0]
            if name == "index":
                for _ in kinds[1:]:
                    kind = self.element(kind)
            return kind
        if name in ("print", "println", "printf", "html", "js", "urlquery"):
            return self._printing(name, words, kinds)
        if name == "json":
            if len(kinds) != 1 or kinds[0].json is None:
                raise Unbounded("json of a value without a bound")
            return Kind("leaf", kinds[0].json, scaled(kinds[0].json, 6, 2))
        if name in ("currentDate", "yesterdayDate"):
            return small(len("2006-01-02"))
        if name == "toTypeScriptType":
            if kinds and kinds[0].shape == "json":
                bound = var(kinds[0].names[0], 4, SLACK)
                return Kind("leaf", bound, scaled(bound, 6, 2))
            return small(len("any"))
        raise Unbounded(f"function {name}")

    def _printing(self, name: str, words: Sequence[str | list[object]], kinds: list[Kind]) -> Kind:
        printed = [k.printed for k in kinds]
        if any(p is None for p in printed):
            raise Unbounded(f"{name} of a value without a bound")
        parts = [p for p in printed if p is not None]
        if name == "printf":
            total = _printf(words[0] if words else None, parts)
        elif name in ("html", "js", "urlquery"):  # an escape is at most 6 bytes per byte
            total = scaled(add(*parts), 6, len(parts))
        else:  # print, println: spaces between operands
            total = add(*parts, const(len(parts) + 1))
        return Kind("leaf", total, scaled(total, 6, 2))

    # nodes

    def walk(self, nodes: Sequence[Node], dot: Kind, scopes: list[dict[str, Kind]]) -> Poly:
        total: Poly = {}
        self.visits += len(nodes)
        if self.visits > MAX_VISITS:
            raise Unbounded("too much template to read")
        for at, node in enumerate(nodes):
            if isinstance(node, Print) and len(node.words) == 1 and node.words[0] in self.accumulating:
                _consumed(node.words[0], nodes[at + 1 :])
                continue  # counted once for the whole range (see _range)
            total = add(total, self._node(node, dot, scopes))
        return total

    def _node(self, node: Node, dot: Kind, scopes: list[dict[str, Kind]]) -> Poly:
        if isinstance(node, Text):
            return const(node.size)
        if isinstance(node, Print):
            declared, _, _ = _declaration(node.words)
            kind = self.pipeline(node.words, dot, scopes)
            if declared:
                return {}
            if kind.printed is None:
                raise Unbounded(f"printing {' '.join(node.words)[:40]!r}")
            return kind.printed
        if isinstance(node, Include):
            return self._include(node, dot, scopes)
        if isinstance(node, Jump):  # only skips output (between a print and its reset: no bound)
            return {}
        inner = [*scopes, {}]
        if node.keyword == "if":
            if _declaration(node.words)[0]:
                self.pipeline(node.words, dot, inner)
            then = self.walk(node.body, dot, inner)
            gate = self._gate(node.words, dot, scopes)
            if gate is not None:
                then = _gated(then, *gate)
            return larger(then, self.walk(node.otherwise, dot, [*scopes, {}]))
        if node.keyword == "with":
            kind = self.pipeline(node.words, dot, inner)
            return larger(self.walk(node.body, kind, inner), self.walk(node.otherwise, dot, [*scopes, {}]))
        return self._range(node, dot, scopes)

    def _gate(
        self, words: Sequence[str], dot: Kind, scopes: list[dict[str, Kind]]
    ) -> tuple[str, frozenset[str]] | None:
        """`if .Tools`, `if and $.Tools $last`, `if .ToolCalls` hold only for a non-empty
        collection: (a variable that is 0 when it is empty and ≥ 1 otherwise, the variables that
        are 0 when it is empty). TT (0 or 1) stands for the request's tools, a count for others."""
        operands = list(words[1:]) if words[:1] == ("and",) or list(words[:1]) == ["and"] else list(words)
        if len(operands) != len(words) and words[0] != "and":
            return None
        if words[:1] not in (("and",), ["and"]) and len(words) != 1:
            return None
        if any(w in ("(", ")", "|", ":=", "=") for w in operands):
            return None
        for word in operands:
            if word.startswith((".", "$")):
                try:
                    kind = self._operand(word, dot, scopes)
                except Unbounded:
                    continue
                if kind.ranged is not None:
                    domain = kind.ranged
                    empty = frozenset({domain.count, *domain.totals.values()})
                    return ("TT" if domain.count == "T" else domain.count), empty
        return None

    def _range(self, node: Branch, dot: Kind, scopes: list[dict[str, Kind]]) -> Poly:
        declared, assign, rest = _declaration(node.words)
        if assign:
            raise Unbounded("range with an assignment")
        otherwise = self.walk(node.otherwise, dot, [*scopes, {}])
        domain = self.ranged(self._commands(_commands(rest), dot, scopes))
        if domain is None:
            return otherwise
        inner = [*scopes, {}]
        if len(declared) == 2:
            inner[-1][declared[0]] = small(NUMBER)
        if declared:
            inner[-1][declared[-1]] = domain.element
        names = _assigned(node.body) - set(inner[-1])
        if names & set(self.accumulating):
            raise Unbounded("a variable reassigned in nested ranges")
        starts = {name: _lookup(scopes, name) for name in names}
        for name in names:
            placeholder = self.fresh("acc")
            self.accumulating[name] = (placeholder, {})
            inner[-1][name] = Kind("leaf", var(placeholder), var(placeholder, 6, 2))
        try:
            body = self.walk(node.body, domain.element, inner)
            grown = {name: self.accumulating[name] for name in names}
        finally:
            for name in names:
                del self.accumulating[name]
        if any(placeholder in m for placeholder, _ in grown.values() for m in body):
            raise Unbounded("a reassigned variable printed other than on its own")
        summed = _summed(body, domain)
        for name, (_, added) in grown.items():
            start = starts[name].printed
            if start is None:
                raise Unbounded(f"{name} starts unbounded")
            # The value never exceeds its start plus everything added; every print of it inside
            # the range is followed by a reset to "", so all of them together print at most that.
            value = add(start, _summed(added, domain))
            summed = add(summed, value)
            _set(scopes, name, Kind("leaf", value, scaled(value, 6, 2)))
        return larger(summed, otherwise)

    def _include(self, node: Include, dot: Kind, scopes: list[dict[str, Kind]]) -> Poly:
        body = self.defined.get(node.name)
        if body is None:
            raise Unbounded(f"template {node.name!r} is not defined")
        if self.depth >= 8:
            raise Unbounded("templates nested too deep")
        kind = self.pipeline(node.words, dot, scopes) if node.words else MISSING
        self.depth += 1
        try:
            return self.walk(body, kind, [{"$": kind}])
        finally:
            self.depth -= 1


def _gated(poly: Poly, gate: str, empty: frozenset[str]) -> Poly:
    """A branch that runs only while a collection is non-empty: each term that is not already 0
    for an empty collection is multiplied by the gate (0 then, ≥ 1 otherwise)."""
    gated: Poly = {}
    for monomial, coefficient in poly.items():
        key = monomial if empty & set(monomial) else tuple(sorted((*monomial, gate)))
        gated[key] = gated.get(key, 0) + coefficient
    return gated


def _summed(body: Poly, domain: Domain) -> Poly:
    """A range body's bound over all elements: an element's variables become their totals; what
    does not depend on the element counts once per element."""
    summed: Poly = {}
    for monomial, coefficient in body.items():
        if any(v in domain.totals for v in monomial):
            key = tuple(sorted(domain.totals.get(v, v) for v in monomial))
        else:
            key = tuple(sorted((*monomial, domain.count)))
        summed[key] = summed.get(key, 0) + coefficient
    return summed


def _assigned(nodes: Sequence[Node]) -> set[str]:
    """Variables `$x = …` assigns anywhere in these nodes."""
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, Print):
            declared, assign, _ = _declaration(node.words)
            if assign:
                names.update(declared)
        elif isinstance(node, Branch):
            names |= _assigned(node.body) | _assigned(node.otherwise)
    return names


def _consumed(name: str, following: Sequence[Node]) -> None:
    """A print of an accumulating variable must be followed (text aside) by `$x = ""`."""
    for node in following:
        if isinstance(node, Text):
            continue
        reset = isinstance(node, Print) and node.words[:2] == (name, "=") and len(node.words) == 3
        if reset and isinstance(node, Print) and literal(node.words[2]) == "":
            return
        break
    raise Unbounded(f"{name} printed without being reset")


def _set(scopes: list[dict[str, Kind]], name: str, kind: Kind) -> None:
    for scope in reversed(scopes):
        if name in scope:
            scope[name] = kind
            return
    raise Unbounded(f"undefined variable {name}")


_VERB: Final = re.compile(r"%[-+# 0]*(?:\d+|\*)?(?:\.(?:\d+|\*))?[a-zA-Z%]")


def _printf(fmt: str | list[object] | None, parts: list[Poly]) -> Poly:
    """printf with a literal format: the literal text, each %s/%v/%d argument as printed, %q and
    the rest as escaped (≤ 6 bytes a byte + quotes). Any other format: every argument escaped."""
    quoted = literal(fmt) if isinstance(fmt, str) else None
    if quoted is not None and re.search(r"%[-+# 0]*(?:\[|\*|\d|\.\d)", quoted):
        raise Unbounded("printf with a width, a precision or an argument index")
    if quoted is None:
        return add(*(scaled(p, 6, 2) for p in parts), const(NUMBER * len(parts)))
    verbs = [v for v in _VERB.findall(quoted) if v != "%%"]
    text = len(_VERB.sub("", quoted).encode("utf-8", "surrogatepass")) + quoted.count("%%")
    total = const(text + NUMBER * max(0, len(verbs) - len(parts) + 1))
    for verb, part in zip(verbs, parts[1:], strict=False):
        plain = verb[-1] in "svd" and not any(c in verb for c in "*#+ ")
        total = add(total, part if plain else scaled(part, 6, 2))
    for part in parts[1 + len(verbs) :]:  # extra arguments: %!(EXTRA type=value)
        total = add(total, scaled(part, 6, NUMBER))
    return total


def _is_function(word: str) -> bool:
    return word[:1].isalpha() and word not in ("true", "false", "nil")


def _declaration(words: Sequence[str]) -> tuple[list[str], bool, Sequence[str]]:
    """(variables declared or assigned, whether it is an assignment `=`, the pipeline)."""
    for at, word in enumerate(words):
        if word in (":=", "="):
            names = [w for w in words[:at] if w != ","]
            if not names or not all(n.startswith("$") and "." not in n for n in names) or len(names) > 2:
                raise Unbounded("declaration")
            return names, word == "=", words[at + 1 :]
        if not (word.startswith("$") or word == ","):
            break
    return [], False, words


def _commands(words: Sequence[str]) -> list[list[str | list[object]]]:
    """Commands split at `|`, parenthesised pipelines nested."""
    stack: list[list[list[str | list[object]]]] = [[[]]]
    for word in words:
        if word == "(":
            stack.append([[]])
        elif word == ")":
            if len(stack) == 1:
                raise Unbounded("unbalanced )")
            group = stack.pop()
            if any(not c for c in group):
                raise Unbounded("empty parentheses or command")
            stack[-1][-1].append(group)  # type: ignore[arg-type]  # a nested pipeline operand
        elif word == "|":
            stack[-1].append([])
        elif word == ",":
            raise Unbounded("stray ,")
        else:
            stack[-1][-1].append(word)
    if len(stack) != 1 or any(not c for c in stack[0]):
        raise Unbounded("malformed pipeline")
    return stack[0]


def _lookup(scopes: list[dict[str, Kind]], name: str) -> Kind:
    for scope in reversed(scopes):
        if name in scope:
            return scope[name]
    raise Unbounded(f"undefined variable {name}")


def _reassign(scopes: list[dict[str, Kind]], name: str, kind: Kind) -> None:
    """`$x = …` changes the variable where it was declared; only constant-sized values may be
    assigned (a message assigned out of its range would outlive its variables)."""
    if kind.printed is None or any(monomial for monomial in kind.printed):
        raise Unbounded(f"assignment of a sized value to {name}")
    for scope in reversed(scopes):
        if name in scope:
            scope[name] = _joined([scope[name], kind])
            return
    raise Unbounded(f"undefined variable {name}")


def _joined(kinds: list[Kind]) -> Kind:
    """`and` / `or` return one of their arguments: bounded by the larger of them."""
    if not kinds:
        raise Unbounded("and/or without arguments")
    if all(k == kinds[0] for k in kinds):
        return kinds[0]
    printed: Poly | None = {}
    json: Poly | None = {}
    for kind in kinds:
        printed = None if printed is None or kind.printed is None else larger(printed, kind.printed)
        json = None if json is None or kind.json is None else larger(json, kind.json)
    return Kind("leaf", printed, json)


@attrs.frozen
class Analysis:
    """A template's bounds, per way Ollama executes it (None: no bound)."""

    messages: Poly | None  # chat, and generate without a suffix (the messages or legacy path)
    suffix: Poly | None  # generate with a prompt and a suffix (.Prompt / .Suffix)


def analyse(template: str) -> Analysis:
    """The bounds of a template as `/api/show` reports it."""
    if len(template) > MAX_TEMPLATE:
        return Analysis(None, None)
    try:
        nodes, defined = parse(template)
        names = identifiers(template)
    except (Unbounded, RecursionError, IndexError):
        return Analysis(None, None)
    if "messages" in names:
        chat = _bound(lambda r: r.walk(nodes, r.root(), [{"$": r.root()}]), "messages", defined)
    else:  # Ollama appends {{ .Response }} when the template names neither; run once per turn
        respond = "response" not in names

        def legacy(reader: _Reader) -> Poly:
            poly = reader.walk(nodes, reader.root(), [{"$": reader.root()}])
            return add(poly, var("a.turn")) if respond else poly

        turns = _bound(legacy, "legacy", defined)
        chat = None if turns is None else _per_turn(turns)
    suffix = _bound(lambda r: r.walk(nodes, r.root(), [{"$": r.root()}]), "suffix", defined)
    return Analysis(chat, suffix)


def _bound(
    walk: Callable[[_Reader], Poly], mode: str, defined: Mapping[str, tuple[Node, ...]]
) -> Poly | None:
    try:
        poly = walk(_Reader(mode, defined))
    except (Unbounded, RecursionError, IndexError):
        return None
    if any(v.startswith("acc.") for m in poly for v in m):
        return None  # an accumulator's placeholder escaped its range
    return poly


def _per_turn(poly: Poly) -> Poly:
    totals = {
        "s.turn": "CS",
        "u.turn": "CU",
        "a.turn": "CA",
        "sj.turn": "CSJ",
        "uj.turn": "CUJ",
        "aj.turn": "CAJ",
    }
    out: Poly = {}
    for monomial, coefficient in poly.items():
        if any(v in totals for v in monomial):
            key = tuple(sorted(totals.get(v, v) for v in monomial))
        else:
            key = tuple(sorted((*monomial, "TURNS")))
        out[key] = out.get(key, 0) + coefficient
    return out
