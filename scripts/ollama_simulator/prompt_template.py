"""Ollama's template package (template/template.go): Parse, Vars, Execute, collate, InferTags.

Parse appends `{{ .Response }}` to a template that mentions neither .Messages nor
.Response. Execute collates the messages (consecutive same-role messages merge with
"\\n\\n", tool messages excepted; system contents are also joined into .System while the
system messages stay in .Messages), then renders one of three ways: with .Prompt and
.Suffix when both are set; once over .System/.Messages/.Tools when the template uses
.Messages; otherwise per turn (the legacy .System/.Prompt/.Response templates), the last
turn cut right after its first .Response and run without Ollama's funcs or missingkey=zero,
because Execute builds that tree with template.New("") afresh. thinking/template.go's
InferTags finds a thinking model's tags.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

from ollama_simulator.api_types import Message, Tool, ToolProperty
from ollama_simulator.goexec import FUNCTION_NAMES, Function, execute
from ollama_simulator.gotemplate import (
    ActionNode,
    BranchNode,
    CommandNode,
    FieldNode,
    ListNode,
    Node,
    PipeNode,
    TemplateError,
    TextNode,
    Tree,
    VariableNode,
    parse,
)
from ollama_simulator.govalues import marshal
from ollama_simulator.template_values import template_messages, template_tools


def _funcs(today: datetime.date) -> dict[str, Function]:
    """template.go's FuncMap; the dates come from the simulator's clock (UTC)."""

    def typescript(value: Any) -> str:
        return value.to_typescript() if isinstance(value, ToolProperty) else "any"

    return {
        "json": Function(("any",), False, marshal),
        "currentDate": Function(("string",), True, lambda *_: today.isoformat()),
        "yesterdayDate": Function(
            ("string",), True, lambda *_: (today - datetime.timedelta(days=1)).isoformat()
        ),
        "toTypeScriptType": Function(("any",), False, typescript),
    }


OLLAMA_FUNCTION_NAMES: Final = FUNCTION_NAMES | frozenset(_funcs(datetime.date(2000, 1, 1)))


_RESPONSE: Final = ActionNode(
    0, 0, PipeNode(0, 0, False, (), (CommandNode(0, (FieldNode(0, ("Response",)),)),))
)


def _identifiers(node: Node) -> list[str]:
    """template.go's Identifiers: the idents of fields and variables, pipelines included."""
    if isinstance(node, ListNode):
        return [name for child in node.nodes for name in _identifiers(child)]
    if isinstance(node, ActionNode):
        return _identifiers(node.pipe)
    if isinstance(node, BranchNode):
        names = _identifiers(node.pipe) + _identifiers(node.list)
        return names + (_identifiers(node.else_list) if node.else_list is not None else [])
    if isinstance(node, PipeNode):
        return [name for cmd in node.cmds for arg in cmd.args for name in _identifiers(arg)]
    if isinstance(node, FieldNode | VariableNode):
        return list(node.ident)
    return []


@attrs.frozen
class PromptTemplate:
    """A parsed model template (template.Template)."""

    raw: str
    tree: Tree
    vars: frozenset[str]

    def execute(
        self,
        *,
        messages: Sequence[Message] = (),
        tools: Sequence[Tool] | None = None,
        prompt: str = "",
        suffix: str = "",
        think: bool = False,
        think_level: str = "",
        is_think_set: bool = False,
        today: datetime.date,
    ) -> str:
        """Template.Execute."""
        funcs = _funcs(today)
        thinking = {"Think": think, "ThinkLevel": think_level, "IsThinkSet": is_think_set}
        system, collated = collate(messages)
        if prompt and suffix:
            data = {"Prompt": prompt, "Suffix": suffix, "Response": "", **thinking}
            return execute(self.tree, data, funcs)
        if "messages" in self.vars:
            data = {
                "System": system,
                "Messages": template_messages(collated),
                "Tools": template_tools(tools),
                "Response": "",
                **thinking,
            }
            return execute(self.tree, data, funcs)
        return self._legacy(collated, thinking, funcs)

    def _legacy(
        self, collated: Sequence[Message], thinking: Mapping[str, Any], funcs: Mapping[str, Function]
    ) -> str:
        out: list[str] = []
        turn = {"System": "", "Prompt": "", "Response": ""}

        def flush() -> None:
            out.append(execute(self.tree, {**turn, **thinking}, funcs))
            turn.update(System="", Prompt="", Response="")

        for message in collated:
            if message.role == "system":
                if turn["Prompt"] or turn["Response"]:
                    flush()
                turn["System"] = message.content
            elif message.role == "user":
                if turn["Response"]:
                    flush()
                turn["Prompt"] = message.content
            elif message.role == "assistant":
                turn["Response"] = message.content
        last = Tree(self.tree.text, _cut_after_response(self.tree.root))
        out.append(execute(last, {**turn, **thinking}, {}, missing_key_zero=False))
        return "".join(out)

    def infer_thinking_tags(self) -> tuple[str, str]:
        """thinking.InferTags."""
        return _infer_tags(self.tree.root)

    def capabilities(self) -> tuple[str, ...]:
        """goTemplateCapabilities: tools, insert and thinking as the template shows them."""
        found: list[str] = []
        if "tools" in self.vars:
            found.append("tools")
        if "suffix" in self.vars:
            found.append("insert")
        if all(self.infer_thinking_tags()):
            found.append("thinking")
        return tuple(found)


