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


@pytest.fixture(autouse=True)
def _cpu_loops(request):
    """Runs a test that names its CPU loops (``cpu_loops``: a pytest
    parameter, or an attribute of its unittest class) with them, setUp to
    tearDown (see helpers.py)."""
    name = getattr(request.instance, 'cpu_loops', None)
    callspec = getattr(request.node, 'callspec', None)
    if callspec is not None:
        name = callspec.params.get('cpu_loops', name)
    if name is None:
        yield
        return
    # Imported here: the experiments' tests need not import the library.
    import helpers
    with helpers.using_cpu_loops(name):
        yield
