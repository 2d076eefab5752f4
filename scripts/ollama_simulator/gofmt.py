"""Go's fmt for template output: Fprint of one value, Sprint, Sprintln and Sprintf.

Templates print every action through fmt.Fprint, and `print`/`printf` are fmt's too, so
this follows fmt/print.go's printArg, handleMethods and printValue: basic types by verb,
String() methods (for %v %s %q %x %X), maps in key order, structs as {f1 f2}, slices as
[a b], nil as <nil>, and bad verbs as %!d(string=x). Floats use strconv's shortest 'g'
(1e+06, not JSON's 1000000). What fmt would print but cannot be reproduced (a pointer's
address, %T, argument indexes) raises GoUnsupported instead of printing something else.
"""

from __future__ import annotations

import math
import re
import unicodedata
from decimal import Decimal
from typing import Any, Final

import attrs

from ollama_simulator.govalues import (
    MISSING,
    Bytes,
    Stringer,
    Uint8,
    kind,
    map_items,
    slice_items,
    type_name,
)


class GoUnsupported(Exception):
    """Go would produce output the simulator cannot reproduce faithfully."""


def _digits(value: float) -> tuple[str, int]:
    """Shortest round-trip decimal digits of |value| and the decimal point position (dp)."""
    _sign, digits, exponent = Decimal(repr(abs(value))).normalize().as_tuple()
    text = "".join(str(d) for d in digits)
    return text, len(text) + int(exponent)


def _format_e(neg: bool, digits: str, dp: int, decimals: int, mark: str) -> str:
    mantissa = digits[0] + ("." + digits[1:].ljust(decimals, "0")[:decimals] if decimals > 0 else "")
    exp = dp - 1 if digits != "0" else 0
    return f"{'-' if neg else ''}{mantissa}{mark}{'-' if exp < 0 else '+'}{abs(exp):02d}"


def _fixed(neg: bool, digits: str, dp: int, decimals: int) -> str:
    if dp <= 0:
        whole, fraction = "0", "0" * -dp + digits
    elif dp >= len(digits):
        whole, fraction = digits + "0" * (dp - len(digits)), ""
    else:
        whole, fraction = digits[:dp], digits[dp:]
    fraction = fraction[:decimals].ljust(decimals, "0")
    return ("-" if neg else "") + whole + ("." + fraction if fraction else "")


def _rounded(value: float, significant: int) -> tuple[str, int]:
    """|value| rounded to `significant` digits: the digits (trailing zeros dropped) and dp."""
    mantissa, _, exp = f"{abs(value):.{significant - 1}e}".partition("e")
    return mantissa.replace(".", "").rstrip("0") or "0", int(exp) + 1


def format_float(value: float, verb: str, precision: int) -> str:
    """strconv.FormatFloat(value, verb, precision, 64) for verbs e E f g G (precision -1: shortest)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    neg = math.copysign(1.0, value) < 0
    mark = "E" if verb in "EG" else "e"
    if verb == "f" and precision >= 0:  # both round the exact binary value correctly
        return ("-" if neg else "") + f"{abs(value):.{precision}f}"
    if verb in "eE" and precision >= 0:
        digits, dp = ("0", 1) if value == 0 else _rounded(value, precision + 1)
        return _format_e(neg, digits, dp, precision, mark)
    if value == 0:
        digits, dp = "0", 1
    elif precision < 0:
        digits, dp = _digits(value)
    else:
        digits, dp = _rounded(value, max(precision, 1))
    if verb in "eE":
        return _format_e(neg, digits, dp, len(digits) - 1, mark)
    if verb == "f":
        return _fixed(neg, digits, dp, max(len(digits) - dp, 0))
    eprec = 6 if precision < 0 else max(precision, 1)
    if precision >= 0 and eprec > len(digits) >= dp:
        eprec = len(digits)
    if dp - 1 < -4 or dp - 1 >= eprec:
        return _format_e(neg, digits, dp, len(digits) - 1, mark)
    return _fixed(neg, digits, dp, max(len(digits) - dp, 0))


_SIMPLE_ESCAPES: Final = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    "\\": "\\\\",
}


def _is_print(char: str) -> bool:
    """unicode.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    return char == " " or unicodedata.category(char)[0] in "LMNPS"


def quote(text: str, mark: str = '"') -> str:
    """strconv.Quote (or QuoteRune's body with mark "'")."""
    out = [mark]
    for char in text:
        code = ord(char)
        if char == mark:
            out.append("\\" + char)
        elif char in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[char])
        elif _is_print(char):
            out.append(char)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append(mark)
    return "".join(out)


