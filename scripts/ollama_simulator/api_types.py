"""Ollama's api.Message, api.ToolCall and api.Tool, bound from request JSON as Go binds them.

Go's encoding/json decides what reaches the template: struct fields match keys case-
insensitively (the last one wins), unknown keys are dropped, Message.UnmarshalJSON lowers
the role, tool schemas keep only api.ToolProperty's fields (anyOf, type, items,
description, enum, properties, required), `properties` and tool-call `arguments` are
ordered maps (internal/orderedmap), and everything typed `any` decodes as generic JSON
(numbers become float64, objects Go maps). api/types.go is the reference.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, ClassVar, Final

import attrs

from ollama_simulator.gojson import Binder, BindError, GoObject, _json_kind
from ollama_simulator.govalues import GoPointer, GoSlice, GoStruct, OrderedMap, marshal

_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def go_text(text: str) -> str:
    """A JSON string as Go decodes it: unpaired surrogate escapes become U+FFFD."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def go_any(value: Any) -> Any:
    """Generic JSON as Go decodes it into `any`: float64 numbers, Go maps, []interface {}."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return go_text(value)
    if isinstance(value, list):
        return [go_any(item) for item in value]
    return {go_text(key): go_any(item) for key, item in value.items()}


def _ordered_any(value: Any) -> OrderedMap:
    """An orderedmap[string]any: insertion-ordered keys, generic values."""
    return OrderedMap((go_text(key), go_any(item)) for key, item in value.items())


@attrs.frozen
class ToolCall:
    """api.ToolCall; `arguments` None is the zero ToolCallFunctionArguments (no map)."""

    id: str = ""
    index: int = 0
    name: str = ""
    arguments: OrderedMap | None = None


@attrs.frozen
class Message:
    """api.Message."""

    role: str
    content: str = ""
    thinking: str = ""
    images: tuple[bytes, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    tool_name: str = ""
    tool_call_id: str = ""


class PropertyType(GoSlice):
    """api.PropertyType: one type marshals as a string, several as an array; String() joins them."""

    def go_string(self) -> str:
        items = self.items or ()
        if not items:
            return ""
        if len(items) == 1:
            return str(items[0])
        return "[" + " ".join(items) + "]"

    def marshal_json(self) -> str:
        items = self.items or ()
        return marshal(items[0]) if len(items) == 1 else marshal(list(items))


_TS_TYPES: Final = {
    "string": "string",
    "number": "number",
    "integer": "number",
    "boolean": "boolean",
    "array": "any[]",
    "object": "Record<string, any>",
    "null": "null",
}


_NO_PROPERTIES: Final = GoSlice("[]api.ToolProperty", None)
_NO_TYPE: Final = PropertyType("api.PropertyType", None)
_NO_ENUM: Final = GoSlice("[]interface {}", None)
_NO_STRINGS: Final = GoSlice("[]string", None)


@attrs.frozen
class ToolProperty(GoStruct):
    """api.ToolProperty."""

    go_type: ClassVar[str] = "api.ToolProperty"
    go_any_fields: ClassVar[frozenset[str]] = frozenset({"Items"})
    go_fields: ClassVar[tuple[str, ...]] = (
        "AnyOf",
        "Type",
        "Items",
        "Description",
        "Enum",
        "Properties",
        "Required",
    )

    any_of: GoSlice = _NO_PROPERTIES
    type: PropertyType = _NO_TYPE
    items: Any = None
    description: str = ""
    enum: GoSlice = _NO_ENUM
    properties: PropertiesMap | None = None
    required: GoSlice = _NO_STRINGS

    def json_members(self) -> list[tuple[str, Any]]:
        members: list[tuple[str, Any]] = []
        if len(self.any_of):
            members.append(("anyOf", self.any_of))
        if len(self.type):
            members.append(("type", self.type))
        if self.items is not None:
            members.append(("items", self.items))
        if self.description:
            members.append(("description", self.description))
        if len(self.enum):
            members.append(("enum", self.enum))
        if self.properties is not None:
            members.append(("properties", self.properties))
        if len(self.required):
            members.append(("required", self.required))
        return members

    def to_typescript(self) -> str:
        """ToolProperty.ToTypeScriptType."""
        if len(self.any_of):
            return " | ".join(item.to_typescript() for item in self.any_of)
        types = tuple(self.type)
        if not types:
            return "any"
        return " | ".join(_TS_TYPES.get(t, "any") for t in types)

    def go_methods(self) -> dict[str, Any]:
        return {"ToTypeScriptType": self.to_typescript}


@attrs.frozen
class PropertiesMap(GoPointer):
    """A non-nil *api.ToolPropertiesMap: marshals in insertion order."""

    go_type: ClassVar[str] = "*api.ToolPropertiesMap"

    items: OrderedMap

    def marshal_json(self) -> str:
        return marshal(self.items)


@attrs.frozen
class ToolFunctionParameters:
    """api.ToolFunctionParameters; `properties` None is a nil *ToolPropertiesMap."""

    type: str = ""
    defs: Any = None
    items: Any = None
    required: tuple[str, ...] | None = None
    properties: OrderedMap | None = None


@attrs.frozen
class Tool:
    """api.Tool with its api.ToolFunction."""

    type: str = ""
    items: Any = None
    name: str = ""
    description: str = ""
    parameters: ToolFunctionParameters = ToolFunctionParameters()


def _unmarshal_error(value: Any, go_type: str) -> BindError:
    return BindError(f"json: cannot unmarshal {_json_kind(value)} into Go value of type {go_type}")


def _strings(value: Any, go_type: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _unmarshal_error(value, go_type)
    return tuple(go_text(item) for item in value)


def bind_property_type(value: Any) -> PropertyType:
    """PropertyType.UnmarshalJSON: a string (null counts as "") or an array of strings."""
    if value is None or isinstance(value, str):
        return PropertyType("api.PropertyType", (go_text(value or ""),))
    return PropertyType("api.PropertyType", _strings(value, "[]string"))


def bind_property(value: Any) -> ToolProperty:
    """One api.ToolProperty (unknown keys such as "default" or "minimum" are dropped)."""
    if value is None:
        return ToolProperty()
    if not isinstance(value, GoObject):
        raise _unmarshal_error(value, "api.ToolProperty")
    folded = value.folded
    any_of = folded.get("anyof")
    if any_of is not None and not isinstance(any_of, list):
        raise _unmarshal_error(any_of, "[]api.ToolProperty")
    enum = folded.get("enum")
    if enum is not None and not isinstance(enum, list):
        raise _unmarshal_error(enum, "[]interface {}")
    description = folded.get("description")
    if description is not None and not isinstance(description, str):
        raise _unmarshal_error(description, "string")
    properties = bind_properties(folded.get("properties"))
    return ToolProperty(
        any_of=GoSlice("[]api.ToolProperty", None if any_of is None else tuple(map(bind_property, any_of))),
        type=bind_property_type(folded["type"])
        if "type" in folded
        else PropertyType("api.PropertyType", None),
        items=go_any(folded.get("items")),
        description=go_text(description or ""),
        enum=GoSlice("[]interface {}", None if enum is None else tuple(go_any(item) for item in enum)),
        properties=None if properties is None else PropertiesMap(properties),
        required=GoSlice("[]string", _strings(folded.get("required"), "[]string")),
    )


def bind_properties(value: Any) -> OrderedMap | None:
    """A *ToolPropertiesMap: null is nil, an object keeps its key order."""
    if value is None:
        return None
    if not isinstance(value, GoObject):
        raise _unmarshal_error(value, "api.ToolPropertiesMap")
    return OrderedMap((go_text(key), bind_property(item)) for key, item in value.items())


def bind_parameters(value: Any, bind: Binder) -> ToolFunctionParameters:
    """api.ToolFunctionParameters from a JSON Schema object."""
    obj = bind.element(value, "parameters", "api.ToolFunctionParameters")
    inner = bind.nested("ToolFunctionParameters", "parameters")
    return ToolFunctionParameters(
        type=go_text(inner.string(obj, "type") or ""),
        defs=go_any(obj.folded.get("$defs")),
        items=go_any(obj.folded.get("items")),
        required=_strings(obj.folded.get("required"), "[]string"),
        properties=bind_properties(obj.folded.get("properties")),
    )


def bind_tool(value: Any, bind: Binder) -> Tool:
    """One api.Tool of a request's `tools`."""
    obj = bind.element(value, "tools", "api.Tool")
    tool = bind.nested("Tool", "tools")
    function = tool.object(obj, "function", "api.ToolFunction") or GoObject()
    inner = tool.nested("ToolFunction", "function")
    return Tool(
        type=go_text(tool.string(obj, "type") or ""),
        items=go_any(obj.folded.get("items")),
        name=go_text(inner.string(function, "name") or ""),
        description=go_text(inner.string(function, "description") or ""),
        parameters=bind_parameters(function.folded.get("parameters"), inner),
    )


