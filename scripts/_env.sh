# Shared by run.sh and test.sh: create .venv if missing and install fitcustom
# with the given extras. Usage: source scripts/_env.sh EXTRA[,EXTRA...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FITCUSTOM_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "Creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# TensorFlow: the GPU build where an NVIDIA driver answers, else the CPU one.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    TF_EXTRA=gpu
else
    TF_EXTRA=cpu
fi
STAMP="$VENV/.fitcustom-installed-$TF_EXTRA-$1"
if [ ! -f "$STAMP" ] || [ "$ROOT/setup.cfg" -nt "$STAMP" ]; then
    echo "Installing fitcustom[$TF_EXTRA,$1] into $VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$TF_EXTRA,$1]"
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
cd "$ROOT"