def parse_template(text: str) -> PromptTemplate:
    """template.Parse: missingkey=zero, Ollama's funcs, {{ .Response }} appended if unused."""
    tree = parse(text, OLLAMA_FUNCTION_NAMES)
    names = frozenset(name.lower() for name in _identifiers(tree.root))
    if "messages" not in names and "response" not in names:
        tree = Tree(tree.text, ListNode(tree.root.pos, (*tree.root.nodes, _RESPONSE)))
    return PromptTemplate(text, tree, names)


def collate(messages: Sequence[Message]) -> tuple[str, list[Message]]:
    """template.go's collate: merged consecutive same-role contents (only the content merges)."""
    system = [message.content for message in messages if message.role == "system"]
    collated: list[Message] = []
    for message in messages:
        if collated and collated[-1].role == message.role and message.role != "tool":
            collated[-1] = attrs.evolve(collated[-1], content=collated[-1].content + "\n\n" + message.content)
        else:
            collated.append(message)
    return "\n\n".join(system), collated


class _Cut:
    """deleteNode's walk with the "cut after the first .Response" predicate."""

    def __init__(self) -> None:
        self.cut = False

    def drop(self, node: Node) -> bool:
        if isinstance(node, FieldNode) and "Response" in node.ident:
            self.cut = True
            return False
        return self.cut

    def walk(self, node: Node) -> Node | None:
        if self.drop(node):
            return None
        if isinstance(node, ListNode):
            children = [kept for child in node.nodes if (kept := self.walk(child)) is not None]
            return ListNode(node.pos, tuple(children))
        if isinstance(node, BranchNode):
            body = self.list(node.list)
            else_list = self.list(node.else_list) if node.else_list is not None else None
            return attrs.evolve(node, list=body, else_list=else_list)
        if isinstance(node, ActionNode):
            pipe = self.pipe(node.pipe)
            return None if pipe is None else attrs.evolve(node, pipe=pipe)
        if isinstance(node, PipeNode):
            return self.pipe(node)
        return node

    def pipe(self, node: PipeNode) -> PipeNode | None:
        if self.drop(node):
            return None
        cmds: list[CommandNode] = []
        for cmd in node.cmds:
            args = [kept for arg in cmd.args if (kept := self.walk(arg)) is not None]
            if not args:
                return None
            cmds.append(CommandNode(cmd.pos, tuple(args)))
        return attrs.evolve(node, cmds=tuple(cmds)) if cmds else None

    def list(self, node: ListNode) -> ListNode:
        kept = self.walk(node)
        if not isinstance(kept, ListNode):
            # Go's `walk(t.List).(*parse.ListNode)` panics here; Ollama answers 500.
            raise TemplateError("interface conversion: parse.Node is nil, not *parse.ListNode")
        return kept


def _cut_after_response(root: ListNode) -> ListNode:
    kept = _Cut().walk(root)
    return kept if isinstance(kept, ListNode) else ListNode(root.pos, ())


def _infer_tags(root: ListNode) -> tuple[str, str]:
    ancestors: list[Node] = []
    tags = ["", ""]

    def uses_messages(node: BranchNode) -> bool:
        found = False

        def visit(child: Node) -> None:
            nonlocal found
            if isinstance(child, FieldNode) and child.ident[0] == "Messages":
                found = True
            for grandchild in _children(child):
                visit(grandchild)

        visit(node.pipe)
        return found

    def visit(node: Node) -> None:
        ancestors.append(node)
        if isinstance(node, FieldNode) and node.ident and node.ident[0] == "Thinking":
            ranges = [a for a in ancestors if isinstance(a, BranchNode) and a.kind == "range"]
            if ranges and uses_messages(ranges[-1]):
                lists = [a for a in ancestors if isinstance(a, ListNode)]
                if lists:
                    nodes = lists[-1].nodes
                    if isinstance(nodes[0], TextNode):
                        tags[0] = nodes[0].text.strip()
                    if isinstance(nodes[-1], TextNode):
                        tags[1] = nodes[-1].text.strip()
        for child in _children(node):
            visit(child)
        ancestors.pop()

    visit(root)
    return tags[0], tags[1]


def _children(node: Node) -> list[Node]:
    """templateVisit's order: a branch's pipe, list and else list; actions' and commands' parts."""
    if isinstance(node, ListNode):
        return list(node.nodes)
    if isinstance(node, BranchNode):
        children: list[Node] = [node.pipe, node.list]
        return children + ([node.else_list] if node.else_list is not None else [])
    if isinstance(node, ActionNode):
        return [node.pipe]
    if isinstance(node, PipeNode):
        return list(node.cmds)
    if isinstance(node, CommandNode):
        return list(node.args)
    return []
