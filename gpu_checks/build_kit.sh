#!/usr/bin/env bash
# Builds .devkit/: what a GPU machine with Python 3.12, NumPy 2 and CuPy 14
# but no Chainer and no network needs to run this project's GPU checks
# (gpu_checks/run.sh, gpu_checks/chainermn.sh). Run from anywhere, after
# `make venv`; `make gpu-kit` does both. About 21 MiB:
#   site/   Chainer 7.8.1 and setuptools 69.5.1 (pure Python), ChainerCV
#           0.13.1's Python files (its one compiled module, GPU NMS, which
#           the experiments never call, replaced by a stub that refuses to
#           run) and sitecustomize.py (gpu_checks/kit/: the few NumPy names
#           Chainer 7.8.1 still uses, restored on NumPy 2);
#   mnist/  the four MNIST files, gzipped (from the project's cache);
#   mpi-wheels/  mpi4py and MPICH for Python 3.12 (gpu_checks/chainermn.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
P=.venv/bin/python
[ -x "$P" ] || { echo 'run make venv first'; exit 1; }
PIP="$P -m pip --disable-pip-version-check -q"
KIT=.devkit
rm -rf "$KIT" && mkdir -p "$KIT/wheels" "$KIT/site" "$KIT/mnist"
quiet() { "$@" 2>&1 | grep -v WARNING || true; }
# One wheel of each pure-Python package serves Python 3.12 too.
quiet $PIP wheel --no-deps --no-build-isolation -w "$KIT/wheels" chainer==7.8.1
quiet $PIP download --no-deps -d "$KIT/wheels" setuptools==69.5.1
quiet $PIP install --no-deps --no-compile --target "$KIT/site" "$KIT"/wheels/*.whl
# ChainerCV's generated C does not build on 3.12: its Python files only.
quiet $PIP download --no-deps --no-binary :all: -d "$KIT/wheels" chainercv==0.13.1
tar -xzf "$KIT/wheels/chainercv-0.13.1.tar.gz" -C "$KIT/wheels"
cp -r "$KIT/wheels/chainercv-0.13.1/chainercv" "$KIT/site/"
rm -f "$KIT/site/chainercv/utils/bbox/_nms_gpu_post.c"
cat > "$KIT/site/chainercv/utils/bbox/_nms_gpu_post.py" <<'PY'
def _nms_gpu_post(*args, **kwargs):
    raise NotImplementedError('GPU kit: ChainerCV NMS on GPU is not built')
PY
mkdir -p "$KIT/site/chainercv-0.13.1.dist-info"
printf 'Metadata-Version: 2.1\nName: chainercv\nVersion: 0.13.1\n' \
    > "$KIT/site/chainercv-0.13.1.dist-info/METADATA"
printf 'chainercv\n' > "$KIT/site/chainercv-0.13.1.dist-info/top_level.txt"
cp gpu_checks/kit/sitecustomize.py "$KIT/site/"
# ChainerMN over MPI on the GPU machine (Python 3.12 wheels).
quiet $PIP download --no-deps --only-binary :all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux1_x86_64 -d "$KIT/mpi-wheels" mpi4py==4.1.2 \
    mpich==5.0.2
rm -rf "$KIT/wheels"
$P experiments/mnist_data.py > /dev/null
src="${XDG_CACHE_HOME:-$HOME/.cache}/deformable/mnist"
for f in train-images-idx3-ubyte train-labels-idx1-ubyte \
         t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  if [ -f "$src/$f.gz" ]; then cp "$src/$f.gz" "$KIT/mnist/"
  else gzip -c "$src/$f" > "$KIT/mnist/$f.gz"; fi
done
du -sh "$KIT"
echo 'On the GPU machine, with .devkit/ beside the checkout: bash gpu_checks/run.sh'
