#!/bin/sh
# The exported convnets in ONNX Runtime against Chainer (README, "Export to
# ONNX"). Sets up ONNX Runtime in .venv-ort/, beside the project's .venv/
# (ONNX Runtime's CPU DeformConv needs >= 1.32, whose wheels need Python >=
# 3.11; Chainer's environment is 3.10), then runs
# experiments/verify_onnx_runtime.py's two halves: export and Chainer's
# logits and timings on the first 1000 scaled-MNIST test images in the
# project's environment, ONNX Runtime's in .venv-ort/, and prints the
# comparison (exit status 1 if logits differ by more than 1e-4 relative or
# a predicted class differs). Both time inference on one thread.
#
#   sh tools/verify_onnx_runtime.sh [--modulated SNAPSHOT] [--images N] ...
#
# Arguments go to the Chainer half (snapshots default to the committed
# ones; see `verify_onnx_runtime.py chainer --help`). Environment:
# PYTHON (the project's interpreter, default .venv/bin/python), ORT_PYTHON
# (Python >= 3.11 for .venv-ort/, default python3.11), ORT_VERSION (default
# 1.32.0).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
ort_python=${ORT_PYTHON:-python3.11}
ort_version=${ORT_VERSION:-1.32.0}
venv=$root/.venv-ort

if ! "$venv/bin/python" -c "import onnxruntime, sys
sys.exit(onnxruntime.__version__ != '$ort_version')" 2>/dev/null; then
    if ! "$ort_python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'
    then
        echo "error: $ort_python is not Python >= 3.11, which ONNX Runtime" \
            "$ort_version needs; set ORT_PYTHON" >&2
        exit 1
    fi
    echo "setting up ONNX Runtime $ort_version in $venv" >&2
    rm -rf "$venv"
    "$ort_python" -m venv "$venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check -q \
        "onnxruntime==$ort_version" numpy >&2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The worktree's deformable, whatever the environment has installed.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
    DEFORMABLE_NUM_THREADS=1
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m)," \
    "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null |
        head -1), $(getconf _NPROCESSORS_ONLN) cores, load average" \
    "$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null);" \
    "commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null)"
echo "sh tools/verify_onnx_runtime.sh $*"
"$python" -W ignore "$root/experiments/verify_onnx_runtime.py" chainer \
    --out "$work" "$@"
"$venv/bin/python" "$root/experiments/verify_onnx_runtime.py" ort \
    --dir "$work"