def bind_tools(values: list[Any] | None, bind: Binder) -> tuple[Tool, ...] | None:
    """A request's api.Tools (None when absent or null)."""
    if values is None:
        return None
    return tuple(bind_tool(value, bind) for value in values)


def bind_arguments(value: Any) -> OrderedMap | None:
    """ToolCallFunctionArguments.UnmarshalJSON: an ordered map (null leaves it unset)."""
    if value is None:
        return None
    if not isinstance(value, GoObject):
        raise _unmarshal_error(value, "api.ToolCallFunctionArguments")
    return _ordered_any(value)


def bind_tool_calls(values: list[Any] | None, bind: Binder) -> tuple[ToolCall, ...]:
    """api.Message.tool_calls."""
    calls: list[ToolCall] = []
    for value in values or ():
        obj = bind.element(value, "tool_calls", "api.ToolCall")
        call = bind.nested("ToolCall", "tool_calls")
        function = call.object(obj, "function", "api.ToolCallFunction") or GoObject()
        inner = call.nested("ToolCallFunction", "function")
        calls.append(
            ToolCall(
                id=go_text(call.string(obj, "id") or ""),
                index=inner.integer(function, "index") or 0,
                name=go_text(inner.string(function, "name") or ""),
                arguments=bind_arguments(function.folded.get("arguments")),
            )
        )
    return tuple(calls)


