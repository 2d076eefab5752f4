"""The values Ollama's templates see: template.go's templateMessage, templateTool and friends.

Template.Execute converts api values before rendering (convertMessagesForTemplate,
convertToolsForTemplate): tool properties and call arguments become plain Go maps (so
`range` sorts their keys), and templateTools, templateTool, templateArgs and
templateProperties get String() methods that are json.Marshal (HTML-escaped, struct
fields in declaration order, omitempty as tagged). templateToolFunction has no String():
`{{ .Function }}` prints it with fmt as {name description {type ...}}. The message and
tool-call structs carry no json tags, so `json` writes their Go field names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import attrs

from ollama_simulator.api_types import Message, Tool, ToolProperty
from ollama_simulator.govalues import Bytes, GoMap, GoSlice, GoStruct, marshal


class TemplateArgs(GoMap):
    """templateArgs (map[string]any): String() is "{}" for nil, else json.Marshal."""

    def go_string(self) -> str:
        return "{}" if self.items is None else marshal(self)


class TemplateProperties(GoMap):
    """templateProperties (map[string]api.ToolProperty), String() like templateArgs."""

    def go_string(self) -> str:
        return "{}" if self.items is None else marshal(self)


class TemplateTools(GoSlice):
    """templateTools ([]templateTool): String() is json.Marshal ("null" when nil)."""

    def go_string(self) -> str:
        return marshal(self)


@attrs.frozen
class TemplateToolFunctionParameters(GoStruct):
    go_type: ClassVar[str] = "template.templateToolFunctionParameters"
    go_any_fields: ClassVar[frozenset[str]] = frozenset({"Defs", "Items"})
    go_fields: ClassVar[tuple[str, ...]] = ("Type", "Defs", "Items", "Required", "Properties")

    type: str
    defs: Any
    items: Any
    required: GoSlice
    properties: TemplateProperties

    def json_members(self) -> list[tuple[str, Any]]:
        members: list[tuple[str, Any]] = [("type", self.type)]
        if self.defs is not None:
            members.append(("$defs", self.defs))
        if self.items is not None:
            members.append(("items", self.items))
        if len(self.required):
            members.append(("required", self.required))
        members.append(("properties", self.properties))
        return members


@attrs.frozen
class TemplateToolFunction(GoStruct):
    go_type: ClassVar[str] = "template.templateToolFunction"
    go_fields: ClassVar[tuple[str, ...]] = ("Name", "Description", "Parameters")

    name: str
    description: str
    parameters: TemplateToolFunctionParameters

    def json_members(self) -> list[tuple[str, Any]]:
        return [("name", self.name), ("description", self.description), ("parameters", self.parameters)]


@attrs.frozen
class TemplateTool(GoStruct):
    go_type: ClassVar[str] = "template.templateTool"
    go_any_fields: ClassVar[frozenset[str]] = frozenset({"Items"})
    go_fields: ClassVar[tuple[str, ...]] = ("Type", "Items", "Function")

    type: str
    items: Any
    function: TemplateToolFunction

    def json_members(self) -> list[tuple[str, Any]]:
        members: list[tuple[str, Any]] = [("type", self.type)]
        if self.items is not None:
            members.append(("items", self.items))
        members.append(("function", self.function))
        return members

    def go_string(self) -> str:
        return marshal(self)


@attrs.frozen
class TemplateToolCallFunction(GoStruct):
    go_type: ClassVar[str] = "template.templateToolCallFunction"
    go_fields: ClassVar[tuple[str, ...]] = ("Index", "Name", "Arguments")

    index: int
    name: str
    arguments: TemplateArgs


@attrs.frozen
class TemplateToolCall(GoStruct):
    go_type: ClassVar[str] = "template.templateToolCall"
    go_fields: ClassVar[tuple[str, ...]] = ("ID", "Function")

    id: str
    function: TemplateToolCallFunction


@attrs.frozen
class TemplateMessage(GoStruct):
    """A *templateMessage (templates reach its fields through the pointer)."""

    go_type: ClassVar[str] = "*template.templateMessage"
    go_pointer: ClassVar[bool] = True
    go_fields: ClassVar[tuple[str, ...]] = (
        "Role",
        "Content",
        "Thinking",
        "Images",
        "ToolCalls",
        "ToolName",
        "ToolCallID",
    )

    role: str
    content: str
    thinking: str
    images: GoSlice
    tool_calls: GoSlice
    tool_name: str
    tool_call_id: str


def template_tools(tools: Sequence[Tool] | None) -> TemplateTools:
    """convertToolsForTemplate: nil stays nil (String() "null"), [] stays empty ("[]")."""
    if tools is None:
        return TemplateTools("template.templateTools", None)
    converted = []
    for tool in tools:
        parameters = tool.parameters
        properties = TemplateProperties(
            "template.templateProperties",
            None if parameters.properties is None else dict(parameters.properties),
            ToolProperty(),
        )
        converted.append(
            TemplateTool(
                type=tool.type,
                items=tool.items,
                function=TemplateToolFunction(
                    name=tool.name,
                    description=tool.description,
                    parameters=TemplateToolFunctionParameters(
                        type=parameters.type,
                        defs=parameters.defs,
                        items=parameters.items,
                        required=GoSlice("[]string", parameters.required),
                        properties=properties,
                    ),
                ),
            )
        )
    return TemplateTools("template.templateTools", tuple(converted))


def template_message(message: Message) -> TemplateMessage:
    """One convertMessagesForTemplate element (tool calls only when the message has some)."""
    calls = tuple(
        TemplateToolCall(
            id=call.id,
            function=TemplateToolCallFunction(
                index=call.index,
                name=call.name,
                arguments=TemplateArgs(
                    "template.templateArgs", None if call.arguments is None else dict(call.arguments)
                ),
            ),
        )
        for call in message.tool_calls
    )
    images = tuple(Bytes("api.ImageData", image) for image in message.images)
    return TemplateMessage(
        role=message.role,
        content=message.content,
        thinking=message.thinking,
        images=GoSlice("[]api.ImageData", images or None),
        tool_calls=GoSlice("[]template.templateToolCall", calls or None),
        tool_name=message.tool_name,
        tool_call_id=message.tool_call_id,
    )


def template_messages(messages: Sequence[Message] | None) -> GoSlice:
    """convertMessagesForTemplate (nil when there are no messages)."""
    items = tuple(template_message(message) for message in messages or ())
    return GoSlice("[]*template.templateMessage", items or None)
