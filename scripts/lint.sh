#!/usr/bin/env bash
# Set up (first run only) and check the code: ruff (lint + import order), mypy (types) and
# import-linter (the layers: passes load no exporter or runtime, no import cycles).
. "$(dirname "${BASH_SOURCE[0]}")/env.sh" test
cd "$ROOT"
"$VENV/bin/ruff" check graphopt tests benchmarks scripts
"$VENV/bin/mypy"
"$VENV/bin/lint-imports"
