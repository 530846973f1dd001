"""Re-running a crash reproducer: ``graphopt repro <folder>``.

The folder (:mod:`graphopt.reproducer`) holds the program the pass failed on, the pass's
config and the whole pass context; re-running calls the same pass on the same program with
the same context, so the original exception surfaces again.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from graphopt.api import default_services
from graphopt.context import PassContext
from graphopt.passbase import Pass, PassResult
from graphopt.pipeline import get_pass_class
from graphopt.program import Program
from graphopt.reproducer import read_reproducer


def load_reproducer(folder: str | Path) -> tuple[Program, Pass, PassContext]:
    """(program, pass, context) recorded in a reproducer folder."""
    program, ctx, info = read_reproducer(folder)
    importlib.import_module(info["module"])  # a plugin pass registers itself on import
    pass_obj = get_pass_class(info["pass"])(optional=bool(info.get("optional", False)), **info["config"])
    return program, pass_obj, ctx.replace(services=default_services())


def rerun_reproducer(folder: str | Path) -> PassResult:
    """Run the recorded pass on the recorded program and context; the original exception surfaces."""
    program, pass_obj, ctx = load_reproducer(folder)
    return pass_obj(program, ctx)
