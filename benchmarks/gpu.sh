#!/bin/sh
# The GPU table (benchmarks/gpu.py) from any folder; PYTHON picks the interpreter, e.g. .venv/bin/python.
cd "$(dirname "$0")/.." && exec "${PYTHON:-python}" -m benchmarks.gpu "$@"
