#!/usr/bin/env python
"""Exports a trained convnet of the experiment as a standard ONNX model.

    python export_onnx.py --deformable 1 --resume result/model_iter_20 \\
        --out deformable.onnx

The model takes ``image``, a float32 batch ``(N, 1, 28, 28)`` of any size
``N`` (pixels in [0, 1], as the training images), and returns ``logits``
``(N, 10)``. Deformable layers become ONNX's ``DeformConv`` (opset 19). The
result is checked with ``onnx.checker``; the opset and the operator counts
are printed. Needs the ``onnx`` package (``pip install ".[onnx]"``).
"""

import argparse
import collections
import os
import sys

import numpy

import snapshots


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export a trained convnet of the scaled-MNIST '
        'experiment to ONNX')
    snapshots.add_model_arguments(parser)
    parser.add_argument('--out', '-o', required=True,
                        help='the .onnx file to write')
    parser.add_argument('--opset', type=int, default=19,
                        help='ONNX opset, at least 19 (the first with '
                        'DeformConv; default 19)')
    args = parser.parse_args(argv)
    if args.opset < 19:
        parser.error('--opset must be at least 19 (the first with '
                     'DeformConv), got {}'.format(args.opset))
    try:
        args.model = snapshots.load_model(args.resume, args.deformable)
    except snapshots.SnapshotError as e:
        parser.error(str(e))
    return args


def export(model, path, opset=19):
    """Exports a convnet with a dynamic batch; returns the ModelProto."""
    from deformable import onnx as deformable_onnx
    image = numpy.zeros((1, 1, 28, 28), numpy.float32)
    return deformable_onnx.export(
        model, image, path, input_names=['image'], output_names=['logits'],
        opset_version=opset, graph_name=type(model).__name__)


def describe(model):
    """Lines that say what the ONNX model holds."""
    def shape(value_info):
        dims = value_info.type.tensor_type.shape.dim
        return '({})'.format(', '.join(d.dim_param or str(d.dim_value)
                                       for d in dims))
    opsets = ', '.join('{} {}'.format(o.domain or 'ai.onnx', o.version)
                       for o in model.opset_import)
    ops = collections.Counter(node.op_type for node in model.graph.node)
    return [
        'opset: {}'.format(opsets),
        'input: {} {}, output: {} {}'.format(
            model.graph.input[0].name, shape(model.graph.input[0]),
            model.graph.output[0].name, shape(model.graph.output[0])),
        'ops: {}'.format(', '.join('{} {}'.format(op, n)
                                   for op, n in sorted(ops.items()))),
    ]


def main(argv=None):
    args = parse_args(argv)
    try:
        import onnx
        from deformable.onnx import ExportError
    except ImportError as e:
        raise SystemExit('error: {}'.format(e))
    out_dir = os.path.dirname(args.out)
    try:
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
        export(args.model, args.out, args.opset)
        # Check the file as written.
        onnx.checker.check_model(args.out, full_check=True)
        model = onnx.load(args.out)
    except ExportError as e:
        raise SystemExit('error: cannot export {}: {}'.format(
            args.resume, e))
    except OSError as e:
        raise SystemExit('error: cannot write {}: {}'.format(args.out, e))
    print('wrote {} ({} bytes), checked by onnx.checker'.format(
        args.out, os.path.getsize(args.out)))
    for line in describe(model):
        print(line)
    return 0


if __name__ == '__main__':
    sys.exit(main())
