#!/usr/bin/env python
"""Where a trained convnet looks: receptive field and sampling locations.

For the centre unit of the third convolution's feature map (``l3``, before
its ReLU) it draws, over scaled-MNIST test images:

* the receptive field: the input pixels where the gradient of the unit
  (summed over channels) exceeds ``--threshold`` times its largest absolute
  value, as in the original;
* the sampling locations: the 3x3 taps of ``l3`` back-projected through the
  max pooling and through ``l2``'s 3x3 taps to the input, with each layer's
  learned offsets (9 x 9 = 81 points; Dai et al. 2017, Fig. 5-6). A regular
  convnet has zero offsets, so its points form a dilated grid. For a
  modulated (DCNv2) convnet, the area of each point is its modulation: the
  product of the masks along its path (l3's tap times l2's).

    python test_mnist.py --deformable 1 --resume result/model_iter_20
    python test_mnist.py --deformable 0 --resume result/non_deformable_20
    python test_mnist.py --deformable 2 --resume result/modulated_iter_20
    python test_mnist.py --resume result/model_iter_20 \\
        --compare result/non_deformable_20 --index 0 1 2 --out vis.png
"""

import argparse
import os
import sys

import numpy

import chainer
import chainer.functions as F
from deformable.arguments import int_pair
from deformable.geometry import tap_grid

import mnist_data
from models import kind_of
import scaled_mnist
import snapshots
import writable


def centre(shape):
    return shape[0] // 2, shape[1] // 2


def receptive_field(model, img, threshold=1. / 255.):
    """Input pixels where d(centre unit of l3, summed over channels)/dx is big.

    Returns:
        ``(mask, grad)``: a boolean array and the gradient, both (H, W).
    """
    x = chainer.Variable(img[None])
    with chainer.using_config('train', False):
        h = model.features(x)['l3']
    i, j = centre(h.shape[2:])
    F.sum(h[:, :, i, j]).backward()
    grad = numpy.abs(x.grad[0, 0])
    largest = grad.max()
    return grad > threshold * largest if largest > 0 else grad > 0, grad


def _bilinear(field, y, x):
    """``field`` (C, H, W) at a fractional point, clamped to the border."""
    h, w = field.shape[1:]
    y = min(max(y, 0.), h - 1.)
    x = min(max(x, 0.), w - 1.)
    y0, x0 = min(int(y), h - 2), min(int(x), w - 2)
    dy, dx = y - y0, x - x0
    return ((1 - dy) * (1 - dx) * field[:, y0, x0]
            + (1 - dy) * dx * field[:, y0, x0 + 1]
            + dy * (1 - dx) * field[:, y0 + 1, x0]
            + dy * dx * field[:, y0 + 1, x0 + 1])


