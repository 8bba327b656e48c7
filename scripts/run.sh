#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the main job offline on the embedded
# dataset (scikit-learn's digits). Outputs go to ${OUTPUT_DIR:-outputs/}.
source "$(dirname "$0")/_env.sh" examples
OUT="${OUTPUT_DIR:-$ROOT/outputs}"
python -m scripts.train_digits --output-dir "$OUT/digits" "$@"
echo "Everything is under $OUT"
