#!/usr/bin/env bash
# Set up (first run only) and run the full test suite.
. "$(dirname "${BASH_SOURCE[0]}")/env.sh" test
cd "$ROOT"
exec "$VENV/bin/pytest" "$@"