def taps(conv, offset, y, x, mask=None):
    """Where the taps of output ``(y, x)`` of a convolution sample.

    ``conv`` gives ``ksize``, ``stride``, ``pad`` and ``dilate`` (pairs).
    Tap ``k`` samples where the library's one definition puts it
    (:func:`deformable.geometry.tap_grid`, as
    ``deformable.deformable_convolution_2d_sampler`` does): at row
    ``grid_y[k // kw] + dy_k`` and column ``grid_x[k % kw] + dx_k``; the
    first ``kh*kw`` offset channels are ``dx``, the last ``dy``. ``offset``
    is ``(2*kh*kw, H, W)`` or ``None`` (a regular conv), ``mask`` (DCNv2)
    ``(kh*kw, H, W)`` or ``None``; ``(y, x)`` may be fractional (the offsets
    and the mask are then interpolated).

    Returns:
        ``(points, modulation)``: ``(kh*kw, 2)`` array of ``(y, x)`` and
        ``(kh*kw,)`` the mask at each tap (ones without one).
    """
    (kh, kw), (sy, sx), (ph, pw), (dil_y, dil_x) = (
        conv.ksize, conv.stride, conv.pad, conv.dilate)
    k = numpy.arange(kh * kw)
    ys = tap_grid(y, sy, ph, kh, dil_y)[k // kw]
    xs = tap_grid(x, sx, pw, kw, dil_x)[k % kw]
    if offset is not None:
        if offset.shape[0] != 2 * kh * kw:
            raise ValueError(
                'taps: offset has {} channels; one offset group of a {}x{} '
                'kernel has {}'.format(offset.shape[0], kh, kw, 2 * kh * kw))
        d = _bilinear(offset, y, x)
        xs = xs + d[:kh * kw]
        ys = ys + d[kh * kw:]
    modulation = numpy.ones(kh * kw)
    if mask is not None:
        modulation = _bilinear(mask, y, x).astype(numpy.float64)
    points = numpy.stack((ys, xs), axis=1).astype(numpy.float64)
    return points, modulation


class _Geometry(object):
    # The ksize/stride/pad/dilate of a conv, whichever link class holds it.
    def __init__(self, link):
        conv = link.deform_conv if hasattr(link, 'deform_conv') else link
        self.ksize = int_pair(conv.ksize, 'ksize', 1)
        self.stride = int_pair(conv.stride, 'stride', 1)
        self.pad = int_pair(conv.pad, 'pad', 0)
        self.dilate = int_pair(conv.dilate, 'dilate', 1)


def sampling_locations(model, img):
    """The centre unit of ``l3``'s sampling locations, in input pixels.

    Returns:
        ``(unit, l3_points, points, l3_modulation, modulation)``: the unit's
        centre ``(2,)``, ``l3``'s taps ``(9, 2)`` and their ``l2`` taps
        ``(81, 2)``, as ``(y, x)``; and the modulation of each (ones but for
        a DCNv2 convnet; a point's is the product along its path).
    """
    x = img[None]
    predicted = {'l2': (None, None), 'l3': (None, None)}
    with chainer.using_config('train', False), \
            chainer.using_config('enable_backprop', False):
        feats = model.features(x)
        for name, inputs in (('l2', feats['l1']), ('l3', feats['pool'])):
            link = getattr(model, name)
            if hasattr(link, 'offsets_and_mask'):
                predicted[name] = tuple(
                    None if a is None else a.array[0]
                    for a in link.offsets_and_mask(inputs))
    i, j = centre(feats['l3'].shape[2:])
    offset3, mask3 = predicted['l3']
    offset2, mask2 = predicted['l2']
    l3_points, l3_modulation = taps(_Geometry(model.l3), offset3, i, j, mask3)
    l3_points = _unpool(l3_points)
    points, modulation = [], []
    for (py, px), m3 in zip(l3_points, l3_modulation):
        p, m2 = taps(_Geometry(model.l2), offset2, py, px, mask2)
        points.append(p)
        modulation.append(m3 * m2)
    return (_unpool(numpy.array([i, j])), l3_points, numpy.concatenate(points),
            l3_modulation, numpy.concatenate(modulation))


def _unpool(p):
    # Output p of the 4x4/2/1 max pooling covers inputs 2p-1 .. 2p+2: its
    # centre is 2p + 0.5 in l2's output, which is in input pixels as l1 and
    # l2 keep the size.
    return 2. * p + 0.5


def _label(model):
    return kind_of(model).label


def draw(models, examples, indices, threshold, panel_size=2.2):
    """A figure: one row per example, two panels per model."""
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(examples), 2 * len(models)
    fig, axes = plt.subplots(
        n_rows, n_cols, squeeze=False, layout='constrained',
        figsize=(panel_size * n_cols, panel_size * n_rows + .7))
    for row, ((img, label), index) in enumerate(zip(examples, indices)):
        for m, (name, model) in enumerate(models):
            with chainer.using_config('train', False), \
                    chainer.using_config('enable_backprop', False):
                predicted = int(model(img[None]).array.argmax())
            mask, _ = receptive_field(model, img, threshold)
            unit, l3_points, points, l3_modulation, modulation = \
                sampling_locations(model, img)

            ax = axes[row, 2 * m]
            overlay = numpy.zeros(mask.shape + (4,))
            overlay[mask] = (1., 0., 0., .45)
            ax.imshow(img[0], cmap='gray', vmin=0, vmax=1)
            ax.imshow(overlay)
            ax.set_xlabel('predicted {}'.format(predicted), fontsize=8)

            ax = axes[row, 2 * m + 1]
            ax.imshow(img[0], cmap='gray', vmin=0, vmax=1)
            # Area proportional to the modulation (1 without a mask).
            ax.scatter(points[:, 1], points[:, 0],
                       s=6 * numpy.clip(modulation, 0, None), c='red',
                       label='l2 taps (81)')
            ax.scatter(l3_points[:, 1], l3_points[:, 0],
                       s=12 * numpy.clip(l3_modulation, 0, None), c='cyan',
                       label='l3 taps (9)')
            ax.scatter([unit[1]], [unit[0]], s=30, c='lime', marker='x',
                       label='centre unit of l3')
            if row == 0:
                axes[0, 2 * m].set_title(
                    '{}\nreceptive field'.format(name), fontsize=9)
                ax.set_title('{}\nsampling locations'.format(name),
                             fontsize=9)
        axes[row, 0].set_ylabel('test #{}, label {}'.format(
            index, int(label)), fontsize=8)
        for ax in axes[row]:
            h, w = img.shape[1:]
            ax.set_xlim(-.5, w - .5)
            ax.set_ylim(h - .5, -.5)
            ax.set_xticks([])
            ax.set_yticks([])
    handles, labels = axes[0, 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc='outside lower center', ncol=3,
               fontsize=8, frameon=False)
    title = ('Centre unit of l3. Receptive field: |gradient| > {:.3g} x its '
             'max (red)'.format(threshold))
    if any(kind_of(model).flag == 2 for _, model in models):
        title += '\nDCNv2: point area = modulation (the masks along its path)'
    fig.suptitle(title, fontsize=9)
    return fig


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Receptive field and sampling locations of the centre '
        "unit of a trained convnet's third convolution")
    snapshots.add_model_arguments(parser)
    parser.add_argument('--compare', '-c', default=None,
                        help='a second snapshot (either kind) drawn beside '
                        'the first')
    parser.add_argument('--index', '-i', type=int, nargs='+', default=[0],
                        help='scaled-MNIST test images to draw (several give '
                        'a grid, one row each)')
    parser.add_argument('--threshold', type=float, default=1. / 255.,
                        help='fraction of the largest |gradient| above which '
                        'a pixel is in the receptive field (default 1/255)')
    parser.add_argument('--out', '-o', default=None,
                        help='PNG to write (default: next to the snapshot, '
                        'RESUME_vis.png)')
    parser.add_argument('--show', action='store_true',
                        help='also open a window')
    parser.add_argument('--mnist-dir', default=None,
                        help='directory holding the four MNIST IDX files '
                        '(default ${}, else the cache, else fetched)'.format(
                            mnist_data.ENV_DIR))
    parser.add_argument('--mnist-no-verify', action='store_true',
                        help='accept files in --mnist-dir that are not '
                        "MNIST's own")
    args = parser.parse_args(argv)
    if not 0 < args.threshold < 1:
        parser.error('--threshold must be in (0, 1), got {}'.format(
            args.threshold))
    if args.out is not None:
        if not (os.path.splitext(args.out)[1] or os.path.isdir(args.out)):
            args.out += '.png'  # what savefig would write; say that name
        _refuse_unwritable(args.out, '--out')  # before loading anything
    try:
        args.models = [snapshots.load_model(args.resume, args.deformable)]
        if args.compare is not None:
            args.models.append(snapshots.load_model(args.compare))
    except snapshots.SnapshotError as e:
        parser.error(str(e))
    if args.out is None:
        args.out = args.resume + '_vis.png'
        _refuse_unwritable(args.out, '--out (by default next to --resume)')
    return args


