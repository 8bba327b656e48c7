#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the lint and the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x
# Two test processes, taking tests one at a time (the files that share
# module fixtures go whole to one: tests/conftest.py); `-n 0` runs
# them in this process.
source "$(dirname "$0")/_env.sh" dev
ruff check fitcustom tests scripts benchmarks
python -m pytest -n 2 --dist loadscope "$@"
