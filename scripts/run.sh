#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the main job offline on the embedded
# dataset (scikit-learn's digits): trains the classifier and the GAN, then
# runs the quick speed benchmark. Outputs go to ${OUTPUT_DIR:-outputs/}.
source "$(dirname "$0")/_env.sh" examples
OUT="${OUTPUT_DIR:-$ROOT/outputs}"
python -m scripts.train_classifier --output-dir "$OUT/classifier" "$@"
python -m scripts.train_gan --output-dir "$OUT/gan" --verbose 2
python -m benchmarks.training_speed --quick --output-dir "$OUT/benchmark"
echo "Everything is under $OUT"
