#!/usr/bin/env bash
# The main job, offline on the embedded dataset (scikit-learn's digits):
# trains a classifier and a GAN, measures training speed, and ends with a
# summary. Sets up .venv first if needed. Outputs go to
# ${OUTPUT_DIR:-outputs/}.
#
#   bash scripts/run.sh                   everything; a part that finished
#                                         before is kept, an interrupted one
#                                         resumes
#   bash scripts/run.sh --overwrite       everything, from scratch
#   bash scripts/run.sh PART [OPTIONS]    one part with its own options:
#       classifier  (e.g. bash scripts/run.sh classifier --model cnn)
#       gan         (e.g. bash scripts/run.sh gan --epochs 20)
#       benchmark   (e.g. bash scripts/run.sh benchmark --workloads mlp)
#       summary     (what the last runs gave)
#   bash scripts/run.sh PART --help       that part's options
case "${1:-}" in
    classifier|gan|benchmark|summary|""|--overwrite) ;;
    *)
        echo "error: unknown part or option '$1'; use classifier, gan," \
            "benchmark, summary or --overwrite (see the top of $0)" >&2
        exit 2
        ;;
esac
if [ "${1:-}" = "--overwrite" ] && [ $# -gt 1 ]; then
    echo "error: after --overwrite nothing else is taken; options go to one" \
        "part, e.g. bash $0 gan --epochs 20" >&2
    exit 2
fi
source "$(dirname "$0")/_env.sh" examples
OUT="${OUTPUT_DIR:-$ROOT/outputs}"

source "$ROOT/scripts/_forward.sh"
classifier() { forward python -m scripts.train_classifier --output-dir "$OUT/classifier" "$@"; }
gan() { forward python -m scripts.train_gan --output-dir "$OUT/gan" "$@"; }
benchmark() { python -m benchmarks.training_speed --quick --output-dir "$OUT/benchmark" "$@"; }
summary() { python -m scripts.summary --output-dir "$OUT" "$@"; }

case "${1:-}" in
    classifier|gan|benchmark|summary)
        part="$1"
        shift
        "$part" "$@"
        exit
        ;;
esac

overwrite="${1:-}"
# step PART DONE_FILE TITLE [OPTIONS]: runs PART unless it finished before
# (DONE_FILE exists) and --overwrite was not given.
step() {
    local part="$1" done_file="$2" title="$3"
    shift 3
    if [ -z "$overwrite" ] && [ -f "$done_file" ]; then
        echo "== $title: kept from an earlier run in" \
            "$(dirname "$done_file") (--overwrite runs it again)"
        return
    fi
    echo "== $title"
    "$part" "$@"
}
step classifier "$OUT/classifier/summary.json" \
    "1/3 Classifier: an MLP on the digits" --verbose 2 $overwrite
step gan "$OUT/gan/summary.json" \
    "2/3 GAN: a DCGAN that learns to draw digits" --verbose 2 $overwrite
step benchmark "$OUT/benchmark/results.json" \
    "3/3 Speed: fitcustom's fit() against Keras' fit() and hand-written loops"
echo
summary
