#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the lint and the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x
source "$(dirname "$0")/_env.sh" dev
ruff check fitcustom tests scripts benchmarks
python -m pytest "$@"
