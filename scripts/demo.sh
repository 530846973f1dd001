#!/usr/bin/env bash
# Set up (first run only) and run the demo: optimize the bundled MiniLM with the default
# recipe, export to ONNX, run it in ONNX Runtime, print a before/after table.
# Arguments go to `python -m graphopt.demo`, e.g. `--data my_texts.jsonl --data-column body`
# to calibrate, verify and measure fidelity on your own text instead of the standard library's.
. "$(dirname "${BASH_SOURCE[0]}")/env.sh" demo
exec "$VENV/bin/python" -m graphopt.demo "$@"
