"""Go values as text/template sees them: kinds, type names, truth, zero values and json.Marshal.

Templates execute over Go values, so the interpreter needs the distinctions Go's reflect
makes and Python does not: a missing value (an invalid reflect.Value, printed "<no value>")
versus a nil interface, a nil slice versus an empty one, an int versus a float64, a map
whose keys Go sorts versus an ordered map that marshals in insertion order, and types with
a String() method. Plain Python values stand for Go's dynamic JSON values (`any`): str,
bool, int (Go int), float (float64), None (nil), dict (map[string]interface {}) and list
([]interface {}).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar, Final, Protocol, cast, runtime_checkable

import attrs

from ollama_simulator.gojson import _go_string, go_float


class _Missing:
    """An invalid reflect.Value: what a missing map key becomes after a pipeline step."""

    _instance: ClassVar[_Missing | None] = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()


class Uint8(int):
    """A byte, as `index` of a string yields it (reflect.Uint8)."""


@runtime_checkable
class Stringer(Protocol):
    """A Go type with a value-receiver String() method (fmt and text/template call it)."""

    def go_string(self) -> str: ...


class GoStruct:
    """A Go struct: `go_fields` names its exported fields in declaration order.

    Subclasses are attrs classes whose attributes follow `go_fields` one to one.
    """

    go_type: ClassVar[str]
    go_fields: ClassVar[tuple[str, ...]]
    # Fields of type `any`: a value read from one sits in an interface (as errors name it).
    go_any_fields: ClassVar[frozenset[str]] = frozenset()

    def field(self, name: str) -> Any:
        try:
            index = self.go_fields.index(name)
        except ValueError:
            raise KeyError(name) from None
        return getattr(self, _attributes(self)[index].name)

    def values(self) -> Iterator[Any]:
        for attribute in _attributes(self):
            yield getattr(self, attribute.name)

    def json_members(self) -> Iterable[tuple[str, Any]]:
        """The members json.Marshal writes, omitempty applied (default: every field by name)."""
        return zip(self.go_fields, self.values(), strict=True)


def _attributes(value: GoStruct) -> tuple[attrs.Attribute[Any], ...]:
    return tuple(attrs.fields(cast("type[attrs.AttrsInstance]", type(value))))


@attrs.frozen
class GoSlice:
    """A typed Go slice; `items` None is a nil slice (len 0, marshals as null)."""

    go_type: str
    items: tuple[Any, ...] | None

    def __len__(self) -> int:
        return len(self.items or ())

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items or ())


@attrs.frozen
class GoMap:
    """A typed Go map with string keys; `zero` is its element type's zero value."""

    go_type: str
    items: Mapping[str, Any] | None
    zero: Any = None

    def __len__(self) -> int:
        return len(self.items or {})

    def sorted_items(self) -> list[tuple[str, Any]]:
        return sorted((self.items or {}).items())


class OrderedMap(dict[str, Any]):
    """Ollama's orderedmap (tool properties, tool call arguments): JSON keeps insertion order."""


@attrs.frozen
class Bytes:
    """A []byte (api.ImageData): fmt prints its numbers, json.Marshal base64."""

    go_type: str
    data: bytes


class GoPointer:
    """A non-nil pointer that is not a *struct the template dereferences (fmt prints its address)."""

    go_type: ClassVar[str]


def kind(value: Any) -> str:
    """reflect.Kind of a value, in lower case ("invalid" for MISSING, "interface" for nil)."""
    if value is MISSING:
        return "invalid"
    if value is None:
        return "interface"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, Uint8):
        return "uint8"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, GoSlice | list | tuple | Bytes):
        return "slice"
    if isinstance(value, GoMap | dict):
        return "map"
    if isinstance(value, GoStruct):
        return "struct"
    if isinstance(value, GoPointer):
        return "pointer"
    raise TypeError(f"not a Go value: {type(value).__name__}")


def type_name(value: Any) -> str:
    """reflect.Type.String() of a value."""
    match kind(value):
        case "invalid" | "interface":
            return "interface {}"
        case "slice":
            return value.go_type if isinstance(value, GoSlice | Bytes) else "[]interface {}"
        case "map":
            if isinstance(value, GoMap):
                return value.go_type
            return "map[string]interface {}"
        case "struct" | "pointer":
            return str(value.go_type)
        case other:
            return other


def go_len(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, Bytes):
        return len(value.data)
    return len(value)


def is_true(value: Any) -> bool:
    """text/template's isTrue: empty and zero values are false, structs always true."""
    match kind(value):
        case "invalid" | "interface":
            return False
        case "bool":
            return bool(value)
        case "int" | "uint8" | "float64":
            return bool(value != 0)
        case "string" | "slice" | "map":
            return go_len(value) > 0
        case _:
            return True


def map_items(value: Any) -> list[tuple[str, Any]]:
    """A map's entries in the order range and fmt visit them (fmtsort: keys sorted)."""
    if isinstance(value, GoMap):
        return value.sorted_items()
    return sorted(value.items())


def map_lookup(value: Any, key: str) -> Any:
    """m[key], or the element type's zero value (missingkey=zero)."""
    if isinstance(value, GoMap):
        return (value.items or {}).get(key, value.zero)
    return value.get(key)


def slice_items(value: Any) -> tuple[Any, ...]:
    if isinstance(value, Bytes):
        return tuple(Uint8(b) for b in value.data)
    return tuple(value)


def _marshal(value: Any, out: list[str]) -> None:
    custom = getattr(value, "marshal_json", None)
    if custom is not None:  # a MarshalJSON method
        out.append(custom())
    elif value is None or value is MISSING:
        out.append("null")
    elif isinstance(value, bool):
        out.append("true" if value else "false")
    elif isinstance(value, int):
        out.append(str(int(value)))
    elif isinstance(value, float):
        out.append(go_float(value))
    elif isinstance(value, str):
        out.append(_go_string(value))
    elif isinstance(value, Bytes):
        out.append('"' + base64.b64encode(value.data).decode("ascii") + '"')
    elif isinstance(value, GoSlice):
        if value.items is None:
            out.append("null")
        else:
            _marshal_array(value.items, out)
    elif isinstance(value, list | tuple):
        _marshal_array(value, out)
    elif isinstance(value, GoMap):
        if value.items is None:
            out.append("null")
        else:
            _marshal_object(value.sorted_items(), out)
    elif isinstance(value, OrderedMap):
        _marshal_object(value.items(), out)
    elif isinstance(value, dict):
        _marshal_object(sorted(value.items()), out)
    elif isinstance(value, GoStruct):
        _marshal_object(value.json_members(), out)
    else:
        raise TypeError(f"cannot marshal {type(value).__name__}")


def _marshal_array(items: Iterable[Any], out: list[str]) -> None:
    out.append("[")
    for index, item in enumerate(items):
        if index:
            out.append(",")
        _marshal(item, out)
    out.append("]")


def _marshal_object(members: Iterable[tuple[str, Any]], out: list[str]) -> None:
    out.append("{")
    for index, (key, item) in enumerate(members):
        if index:
            out.append(",")
        out.append(_go_string(key))
        out.append(":")
        _marshal(item, out)
    out.append("}")


def marshal(value: Any) -> str:
    """json.Marshal as a string: HTML-escaped, Go maps sorted, structs in field order."""
    out: list[str] = []
    _marshal(value, out)
    return "".join(out)