@attrs.define
class _Spec:
    """One verb's flags, width and precision."""

    verb: str = "v"
    minus: bool = False
    plus: bool = False
    sharp: bool = False
    space: bool = False
    zero: bool = False
    width: int | None = None
    precision: int | None = None


def _pad(text: str, spec: _Spec, *, numeric: bool = False) -> str:
    if spec.width is None or len(text) >= spec.width:
        return text
    fill = spec.width - len(text)
    if spec.minus:
        return text + " " * fill
    if spec.zero and numeric:
        sign = text[0] if text[:1] in ("-", "+") else ""
        return sign + "0" * fill + text[len(sign) :]
    return " " * fill + text


class _Printer:
    """fmt's pp: one buffer, the verb-driven printing of arguments and nested values."""

    def __init__(self) -> None:
        self.out: list[str] = []

    def write(self, text: str) -> None:
        self.out.append(text)

    def bad_verb(self, spec: _Spec, arg: Any) -> None:
        if arg is None or arg is MISSING:
            self.write(f"%!{spec.verb}(<nil>)")
            return
        self.write(f"%!{spec.verb}({type_name(arg)}=")
        self.print_value(arg, _Spec(), 0)
        self.write(")")

    def handle_methods(self, value: Any, spec: _Spec) -> bool:
        if spec.sharp and spec.verb == "v":
            return False
        if spec.verb in "vsxXq" and isinstance(value, Stringer):
            self.fmt_string(value.go_string(), spec, value)
            return True
        return False

    def print_arg(self, arg: Any, spec: _Spec, *, deref: bool = False) -> None:
        if arg is None or arg is MISSING:
            if spec.verb == "v":
                self.write(_pad("<nil>", spec))
            else:
                self.bad_verb(spec, None)
            return
        if spec.verb == "T":
            raise GoUnsupported("%T")
        if not self.handle_methods(arg, spec):
            if getattr(arg, "go_pointer", False) and not deref:
                self.write("&")
            self.print_value(arg, spec, 0)

    def print_value(self, value: Any, spec: _Spec, depth: int) -> None:
        if depth > 0 and value is not None and value is not MISSING and self.handle_methods(value, spec):
            return
        match kind(value):
            case "invalid":
                if depth == 0:
                    self.write("<invalid reflect.Value>")
                elif spec.verb == "v":
                    self.write("<nil>")
                else:
                    self.bad_verb(spec, None)
            case "interface":
                self.write("<nil>")
            case "bool":
                self.fmt_bool(value, spec)
            case "int" | "uint8":
                self.fmt_integer(value, spec)
            case "float64":
                self.fmt_float(value, spec)
            case "string":
                self.fmt_string(value, spec, value)
            case "map":
                self.write("map[")
                for index, (key, item) in enumerate(map_items(value)):
                    if index:
                        self.write(" ")
                    self.print_value(key, spec, depth + 1)
                    self.write(":")
                    self.print_value(item, spec, depth + 1)
                self.write("]")
            case "struct":
                if depth > 0 and getattr(value, "go_pointer", False):
                    raise GoUnsupported("a pointer's address")
                self.write("{")
                for index, item in enumerate(value.values()):
                    if index:
                        self.write(" ")
                    self.print_value(item, spec, depth + 1)
                self.write("}")
            case "slice":
                if isinstance(value, Bytes) and spec.verb in "sqxX":
                    self.fmt_string(value.data.decode("utf-8", "replace"), spec, value)
                    return
                self.write("[")
                for index, item in enumerate(slice_items(value)):
                    if index:
                        self.write(" ")
                    self.print_value(item, spec, depth + 1)
                self.write("]")
            case other:
                raise GoUnsupported(f"printing a {other}")

    def fmt_bool(self, value: bool, spec: _Spec) -> None:
        if spec.verb in "tv":
            self.write(_pad("true" if value else "false", spec))
        else:
            self.bad_verb(spec, value)

    def fmt_integer(self, value: int, spec: _Spec) -> None:
        verb = spec.verb
        number = int(value)
        if verb == "c":
            self.write(_pad(chr(number), spec))
            return
        if verb == "q":
            self.write(_pad(quote(chr(number), "'"), spec))
            return
        if verb == "U":
            self.write(_pad(f"U+{number:04X}", spec))
            return
        bases = {"v": "d", "d": "d", "b": "b", "o": "o", "O": "o", "x": "x", "X": "X"}
        if verb not in bases:
            self.bad_verb(spec, value)
            return
        text = format(abs(number), bases[verb])
        if verb == "O":
            text = "0o" + text
        elif spec.sharp and verb in "xX":
            text = ("0x" if verb == "x" else "0X") + text
        elif spec.sharp and verb == "o":
            text = "0" + text
        if spec.precision is not None:
            text = text.rjust(spec.precision, "0")
        sign = "-" if number < 0 else ("+" if spec.plus else (" " if spec.space else ""))
        self.write(_pad(sign + text, spec, numeric=spec.precision is None))

    def fmt_float(self, value: float, spec: _Spec) -> None:
        verb = {"v": "g", "F": "f"}.get(spec.verb, spec.verb)
        if verb not in "gGeEf":
            self.bad_verb(spec, value)
            return
        precision = spec.precision if spec.precision is not None else (6 if verb in "eEf" else -1)
        text = format_float(value, verb, precision)
        if spec.plus and not text.startswith("-"):
            text = "+" + text
        self.write(_pad(text, spec, numeric=True))

    def fmt_string(self, text: str, spec: _Spec, arg: Any) -> None:
        verb = spec.verb
        if spec.precision is not None:
            text = text[: spec.precision]
        if verb == "v" and spec.sharp:
            self.write(_pad(quote(text), spec))
        elif verb in "vs":
            self.write(_pad(text, spec))
        elif verb == "q":
            self.write(_pad(quote(text), spec))
        elif verb in "xX":
            data = text.encode("utf-8", "surrogatepass").hex()
            self.write(_pad(data.upper() if verb == "X" else data, spec))
        else:
            self.bad_verb(spec, arg)


