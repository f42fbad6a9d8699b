"""Tests of tools/find-python.sh and the Makefile's use of it.

Each test runs the script with a PATH of stub directories only: fake
interpreters (Python scripts that run the probe's code with
sys.version_info and sys.executable faked), a fake pyenv with a shim that
refuses to run, a fake uv and a fake python3 that "pip-installs" it. Nothing
touches the network or the machine's own Pythons.
"""

import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'tools', 'find-python.sh')
# What the script and the Makefile run besides Pythons, pyenv and uv.
TOOLS = ['sh', 'cat', 'dirname', 'env', 'grep', 'mkdir', 'rm', 'sed',
         'sleep', 'sort', 'tail', 'timeout', 'touch', 'make']

FAKE_PYTHON = '''#!{real}
import os, shutil, sys
me = os.path.abspath(sys.argv[0])
logged = sys.argv[1:3] if sys.argv[1] == '-m' else sys.argv[1:2]
with open(os.environ['FAKE_LOG'], 'a') as log:
    log.write(' '.join([me] + logged) + '\\n')
if sys.argv[1] == '-c':
    sys.version_info = {version!r}
    sys.executable = me
    exec(sys.argv[2], {{'__name__': '__main__'}})
elif sys.argv[1:3] == ['-m', 'venv']:
    bin_dir = os.path.join(sys.argv[3], 'bin')
    os.makedirs(bin_dir, exist_ok=True)
    shutil.copy(me, os.path.join(bin_dir, 'python'))
elif sys.argv[1:4] == ['-m', 'pip', 'install']:
    if any(arg.startswith('uv==') for arg in sys.argv):
        shutil.copy(os.environ['FAKE_UV'],
                    os.path.join(os.path.dirname(me), 'uv'))
else:
    sys.exit('fake python: unexpected arguments %r' % sys.argv[1:])
'''

# pyenv's shims run the selected version's command or refuse, like this.
PYENV_SHIM = '''#!/bin/sh
echo "$0" >> "$FAKE_LOG"
echo "pyenv: ${0##*/}: command not found" >&2
exit 127
'''

FAKE_PYENV = '''#!/bin/sh
echo "pyenv $*" >> "$FAKE_LOG"
root=${0%/bin/pyenv}
case "$1" in
versions) printf '%s\\n' 3.9.18 3.10.9 3.10.13 3.10.13/envs/tools 3.11.7 ;;
which)
    if [ -x "$root/versions/$PYENV_VERSION/bin/$2" ]; then
        echo "$root/versions/$PYENV_VERSION/bin/$2"
    else
        echo "pyenv: $2: command not found" >&2
        exit 127
    fi ;;
esac
'''

# FAKE_UV_NETWORK: online (install works), hangs, or anything else: offline.
FAKE_UV = '''#!/bin/sh
echo "uv $*" >> "$FAKE_LOG"
case "$1 $2" in
"python find")
    if [ "$UV_PYTHON_PREFERENCE" = only-managed ] &&
       [ -e "$FAKE_UV_HOME/installed" ]; then
        echo "$FAKE_UV_HOME/cpython-3.10/bin/python3.10"
    else
        echo 'error: No interpreter found for Python 3.10' >&2
        exit 2
    fi ;;
"python install")
    case "$FAKE_UV_NETWORK" in
    online) : > "$FAKE_UV_HOME/installed" ;;
    hangs) exec sleep 60 ;;
    *) echo 'error: Failed to install cpython-3.10.22' >&2
       echo '  cause: dns error' >&2
       exit 1 ;;
    esac ;;
esac
'''


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


