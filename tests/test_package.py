import subprocess
import sys


def test_library_imports_neither_chainercv_nor_matplotlib():
    # The library must work where ChainerCV cannot be built (Python 3.11+).
    code = ('import sys, deformable; '
            'print(sorted(m for m in ("chainercv", "matplotlib") '
            'if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == '[]'
