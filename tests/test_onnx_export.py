"""``deformable.onnx``: the exported graphs against Chainer in ONNX's
reference evaluator (``onnx.reference``), and ``experiments/export_onnx.py``.

``onnx.reference``'s own ``DeformConv`` calls ``GridSample`` once per
(image, output channel, input channel, output pixel), about 5 ms each here:
hours for one 28x28 convnet. So the small graphs run it as it is, and the
convnets run with ``DeformConv`` swapped for :class:`DeformConv` here, a
vectorized implementation of the ONNX specification written here, which
:func:`test_spec_deform_conv_is_onnx_reference` holds to ``onnx.reference``'s
own on every attribute. ONNX Runtime checks the trained convnets on 1000
images (``tools/verify_onnx_runtime.sh``).
"""

import collections
import os
import re
import subprocess
import sys

import numpy
import pytest

import chainer
import chainer.functions as F
import chainer.links as L

import deformable

onnx = pytest.importorskip('onnx')
from onnx.reference import ReferenceEvaluator  # NOQA: E402
from onnx.reference.op_run import OpRun  # NOQA: E402

from deformable import onnx as deformable_onnx  # NOQA: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, 'experiments')
sys.path.insert(0, EXPERIMENTS)

from models import KINDS  # NOQA: E402

COMMITTED = {
    0: os.path.join(ROOT, 'results', 'regular', 'non_deformable_20'),
    1: os.path.join(ROOT, 'results', 'deformable', 'model_iter_20'),
    2: os.path.join(ROOT, 'results', 'modulated', 'modulated_iter_20'),
}


# --- ONNX's DeformConv, vectorized -----------------------------------------

