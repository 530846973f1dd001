"""Textual pipelines that print back to themselves.

Grammar (whitespace is ignored)::

    pipeline := item ("," item)*
    item     := NAME ["{" option ("," option)* "}"] ["?"]        a registered pass
              | GROUP "(" pipeline ")" ["{" options "}"] ["?"]     a nested manager
    GROUP    := "pipeline" | "fixpoint"
    option   := KEY "=" value
    value    := number | true | false | word | "quoted" | "[" [value ("," value)*] "]"

A trailing ``?`` marks the item optional: that it changed nothing is not a failure.
``parse_pipeline(str(p)) == p`` holds for every pipeline built from registered passes:
options print in declaration order, only where they differ from the defaults.

This module is also where pass names are looked up: it imports the built-in passes
(``graphopt.passes``), which the layers below it must not.
"""

from __future__ import annotations

import json
import re
from typing import Any

import graphopt.passes  # noqa: F401  (registers the built-in passes)
from graphopt.errors import PipelineSyntaxError, UnknownPassError
from graphopt.manager import PassManager
from graphopt.passbase import WORD as _WORD
from graphopt.passbase import Pass, lookup_pass, registry_snapshot

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf|nan)")
GROUPS = ("pipeline", "fixpoint")


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass class by name (built-ins and plugins loaded so far)."""
    return registry_snapshot()


def get_pass_class(name: str) -> type[Pass]:
    cls = lookup_pass(name)
    if cls is None:
        raise UnknownPassError(f"unknown pass '{name}'; available passes: {', '.join(registry_snapshot())}")
    return cls


def create_pass(name: str, *, optional: bool = False, **options: Any) -> Pass:
    return get_pass_class(name)(optional=optional, **options)


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

    def item(self) -> Pass:
        name = self.word()
        if name in GROUPS and self.peek() == "(":
            self.pos += 1
            passes = self.pipeline(closing=")")
            self.expect(")")
            options = self.options()
            return PassManager(passes, fixpoint=(name == "fixpoint"), optional=self.optional_mark(), **options)
        options = self.options()
        return create_pass(name, optional=self.optional_mark(), **options)

    def optional_mark(self) -> bool:
        if self.peek() == "?":
            self.pos += 1
            return True
        return False

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


def parse_pipeline(text: str) -> PassManager:
    """Parse a textual pipeline into a PassManager (unknown passes and options fail here)."""
    if not text or not text.strip():
        return PassManager([])
    parser = _Parser(text)
    passes = parser.pipeline()
    if parser.peek():
        raise parser.error("unexpected text")
    return PassManager(passes)


def as_manager(pipeline: Any) -> PassManager:
    """A PassManager from a pipeline string, a PassManager, a pass, or a list of passes."""
    if isinstance(pipeline, PassManager):
        return pipeline
    if isinstance(pipeline, Pass):
        return PassManager([pipeline])
    if isinstance(pipeline, str):
        return parse_pipeline(pipeline)
    if isinstance(pipeline, (list, tuple)):
        items: list[Pass] = []
        for item in pipeline:
            items.extend(as_manager(item).passes if isinstance(item, str) else [item])
        return PassManager(items)
    raise TypeError(f"a pipeline is a string, a Pass or a list of passes, not {type(pipeline).__name__}")
