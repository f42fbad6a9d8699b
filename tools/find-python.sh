#!/bin/sh
# Prints the path of a working Python 3.10 for make's .venv/, trying in turn:
#   1. $PYTHON, where given (and nothing else: a wrong one is an error);
#   2. python3.10 on PATH;
#   3. pyenv's newest 3.10.x;
#   4. a CPython 3.10 managed by uv, downloaded if need be (needs internet),
#      with uv pip-installed into a bootstrap venv if it is not on PATH.
# Otherwise it says, on stderr, how to get one and exits 1.
#
# Environment: PYTHON; UV_BOOTSTRAP (default .uv-bootstrap/ in the repository)
# and PYTHON_DOWNLOAD_TIMEOUT (seconds allowed each for installing uv and for
# downloading CPython, default 300) for step 4.
set -u

repository=$(cd "$(dirname "$0")/.." && pwd)
UV_BOOTSTRAP=${UV_BOOTSTRAP:-$repository/.uv-bootstrap}
PYTHON_DOWNLOAD_TIMEOUT=${PYTHON_DOWNLOAD_TIMEOUT:-300}
# The uv whose downloads were tried here; the same one for everybody.
UV_REQUIREMENT='uv==0.13.9'

fail() {
    cat >&2 <<EOF
find-python.sh: $*
deformable needs Python 3.10: ChainerCV 0.13.1 builds only on Python 3.10,
and Chainer 7.8.1 needs numpy<2. Get a 3.10 in one of three ways, then
rerun make:
  - PYTHON=:  make test PYTHON=/path/to/python3.10
  - pyenv:    pyenv install 3.10   (make then finds it by itself)
  - uv:       online, make downloads one with uv by itself (uv from PATH, or
              pip-installed with python3 into $UV_BOOTSTRAP)
EOF
    exit 1
}

# Prints $1's real path and stops if $1 runs and is 3.10. A pyenv shim is
# on PATH for every installed version but refuses to run an unselected one,
# so being found is not enough; sys.executable also sees through the shim.
use_if_python310() {
    path=$("$1" -c 'import sys
assert sys.version_info[:2] == (3, 10)
print(sys.executable)' 2>/dev/null) && [ -n "$path" ] || return 0
    printf '%s\n' "$path"
    exit 0
}

# Runs a step of 4, which may use the network, under coreutils' timeout where
# there is one (so as never to hang on a network that drops packets); keeps
# its output's last line in $why.
run_with_timeout() {
    if command -v timeout >/dev/null 2>&1; then
        output=$(timeout "$PYTHON_DOWNLOAD_TIMEOUT" "$@" 2>&1)
    else
        output=$("$@" 2>&1)
    fi
    status=$?
    why=$(printf '%s\n' "$output" | grep . | tail -n 1 | sed 's/^ *//')
    [ "$status" -ne 124 ] || why="timed out after $PYTHON_DOWNLOAD_TIMEOUT s"
    return "$status"
}

# 1. PYTHON
if [ -n "${PYTHON:-}" ]; then
    use_if_python310 "$PYTHON"
    fail "PYTHON=$PYTHON is not a working Python 3.10."
fi

# 2. python3.10 on PATH
use_if_python310 python3.10

# 3. pyenv, found on PATH or where its installer puts it; newest 3.10 first.
pyenv=$(command -v pyenv) || pyenv=${PYENV_ROOT:-${HOME:-}/.pyenv}/bin/pyenv
if [ -x "$pyenv" ]; then
    for version in $("$pyenv" versions --bare 2>/dev/null |
                     grep -E '^3\.10\.[0-9]+$' | sort -t. -k3,3nr); do
        candidate=$(PYENV_VERSION=$version "$pyenv" which python3.10 \
                    2>/dev/null)
        use_if_python310 "$candidate"
    done
fi

# 4. uv
uv=$(command -v uv) || uv=$UV_BOOTSTRAP/bin/uv
if [ ! -x "$uv" ]; then
    python3=$(command -v python3) ||
        fail "No Python 3.10 found, no uv, and no python3 to install uv with."
    echo "find-python.sh: no Python 3.10 found; installing uv" \
         "into $UV_BOOTSTRAP" >&2
    { run_with_timeout "$python3" -m venv "$UV_BOOTSTRAP" &&
      run_with_timeout "$UV_BOOTSTRAP/bin/python" -m pip install \
          --disable-pip-version-check -q --retries 1 --timeout 15 \
          "$UV_REQUIREMENT"; } ||
        fail "No Python 3.10 found, and uv could not be installed" \
             "with $python3: $why"
fi

# Only uv's own interpreters: not a venv's, nor the ones steps 2-3 rejected.
uv_managed_python310() {
    UV_PYTHON_PREFERENCE=only-managed "$uv" python find --system 3.10 \
        2>/dev/null
}
use_if_python310 "$(uv_managed_python310)"
echo "find-python.sh: no Python 3.10 found; downloading one with $uv" >&2
# One retry, not uv's default three with backoff: offline, fail in seconds.
run_with_timeout env UV_HTTP_RETRIES=1 "$uv" python install 3.10 &&
    use_if_python310 "$(uv_managed_python310)"
fail "No Python 3.10 found, and uv could not download one" \
     "(offline?): $why"