def fprint(value: Any) -> str:
    """fmt.Fprint of the one value text/template prints for an action."""
    printer = _Printer()
    printer.print_arg(value, _Spec(), deref=True)
    return "".join(printer.out)


def sprint(*args: Any) -> str:
    """fmt.Sprint: operands joined with a space when neither side is a string."""
    printer = _Printer()
    for index, arg in enumerate(args):
        if index and not isinstance(arg, str) and not isinstance(args[index - 1], str):
            printer.write(" ")
        printer.print_arg(arg, _Spec())
    return "".join(printer.out)


def sprintln(*args: Any) -> str:
    """fmt.Sprintln: operands always joined with a space, then a newline."""
    printer = _Printer()
    for index, arg in enumerate(args):
        if index:
            printer.write(" ")
        printer.print_arg(arg, _Spec())
    printer.write("\n")
    return "".join(printer.out)


_VERB_RE: Final = re.compile(r"%([-+# 0]*)(\d+)?(?:\.(\d*))?(.)?", re.DOTALL)


def sprintf(format_text: str, *args: Any) -> str:
    """fmt.Sprintf for flags, width, precision and the verbs fmt defines for basic values."""
    printer = _Printer()
    position = 0
    used = 0
    while True:
        start = format_text.find("%", position)
        if start < 0:
            printer.write(format_text[position:])
            break
        printer.write(format_text[position:start])
        match = _VERB_RE.match(format_text, start)
        if match is None:  # the pattern matches any "%", so only for safety
            raise GoUnsupported("printf format")
        flags, width, precision, verb = match.groups()
        position = match.end()
        if verb is None:
            printer.write("%!(NOVERB)")
            break
        if verb == "%":
            printer.write("%")
            continue
        if verb in "[*":
            raise GoUnsupported("printf argument indexes and * widths")
        spec = _Spec(
            verb=verb,
            minus="-" in flags,
            plus="+" in flags,
            sharp="#" in flags,
            space=" " in flags,
            zero="0" in flags and "-" not in flags,
            width=int(width) if width else None,
            precision=(int(precision) if precision else 0) if precision is not None else None,
        )
        if used >= len(args):
            printer.write(f"%!{verb}(MISSING)")
            continue
        if spec.sharp and verb == "v" and not _is_basic(args[used]):
            raise GoUnsupported("%#v of a composite value")
        printer.print_arg(args[used], spec)
        used += 1
    if used < len(args):
        printer.write("%!(EXTRA ")
        for index, arg in enumerate(args[used:]):
            if index:
                printer.write(", ")
            printer.write(f"{type_name(arg)}=")
            printer.print_arg(arg, _Spec())
        printer.write(")")
    return "".join(printer.out)


def _is_basic(value: Any) -> bool:
    return isinstance(value, bool | int | float | str | Uint8) or value is None
