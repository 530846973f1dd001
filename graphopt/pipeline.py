"""Textual pipelines that print back to themselves.

Grammar (whitespace is ignored)::

    pipeline := item ("," item)*
    item     := NAME ["{" option ("," option)* "}"]        a registered pass
              | GROUP "(" pipeline ")" ["{" options "}"]     a nested manager
    GROUP    := "pipeline" | "fixpoint"
    option   := KEY "=" value
    value    := number | true | false | word | "quoted" | "[" [value ("," value)*] "]"

``parse_pipeline(str(p)) == p`` holds for every pipeline built from registered passes:
options print in declaration order, only where they differ from the defaults.
"""

from __future__ import annotations

import json
import re
from typing import Any

from graphopt.errors import PipelineSyntaxError

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/*]*")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf|nan)")
GROUPS = ("pipeline", "fixpoint")


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if hasattr(value, "value") and not isinstance(value, str):  # enums
        value = value.value
    text = str(value)
    if _WORD.fullmatch(text) and text not in ("true", "false", "inf", "nan"):
        return text
    return json.dumps(text)


def format_options(options: dict[str, Any]) -> str:
    if not options:
        return ""
    return "{" + ",".join(f"{k}={format_value(v)}" for k, v in options.items()) + "}"


def format_pass(p) -> str:
    from graphopt.manager import PassManager

    if isinstance(p, PassManager):
        return p.text()
    return p.name + format_options(p.options())


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    # -- lexical helpers ----------------------------------------------------------------
    def error(self, message: str) -> PipelineSyntaxError:
        pointer = " " * self.pos + "^"
        return PipelineSyntaxError(f"{message} at position {self.pos}:\n  {self.text}\n  {pointer}")

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise self.error(f"expected '{char}'")
        self.pos += 1

    def word(self) -> str:
        self.skip()
        m = _WORD.match(self.text, self.pos)
        if not m:
            raise self.error("expected a name")
        self.pos = m.end()
        return m.group(0)

    # -- grammar ------------------------------------------------------------------------
    def pipeline(self, closing: str = "") -> list:
        items = [self.item()]
        while self.peek() == ",":
            self.pos += 1
            items.append(self.item())
        if self.peek() != closing:
            raise self.error("expected ',' between passes" if closing == "" else f"expected ',' or '{closing}'")
        return items

    def item(self):
        from graphopt.manager import PassManager
        from graphopt.passbase import create_pass

        name = self.word()
        if name in GROUPS and self.peek() == "(":
            self.pos += 1
            passes = self.pipeline(closing=")")
            self.expect(")")
            options = self.options()
            return PassManager(passes, fixpoint=(name == "fixpoint"), **options)
        return create_pass(name, **self.options())

    def options(self) -> dict[str, Any]:
        if self.peek() != "{":
            return {}
        self.pos += 1
        options: dict[str, Any] = {}
        if self.peek() == "}":
            self.pos += 1
            return options
        while True:
            key = self.word()
            self.expect("=")
            if key in options:
                raise self.error(f"option '{key}' given twice")
            options[key] = self.value()
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect("}")
            return options

    def value(self) -> Any:
        char = self.peek()
        if char == "[":
            self.pos += 1
            values: list[Any] = []
            if self.peek() == "]":
                self.pos += 1
                return values
            while True:
                values.append(self.value())
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("]")
                return values
        if char == '"':
            try:
                decoded, end = json.JSONDecoder().raw_decode(self.text, self.pos)
            except json.JSONDecodeError:
                raise self.error("unterminated string") from None
            self.pos = end
            return decoded
        if char and (char.isdigit() or char in "+-."):
            m = _NUMBER.match(self.text, self.pos)
            if not m:
                raise self.error("expected a number")
            self.pos = m.end()
            token = m.group(0)
            return int(token) if re.fullmatch(r"[+-]?\d+", token) else float(token)
        word = self.word()
        return {"true": True, "false": False, "inf": float("inf"), "nan": float("nan")}.get(word, word)


def parse_pipeline(text: str):
    """Parse a textual pipeline into a PassManager (unknown passes and options fail here)."""
    from graphopt.manager import PassManager

    if not text or not text.strip():
        return PassManager([])
    parser = _Parser(text)
    passes = parser.pipeline()
    if parser.peek():
        raise parser.error("unexpected text")
    return PassManager(passes)