def _refuse_unwritable(out, flag):
    """Stops, in one line, if the picture could not be saved as ``out``:
    a problem found only after drawing it would waste the work."""
    from matplotlib.backend_bases import FigureCanvasBase
    problem = writable.file_problem(out, flag)
    extension = os.path.splitext(out)[1][1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if problem is None and extension and extension not in formats:
        problem = '{}: matplotlib cannot write .{} files (only {})'.format(
            flag, extension, ', '.join(sorted(formats)))
    if problem:
        raise SystemExit('error: ' + problem)


def main(argv=None):
    args = parse_args(argv)

    import matplotlib
    if not args.show:
        matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    try:
        _, test = scaled_mnist.get_scaled_mnist(
            args.mnist_dir, verify=False if args.mnist_no_verify else None)
    except mnist_data.MNISTError as e:
        raise SystemExit('error: {}'.format(e))
    bad = [i for i in args.index if not 0 <= i < len(test)]
    if bad:
        raise SystemExit('error: --index {} out of the test set [0, {})'
                         .format(' '.join(map(str, bad)), len(test)))
    examples = [test[i] for i in args.index]

    models = [(_label(model), model) for model in args.models]
    fig = draw(models, examples, args.index, args.threshold)
    out_dir = os.path.dirname(args.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print('wrote {}'.format(args.out))
    if args.show:
        plt.show()
    plt.close(fig)
    return 0


if __name__ == '__main__':
    sys.exit(main())