class Machine:
    """A directory of stubs, and the script run against it."""

    def __init__(self, tmp_path):
        self.dir = str(tmp_path)
        self.log = os.path.join(self.dir, 'log')
        self.home = os.path.join(self.dir, 'home')
        self.bootstrap = os.path.join(self.dir, 'uv-bootstrap')
        self.uv_home = os.path.join(self.dir, 'uv-home')
        self.uv_source = _write(os.path.join(self.dir, 'uv-source', 'uv'),
                                FAKE_UV)
        os.makedirs(self.home)
        self.path = [self.dir_of('tools')]
        for tool in TOOLS:
            os.symlink(shutil.which(tool),
                       os.path.join(self.path[0], tool))
        self.python(os.path.join(self.uv_home, 'cpython-3.10', 'bin',
                                 'python3.10'), (3, 10, 22))

    def dir_of(self, name):
        path = os.path.join(self.dir, name)
        os.makedirs(path, exist_ok=True)
        return path

    def python(self, path, version):
        return _write(path, FAKE_PYTHON.format(real=sys.executable,
                                               version=version))

    def on_path(self, name, file_name, text=None, version=None):
        """Puts a stub in directory `name`, put on PATH; returns its path."""
        path = os.path.join(self.dir_of(name), file_name)
        if self.dir_of(name) not in self.path:
            self.path.append(self.dir_of(name))
        if version is not None:
            return self.python(path, version)
        return _write(path, text)

    def install_pyenv(self, on_path=True):
        """pyenv in ~/.pyenv with 3.10.9 and 3.10.13, its shim on PATH."""
        root = os.path.join(self.home, '.pyenv')
        pyenv = _write(os.path.join(root, 'bin', 'pyenv'), FAKE_PYENV)
        for version in ['3.10.9', '3.10.13']:
            self.python(os.path.join(root, 'versions', version, 'bin',
                                     'python3.10'), (3, 10, 0))
        self.shim = _write(os.path.join(root, 'shims', 'python3.10'),
                           PYENV_SHIM)
        self.path.append(os.path.dirname(self.shim))
        if on_path:
            self.path.append(os.path.dirname(pyenv))
        return root

    def env(self, **extra):
        env = {'PATH': ':'.join(self.path), 'HOME': self.home,
               'FAKE_LOG': self.log, 'FAKE_UV': self.uv_source,
               'FAKE_UV_HOME': self.uv_home, 'UV_BOOTSTRAP': self.bootstrap}
        env.update(extra)
        return env

    def run(self, command, **extra):
        if os.path.exists(self.log):
            os.remove(self.log)
        start = time.monotonic()
        result = subprocess.run(command, env=self.env(**extra), cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        result.seconds = time.monotonic() - start
        return result

    def find(self, **extra):
        return self.run(['sh', SCRIPT], **extra)

    def calls(self):
        """What ran, in order, with this directory's path left out."""
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return [line.rstrip('\n').replace(self.dir + os.sep, '')
                    for line in f]


@pytest.fixture
def machine(tmp_path):
    return Machine(tmp_path)


def found(result):
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def assert_guide(result):
    """The one message that says why 3.10 and the three ways to get it."""
    assert result.returncode == 1
    assert result.stdout == ''
    message = result.stderr
    assert message.count('deformable needs Python 3.10') == 1
    for words in ['ChainerCV 0.13.1 builds only on Python 3.10',
                  'Chainer 7.8.1 needs numpy<2',
                  'make test PYTHON=/path/to/python3.10',
                  'pyenv install 3.10', 'uv']:
        assert words in message


def test_python_given_comes_first(machine):
    machine.on_path('local', 'python3.10', version=(3, 10, 4))
    machine.install_pyenv()
    machine.on_path('uv', 'uv', FAKE_UV)
    given = machine.python(os.path.join(machine.dir, 'mine', 'python'),
                           (3, 10, 12))
    assert found(machine.find(PYTHON=given)) == given
    assert machine.calls() == ['mine/python -c']


@pytest.mark.parametrize('version', [(3, 12, 1), None])
def test_python_given_that_is_no_310_is_an_error(machine, version):
    # Named explicitly, so no other Python stands in for it.
    machine.on_path('local', 'python3.10', version=(3, 10, 4))
    given = os.path.join(machine.dir, 'mine', 'python')
    if version is not None:
        machine.python(given, version)
    result = machine.find(PYTHON=given)
    assert_guide(result)
    assert 'PYTHON=%s is not a working Python 3.10.' % given in result.stderr
    assert [call.split()[0] for call in machine.calls()] == (
        ['mine/python'] if version else [])


def test_python310_on_path_comes_before_pyenv_and_uv(machine):
    local = machine.on_path('local', 'python3.10', version=(3, 10, 4))
    machine.install_pyenv()
    machine.on_path('uv', 'uv', FAKE_UV)
    assert found(machine.find()) == local
    assert [call.split()[0] for call in machine.calls()] == [
        'local/python3.10']


def test_python310_that_is_another_version_is_passed_over(machine):
    machine.on_path('local', 'python3.10', version=(3, 12, 1))
    root = machine.install_pyenv()
    assert found(machine.find()) == os.path.join(
        root, 'versions', '3.10.13', 'bin', 'python3.10')


@pytest.mark.parametrize('pyenv_on_path', [True, False])
def test_refusing_pyenv_shim_is_absent_and_newest_pyenv_310_is_used(
        machine, pyenv_on_path):
    # As on a machine whose pyenv selects 3.11: the python3.10 shim is on
    # PATH but refuses; pyenv's 3.10.13 is newer than its 3.10.9.
    root = machine.install_pyenv(on_path=pyenv_on_path)
    machine.on_path('uv', 'uv', FAKE_UV)
    assert found(machine.find()) == os.path.join(
        root, 'versions', '3.10.13', 'bin', 'python3.10')
    assert [call.split()[0] for call in machine.calls()] == [
        'home/.pyenv/shims/python3.10', 'pyenv', 'pyenv',
        'home/.pyenv/versions/3.10.13/bin/python3.10']


def test_uv_managed_310_is_used_without_download(machine):
    machine.on_path('py3', 'python3', version=(3, 12, 1))
    machine.on_path('uv', 'uv', FAKE_UV)
    open(os.path.join(machine.uv_home, 'installed'), 'w').close()
    assert found(machine.find()) == os.path.join(
        machine.uv_home, 'cpython-3.10', 'bin', 'python3.10')
    assert 'uv python install 3.10' not in machine.calls()


def test_uv_downloads_310_when_online(machine):
    machine.on_path('uv', 'uv', FAKE_UV)
    result = machine.find(FAKE_UV_NETWORK='online')
    assert found(result) == os.path.join(
        machine.uv_home, 'cpython-3.10', 'bin', 'python3.10')
    assert 'downloading one with' in result.stderr
    assert machine.calls() == [
        'uv python find --system 3.10', 'uv python install 3.10',
        'uv python find --system 3.10',
        'uv-home/cpython-3.10/bin/python3.10 -c']


def test_uv_is_bootstrapped_with_python3_once(machine):
    # A stock machine: its only Python is python3, a 3.12.
    machine.on_path('py3', 'python3', version=(3, 12, 1))
    result = machine.find(FAKE_UV_NETWORK='online')
    assert found(result) == os.path.join(
        machine.uv_home, 'cpython-3.10', 'bin', 'python3.10')
    assert 'installing uv into %s' % machine.bootstrap in result.stderr
    assert [call.split()[0] for call in machine.calls()][:3] == [
        'py3/python3', 'uv-bootstrap/bin/python', 'uv']
    assert 'py3/python3 -m venv' in machine.calls()
    # The next run reuses the bootstrap venv's uv.
    assert found(machine.find()) == os.path.join(
        machine.uv_home, 'cpython-3.10', 'bin', 'python3.10')
    assert machine.calls() == ['uv python find --system 3.10',
                               'uv-home/cpython-3.10/bin/python3.10 -c']


def test_offline_without_310_stops_at_once_with_the_guide(machine):
    # This machine without pyenv's 3.10, offline: the shim refuses, uv is
    # pip-installed, and its download fails.
    machine.on_path('py3', 'python3', version=(3, 11, 7))
    machine.install_pyenv()
    for version in ['3.10.9', '3.10.13']:
        os.remove(os.path.join(machine.home, '.pyenv', 'versions', version,
                               'bin', 'python3.10'))
    result = machine.find()
    assert_guide(result)
    assert ('uv could not download one (offline?): cause: dns error'
            in result.stderr)
    assert result.seconds < 10
    assert [call.split()[0] for call in machine.calls()] == [
        'home/.pyenv/shims/python3.10', 'pyenv', 'pyenv', 'pyenv',
        'py3/python3', 'uv-bootstrap/bin/python', 'uv', 'uv']
    assert machine.calls()[-1] == 'uv python install 3.10'


def test_hanging_download_is_cut_off(machine):
    machine.on_path('uv', 'uv', FAKE_UV)
    result = machine.find(FAKE_UV_NETWORK='hangs', PYTHON_DOWNLOAD_TIMEOUT='1')
    assert_guide(result)
    assert 'timed out after 1 s' in result.stderr
    assert result.seconds < 10


def test_no_310_no_uv_no_python3(machine):
    result = machine.find()
    assert_guide(result)
    assert 'no python3 to install uv with' in result.stderr
    assert machine.calls() == []


def test_make_venv_records_the_python_and_rebuilds_for_another(machine):
    venv = os.path.join(machine.dir, 'venv')
    first = machine.python(os.path.join(machine.dir, 'a', 'python'),
                           (3, 10, 4))
    second = machine.python(os.path.join(machine.dir, 'b', 'python'),
                            (3, 10, 13))

    def make(python):
        return machine.run(['make', '--no-print-directory', 'venv',
                            'VENV=' + venv, 'PYTHON=' + python])

    def made_from():
        return [call.split()[0] for call in machine.calls()
                if call.endswith('-m venv')]

    result = make(first)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(first) == 1
    assert 'Python for %s/: %s\n' % (venv, first) in result.stdout
    with open(os.path.join(venv, '.python')) as f:
        assert f.read() == first + '\n'
    assert made_from() == ['a/python']
    assert os.path.exists(os.path.join(venv, '.installed'))

    # Same Python: .venv/ is kept as it is.
    open(os.path.join(venv, 'kept'), 'w').close()
    result = make(first)
    assert result.returncode == 0, result.stderr
    assert made_from() == []
    assert os.path.exists(os.path.join(venv, 'kept'))

    # Another Python: .venv/ is made anew from it.
    result = make(second)
    assert result.returncode == 0, result.stderr
    assert made_from() == ['b/python']
    assert not os.path.exists(os.path.join(venv, 'kept'))
    with open(os.path.join(venv, '.python')) as f:
        assert f.read() == second + '\n'

    # No 3.10: make stops with the guide and leaves .venv/ alone.
    wrong = machine.python(os.path.join(machine.dir, 'c', 'python'),
                           (3, 12, 1))
    result = make(wrong)
    assert result.returncode != 0
    assert 'PYTHON=%s is not a working Python 3.10.' % wrong in result.stderr
    with open(os.path.join(venv, '.python')) as f:
        assert f.read() == second + '\n'