def spec_deform_conv(X, W, offset, B=None, mask=None, dilations=(1, 1),
                     group=1, offset_group=1, pads=(0, 0, 0, 0),
                     strides=(1, 1)):
    """ONNX's ``DeformConv`` (2-D) from its specification, in float64.

    Tap ``(ki, kj)`` of output ``(i, j)`` in offset group ``g`` samples the
    input bilinearly (zero outside) at ``(i * stride_h - pad_top + ki *
    dilation_h + dy, j * stride_w - pad_left + kj * dilation_w + dx)``,
    with ``offset`` ``(n, G, kh, kw, 2 = (dy, dx), oh, ow)``; the samples,
    times ``mask``, are convolved with ``W`` (grouped) and ``B`` added.
    """
    n, c, h, w = X.shape
    oc, _, kh, kw = W.shape
    oh, ow = offset.shape[2:]
    G = offset_group
    off = offset.astype(numpy.float64).reshape(n, G, kh, kw, 2, oh, ow)
    y = ((numpy.arange(kh) * dilations[0])[:, None, None, None]
         + (numpy.arange(oh) * strides[0] - pads[0])[:, None]
         + off[:, :, :, :, 0])
    x = ((numpy.arange(kw) * dilations[1])[None, :, None, None]
         + (numpy.arange(ow) * strides[1] - pads[1])[None, :]
         + off[:, :, :, :, 1])
    y0, x0 = numpy.floor(y), numpy.floor(x)
    planes = X.astype(numpy.float64).reshape(n, G, c // G, h * w)
    image = numpy.arange(n).reshape(n, 1, 1, 1, 1, 1)
    offset_group_index = numpy.arange(G).reshape(1, G, 1, 1, 1, 1)
    samples = 0
    for corner_y, weight_y in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for corner_x, weight_x in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            inside = ((corner_y >= 0) & (corner_y < h)
                      & (corner_x >= 0) & (corner_x < w))
            flat = numpy.where(inside, corner_y * w + corner_x, 0).astype(
                numpy.int64)
            # (n, G, kh, kw, oh, ow, c / G)
            values = planes[image, offset_group_index, :, flat]
            samples = samples + (weight_y * weight_x * inside)[..., None] \
                * values
    if mask is not None:
        samples = samples * mask.astype(numpy.float64).reshape(
            n, G, kh, kw, oh, ow)[..., None]
    columns = samples.transpose(0, 1, 6, 2, 3, 4, 5).reshape(
        n, group, c // group, kh, kw, oh, ow)
    weight = W.astype(numpy.float64).reshape(
        group, oc // group, c // group, kh, kw)
    out = numpy.einsum('ngckluv,gockl->ngouv', columns, weight).reshape(
        n, oc, oh, ow)
    if B is not None:
        out = out + B.reshape(1, -1, 1, 1)
    return out.astype(X.dtype)


class DeformConv(OpRun):
    """:func:`spec_deform_conv` as the evaluator's ``DeformConv`` (the
    evaluator takes the op's name from the class's)."""

    op_domain = ''

    def _run(self, X, W, offset, B=None, mask=None, dilations=None,
             group=None, kernel_shape=None, offset_group=None, pads=None,
             strides=None):
        return spec_deform_conv(
            X, W, offset, B, mask, dilations or (1, 1), group or 1,
            offset_group or 1, pads or (0, 0, 0, 0), strides or (1, 1)),


def run_onnx(model, inputs, fast_deform_conv=False):
    new_ops = [DeformConv] if fast_deform_conv else None
    evaluator = ReferenceEvaluator(model, new_ops=new_ops)
    names = [i.name for i in model.graph.input]
    return evaluator.run(None, dict(zip(names, inputs)))


def relative_error(expected, actual):
    """Largest deviation relative to the largest expected value."""
    assert expected.shape == actual.shape
    return numpy.abs(expected - actual).max() / numpy.abs(expected).max()


def op_counts(model):
    return collections.Counter(node.op_type for node in model.graph.node)


def chainer_forward(model, *inputs):
    with chainer.using_config('train', False), \
            chainer.using_config('enable_backprop', False):
        return model(*inputs).array


def test_spec_deform_conv_is_onnx_reference():
    from onnx import helper
    from onnx import TensorProto
    rng = numpy.random.RandomState(0)
    cases = [
        # stride, pad, dilation, groups, offset groups, mask, bias
        dict(strides=(2, 1), pads=(1, 2, 1, 2), dilations=(1, 2), group=2,
             offset_group=2, mask=True, bias=True),
        dict(strides=(1, 2), pads=(0, 2, 0, 2), dilations=(2, 1), group=1,
             offset_group=4, mask=False, bias=False),
    ]
    for case in cases:
        x = rng.uniform(-1, 1, (1, 4, 5, 4))
        W = rng.uniform(-1, 1, (2, 4 // case['group'], 2, 3))
        kh, kw = W.shape[2:]
        (sh, sw), (dh, dw), p = case['strides'], case['dilations'], \
            case['pads']
        oh = (5 + p[0] + p[2] - dh * (kh - 1) - 1) // sh + 1
        ow = (4 + p[1] + p[3] - dw * (kw - 1) - 1) // sw + 1
        G = case['offset_group']
        # onnx.reference samples in float32: offsets on a 1/64 grid.
        offset = numpy.round(rng.uniform(-3, 3, (1, 2 * G * kh * kw, oh, ow))
                             * 64) / 64
        arrays = {'X': x, 'W': W, 'offset': offset,
                  'B': rng.uniform(-1, 1, 2) if case['bias'] else None,
                  'mask': (rng.uniform(0, 1, (1, G * kh * kw, oh, ow))
                           if case['mask'] else None)}
        names = ['X', 'W', 'offset', 'B' if case['bias'] else '',
                 'mask' if case['mask'] else '']
        while not names[-1]:
            names.pop()
        node = helper.make_node(
            'DeformConv', names, ['Y'], kernel_shape=[kh, kw],
            **{k: list(v) if isinstance(v, tuple) else v
               for k, v in case.items() if k not in ('mask', 'bias')})
        graph = helper.make_graph(
            [node], 'deform_conv',
            [helper.make_tensor_value_info(name, TensorProto.DOUBLE, None)
             for name in names if name],
            [helper.make_tensor_value_info('Y', TensorProto.DOUBLE, None)])
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid('', 19)])
        inputs = [arrays[name] for name in names if name]
        expected, = run_onnx(model, inputs)
        actual, = run_onnx(model, inputs, fast_deform_conv=True)
        assert relative_error(expected, actual) < 1e-12


# --- The convnets -----------------------------------------------------------

def images(n, seed=0):
    # Blobs on a black background, like scaled digits.
    rng = numpy.random.RandomState(seed)
    x = numpy.zeros((n, 1, 28, 28), numpy.float32)
    for image in x:
        top, left = rng.randint(2, 16, size=2)
        image[0, top:top + 10, left:left + 8] = rng.uniform(0.3, 1, (10, 8))
    return x


def fill_params(link, rng, w_scale=None, b_scale=0.1):
    """Draws every parameter of ``link`` from ``rng`` (Chainer's
    initializers draw from NumPy's global state): weights normal with
    ``w_scale`` (default LeCun's ``1 / sqrt(fan_in)``), biases normal with
    ``b_scale``."""
    for _, param in link.namedparams():
        if param.ndim > 1:
            scale = w_scale or 1 / numpy.sqrt(param.size // param.shape[0])
        else:
            scale = b_scale
        param.array[...] = rng.normal(0, scale, param.shape)


def randomize(model, rng):
    """Random parameters, the offset convolutions' too (a fresh link's are
    zero): offsets of about a pixel, and masks across (0, 1) in a
    modulated convnet."""
    fill_params(model, rng)
    for name in ('l2', 'l3'):
        link = getattr(model, name)
        if hasattr(link, 'offset_conv'):
            fill_params(link.offset_conv, rng, w_scale=0.3, b_scale=1.0)


def export_convnet(model):
    # Traced with one image: the exported batch axis is symbolic.
    return deformable_onnx.export(
        model, images(1, seed=1), input_names=['image'],
        output_names=['logits'])


@pytest.mark.parametrize('flag', [0, 1, 2])
def test_fresh_convnet(flag):
    rng = numpy.random.RandomState(flag)
    model = KINDS[flag].model_class(10)
    randomize(model, rng)
    x = images(3)
    if flag:
        with chainer.using_config('train', False):
            offset, _ = model.l2.offsets_and_mask(model.features(x)['l1'])
        # About a pixel, varying over the image.
        assert numpy.abs(offset.array).mean() > 0.5
        assert offset.array.std(axis=(2, 3)).mean() > 0.5
    onnx_model = export_convnet(model)
    counts = op_counts(onnx_model)
    # Offsets reordered in the offset convolutions' weights: no Gather.
    assert counts['DeformConv'] == (2 if flag else 0)
    assert counts['Conv'] == 3 and counts['Gather'] == 0
    assert counts['Sigmoid'] == (2 if flag == 2 else 0)
    dims = onnx_model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ['batch', 1, 28, 28]
    logits, = run_onnx(onnx_model, [x], fast_deform_conv=True)
    assert relative_error(chainer_forward(model, x), logits) <= 1e-5


def test_offset_convolution_by_f_convolution_2d(monkeypatch):
    # The link's CPU offset conv is our sampler at zero offsets; exported
    # as a Conv either way, and F.convolution_2d's is folded just the same.
    model = KINDS[2].model_class(10)
    randomize(model, numpy.random.RandomState(5))
    x = images(2)
    expected = chainer_forward(model, x)
    monkeypatch.setattr(deformable.links.OffsetConvolution2D, 'forward',
                        chainer.links.Convolution2D.forward)
    onnx_model = export_convnet(model)
    counts = op_counts(onnx_model)
    assert counts['Conv'] == 3 and counts['Gather'] == 0
    logits, = run_onnx(onnx_model, [x], fast_deform_conv=True)
    assert relative_error(expected, logits) <= 1e-5


@pytest.mark.parametrize('flag', [0, 1, 2])
def test_committed_convnet(flag):
    pytest.importorskip('chainercv')
    from snapshots import load_model
    if not os.path.isfile(COMMITTED[flag]):
        pytest.skip('no committed snapshot {}'.format(
            os.path.relpath(COMMITTED[flag], ROOT)))
    model = load_model(COMMITTED[flag], flag)
    x = images(2, seed=3)
    logits, = run_onnx(export_convnet(model), [x], fast_deform_conv=True)
    assert relative_error(chainer_forward(model, x), logits) <= 1e-5


# --- Small graphs: every DeformConv attribute, in onnx.reference itself ------

class FoldedOffsets(chainer.Chain):
    """Two deformable layers whose offsets come from convolutions: a
    modulated link (through its split) and ``F.convolution_2d``."""

    def __init__(self, rng):
        super(FoldedOffsets, self).__init__()
        with self.init_scope():
            self.first = deformable.DeformableConvolution2D(
                4, 4, 3, pad=2, dilate=2, groups=2, offset_groups=2,
                modulated=True)
            self.offset_conv = L.Convolution2D(4, 2 * 2 * 6, (2, 3),
                                               stride=2, pad=1)
            self.second = deformable.links.DeformableConvolution2DSampler(
                4, 2, (2, 3), stride=2, pad=1, nobias=True)
        fill_params(self, rng)
        for conv in (self.first.offset_conv, self.offset_conv):
            fill_params(conv, rng, w_scale=0.2, b_scale=0.5)

    def forward(self, x):
        h = F.relu(self.first(x))
        return self.second(h, self.offset_conv(h))


class GivenOffsets(chainer.Chain):
    """A deformable layer given its offsets and mask as graph inputs (the
    offsets converted in the graph, by a Gather)."""

    def __init__(self, rng):
        super(GivenOffsets, self).__init__()
        with self.init_scope():
            self.conv = deformable.links.DeformableConvolution2DSampler(
                4, 4, 3, stride=(1, 2), pad=(1, 0), dilate=(2, 1), groups=2)
        fill_params(self, rng, b_scale=1.0)

    def forward(self, x, offset, mask):
        return self.conv(x, offset, mask)


def test_folded_offsets_in_onnx_reference():
    rng = numpy.random.RandomState(7)
    model = FoldedOffsets(rng)
    x = rng.uniform(0, 1, (1, 4, 6, 6)).astype(numpy.float32)
    onnx_model = deformable_onnx.export(model, x, dynamic_batch=False)
    counts = op_counts(onnx_model)
    assert counts['DeformConv'] == 2 and counts['Gather'] == 0
    assert counts['Split'] == 1 and counts['Sigmoid'] == 1
    nodes = [n for n in onnx_model.graph.node if n.op_type == 'DeformConv']
    attributes = [{a.name: onnx.helper.get_attribute_value(a)
                   for a in n.attribute} for n in nodes]
    assert attributes[0]['offset_group'] == 2 and attributes[0]['group'] == 2
    assert attributes[0]['dilations'] == [2, 2]
    assert attributes[1]['strides'] == [2, 2]
    assert [len(n.input) for n in nodes] == [5, 3]   # mask; no bias
    y, = run_onnx(onnx_model, [x])
    assert relative_error(chainer_forward(model, x), y) <= 1e-5


def test_given_offsets_in_onnx_reference():
    rng = numpy.random.RandomState(8)
    model = GivenOffsets(rng)
    x = rng.uniform(0, 1, (1, 4, 5, 4)).astype(numpy.float32)
    # out: (5 + 2 - 4 - 1) // 1 + 1 = 3 rows, (4 - 3) // 2 + 1 = 1 column.
    offset = rng.uniform(-2, 2, (1, 2 * 2 * 9, 3, 1)).astype(numpy.float32)
    mask = rng.uniform(0, 1, (1, 2 * 9, 3, 1)).astype(numpy.float32)
    onnx_model = deformable_onnx.export(model, (x, offset, mask))
    assert op_counts(onnx_model)['Gather'] == 1
    y, = run_onnx(onnx_model, [x, offset, mask])
    assert relative_error(chainer_forward(model, x, offset, mask), y) <= 1e-5


@pytest.mark.parametrize('cover_all', [True, False])
def test_pooling_and_convolution_cover_all(cover_all):
    # 5x5, kernel 2, stride 2: cover_all gives 3x3 (the last window half
    # outside), else 2x2.
    rng = numpy.random.RandomState(9)
    W = rng.normal(0, 1, (2, 3, 2, 2)).astype(numpy.float32)

    def model(x):
        h = F.max_pooling_2d(x, 2, stride=2, cover_all=cover_all)
        # 3x3 (2x2): kernel 2, stride 2, pad 1 gives 3x3 with cover_all
        # (2x2).
        h = F.convolution_2d(h, W, stride=2, pad=1, cover_all=cover_all)
        return F.reshape(h, (len(h), -1))

    x = rng.normal(0, 1, (2, 3, 5, 5)).astype(numpy.float32)
    onnx_model = deformable_onnx.export(model, x[:1])
    expected = chainer_forward(model, x)
    assert expected.shape == (2, 2 * (3 * 3 if cover_all else 2 * 2))
    y, = run_onnx(onnx_model, [x])
    assert relative_error(expected, y) <= 1e-6


# --- Refusals ---------------------------------------------------------------

def test_unsupported_node_is_named():
    link = L.Linear(4, 3)

    def model(x):
        return link(F.tanh(x))

    with pytest.raises(deformable_onnx.ExportError,
                       match=r'cannot export Tanh .*not support'):
        deformable_onnx.export(model, numpy.zeros((1, 4), numpy.float32))


def test_pooling_window_of_padding_only_is_refused():
    def model(x):
        # 5 rows, kernel 2, stride 2, pad 1, cover_all: the 4th window
        # starts at row 5, in the padding.
        return F.max_pooling_2d(x, 2, stride=2, pad=1)

    with pytest.raises(deformable_onnx.ExportError, match='padding only'):
        deformable_onnx.export(model, numpy.zeros((1, 1, 5, 5), 'f'))


def test_reshape_across_the_batch_needs_a_static_batch():
    def model(x):
        return F.relu(F.reshape(x, (-1,)))

    x = numpy.arange(-4, 4, dtype=numpy.float32).reshape(2, 4)
    with pytest.raises(deformable_onnx.ExportError, match='Reshape.*batch'):
        deformable_onnx.export(model, x)
    y, = run_onnx(deformable_onnx.export(model, x, dynamic_batch=False), [x])
    numpy.testing.assert_array_equal(y, numpy.maximum(x.ravel(), 0))


def test_opset_below_19_is_refused():
    with pytest.raises(ValueError, match='at least 19'):
        deformable_onnx.export(F.relu, numpy.zeros(2, 'f'), opset_version=18)


def test_import_deformable_does_not_import_onnx():
    code = 'import sys, deformable; sys.exit("onnx" in sys.modules)'
    env = dict(os.environ, PYTHONPATH=ROOT)
    assert subprocess.run([sys.executable, '-c', code], env=env).returncode \
        == 0


# --- experiments/export_onnx.py ---------------------------------------------

def test_export_script(tmp_path, capsys):
    pytest.importorskip('chainercv')
    import export_onnx
    out = tmp_path / 'regular.onnx'
    assert export_onnx.main(['--deformable', '0', '--resume', COMMITTED[0],
                             '--out', str(out)]) == 0
    stdout = capsys.readouterr().out
    assert 'checked by onnx.checker' in stdout
    assert 'opset: ai.onnx 19' in stdout
    assert 'input: image (batch, 1, 28, 28), output: logits (batch, 10)' \
        in stdout
    assert 'ops: Conv 3, Gemm 1, MaxPool 1, Relu 3, Reshape 1' in stdout
    onnx.checker.check_model(str(out), full_check=True)


@pytest.mark.parametrize('resume, flag, message', [
    ('missing', 1, r'no such file: .*missing'),
    ('not_npz', 1, r'not_npz is not an \.npz snapshot'),
    ('committed', 0, r'is a snapshot of the deformable model; run with '
                     r'--deformable 1'),
])
def test_export_script_refuses_bad_snapshots(tmp_path, capsys, resume, flag,
                                             message):
    pytest.importorskip('chainercv')
    import export_onnx
    paths = {'missing': str(tmp_path / 'missing'),
             'not_npz': str(tmp_path / 'not_npz'),
             'committed': COMMITTED[1]}
    (tmp_path / 'not_npz').write_text('not a snapshot')
    out = tmp_path / 'out.onnx'
    with pytest.raises(SystemExit) as e:
        export_onnx.main(['--deformable', str(flag), '--resume',
                          paths[resume], '--out', str(out)])
    assert e.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(r'\S+: error: ', error)
    assert re.search(message, error)
    assert not out.exists()
