import pytest


def _gpu_available():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    # chainer.testing marks GPU cases with `gpu`; run them only where CuPy
    # sees a device.
    if _gpu_available():
        return
    skip = pytest.mark.skip(reason='needs CuPy and a CUDA GPU')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)
