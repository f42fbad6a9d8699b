"""Lets Chainer 7.8.1 import and run on NumPy 2 / Python 3.12, the GPU
machine's stack (``gpu_checks/build_kit.sh`` puts it in the kit's site
directory, which ``gpu_checks/run.sh`` puts on ``PYTHONPATH``).

Chainer 7.8.1, the last release, predates NumPy 2: it imports
``numpy.distutils`` (gone on Python 3.12), reads ``numpy.sctypes`` and uses
the ``numpy.float``/``int``/``bool`` aliases. This restores just those names
before Chainer is imported; nothing else changes.
"""

import sys
import types

import numpy

if 'sctypes' not in numpy.__dict__:
    numpy.sctypes = {
        'int': [numpy.int8, numpy.int16, numpy.int32, numpy.int64],
        'uint': [numpy.uint8, numpy.uint16, numpy.uint32, numpy.uint64],
        'float': [numpy.float16, numpy.float32, numpy.float64],
        'complex': [numpy.complex64, numpy.complex128],
        'others': [bool, object, bytes, str, numpy.void],
    }
for _name, _value in (('float', float), ('int', int), ('bool', bool),
                      ('complex', complex), ('object', object), ('str', str)):
    if _name not in numpy.__dict__:
        setattr(numpy, _name, _value)
try:
    import numpy.distutils.system_info  # NOQA
except Exception:
    _distutils = types.ModuleType('numpy.distutils')
    _system_info = types.ModuleType('numpy.distutils.system_info')
    _system_info.get_info = lambda name, notfound_action=0: {}
    _distutils.system_info = _system_info
    sys.modules['numpy.distutils'] = _distutils
    sys.modules['numpy.distutils.system_info'] = _system_info
try:
    import distutils  # NOQA  (ChainerCV 0.13.1 imports distutils.util)
except ImportError:
    import setuptools  # NOQA  (provides distutils on Python 3.12)