def decode_images(values: list[Any] | None, bind: Binder, key: str = "images") -> tuple[bytes, ...]:
    """[]api.ImageData: base64 strings, decoded as Go's []byte unmarshalling does."""
    images: list[bytes] = []
    for image in values or ():
        if not isinstance(image, str):
            raise BindError(
                f"json: cannot unmarshal {_json_kind(image)} into Go struct field "
                f"{bind.struct}.{bind.path}{key} of type api.ImageData"
            )
        try:
            images.append(base64.b64decode(image, validate=True))
        except (binascii.Error, ValueError):
            raise BindError("illegal base64 data at input byte 0") from None
    return tuple(images)


def bind_message(value: Any, bind: Binder) -> Message:
    """One api.Message of /api/chat (Message.UnmarshalJSON lowers the role)."""
    obj = bind.element(value, "messages", "api.Message")
    inner = bind.nested("Message", "messages")
    return Message(
        role=go_text(inner.string(obj, "role") or "").lower(),
        content=go_text(inner.string(obj, "content") or ""),
        thinking=go_text(inner.string(obj, "thinking") or ""),
        images=decode_images(inner.array(obj, "images", "[]api.ImageData"), inner),
        tool_calls=bind_tool_calls(inner.array(obj, "tool_calls", "[]api.ToolCall"), inner),
        tool_name=go_text(inner.string(obj, "tool_name") or ""),
        tool_call_id=go_text(inner.string(obj, "tool_call_id") or ""),
    )


def bind_messages(values: list[Any] | None, bind: Binder) -> tuple[Message, ...]:
    return tuple(bind_message(value, bind) for value in values or ())
