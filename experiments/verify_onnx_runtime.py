#!/usr/bin/env python
"""The exported convnets in ONNX Runtime against Chainer, on scaled MNIST.

Two halves, run by ``tools/verify_onnx_runtime.sh`` in two environments:

* ``chainer`` (the project's Python 3.10 environment): exports each convnet
  with ``experiments/export_onnx.py``'s exporter, computes Chainer's logits
  on the first ``--images`` scaled-MNIST test images and times Chainer's
  inference (batch 1 and batch 100); writes it all to ``--out``.
* ``ort`` (Python >= 3.11 with ``onnxruntime`` >= 1.32, whose CPU
  ``DeformConv`` kernel the 3.10 wheels lack; it imports only NumPy and
  ONNX Runtime): runs the exported models on the same images, checks the
  logits against Chainer's (``--rtol`` relative to each image's largest
  logit) and the predicted classes (identical), times ONNX Runtime the same
  way and prints the comparison. Exits 1 if a check fails.

Both time the whole set in batches of the given size, after one warm-up
batch, and report the median of ``--repeat`` passes per image.
"""

import argparse
import json
import os
import sys
import time

import numpy


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --deformable value, name, committed snapshot.
CONVNETS = [
    (0, 'regular', 'results/regular/non_deformable_20'),
    (1, 'deformable', 'results/deformable/model_iter_20'),
    (2, 'modulated', 'results/modulated/modulated_iter_20'),
]
BATCHES = (1, 100)


def seconds_per_image(run, images, batch, repeat):
    """Median over ``repeat`` passes of the time per image of ``run`` over
    ``images`` in batches of ``batch`` (after one warm-up batch)."""
    run(images[:batch])
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            run(images[i:i + batch])
        times.append((time.perf_counter() - start) / len(images))
    return float(numpy.median(times))


def in_batches(run, images, batch=100):
    return numpy.concatenate([run(images[i:i + batch])
                              for i in range(0, len(images), batch)])


# --- Chainer's half ----------------------------------------------------------

def chainer_half(args):
    import chainer

    import export_onnx
    import mnist_data
    import scaled_mnist
    from snapshots import load_model
    from snapshots import SnapshotError

    snapshots = []
    for flag, name, committed in CONVNETS:
        path = getattr(args, name)
        if path is None:
            path = os.path.join(ROOT, committed)
            if not os.path.isfile(path):
                print('{}: skipped (no {}; pass --{} SNAPSHOT)'.format(
                    name, committed, name))
                continue
        try:
            snapshots.append((flag, name, path, load_model(path, flag)))
        except SnapshotError as e:
            raise SystemExit('error: {}'.format(e))
    try:
        _, test = scaled_mnist.get_scaled_mnist(test_size=args.images)
    except (mnist_data.MNISTError, ValueError) as e:
        raise SystemExit('error: {}'.format(e))
    images, labels = chainer.dataset.concat_examples(test[:])
    os.makedirs(args.out, exist_ok=True)
    numpy.savez(os.path.join(args.out, 'images.npz'), images=images,
                labels=labels)
    print('Chainer {}, NumPy {}, Python {}; {} scaled-MNIST test images; '
          'threads: {}'.format(
              chainer.__version__, numpy.__version__,
              sys.version.split()[0], len(images), ', '.join(
                  '{}={}'.format(k, os.environ.get(k, 'unset'))
                  for k in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS',
                            'DEFORMABLE_NUM_THREADS'))))

    manifest = {'images': len(images), 'repeat': args.repeat,
                'convnets': []}
    for flag, name, path, model in snapshots:
        onnx_path = os.path.join(args.out, name + '.onnx')
        onnx_model = export_onnx.export(model, onnx_path)

        def run(x):
            with chainer.using_config('train', False), \
                    chainer.using_config('enable_backprop', False):
                return model(x).array

        logits = in_batches(run, images)
        numpy.save(os.path.join(args.out, name + '_chainer.npy'), logits)
        timings = {str(b): seconds_per_image(run, images, b, args.repeat)
                   for b in BATCHES}
        manifest['convnets'].append({
            'name': name, 'snapshot': _shown(path),
            'onnx': name + '.onnx', 'chainer_seconds_per_image': timings})
        print('{}: {}'.format(name, _shown(path)))
        for line in export_onnx.describe(onnx_model):
            print('  ' + line)
    with open(os.path.join(args.out, 'chainer.json'), 'w') as f:
        json.dump(manifest, f, indent=1)


def _shown(path):
    # Relative to the repository where inside it.
    path = os.path.abspath(path)
    inside = os.path.commonpath([path, ROOT]) == ROOT
    return os.path.relpath(path, ROOT) if inside else path


# --- ONNX Runtime's half -----------------------------------------------------

def ort_half(args):
    import onnxruntime

    with open(os.path.join(args.dir, 'chainer.json')) as f:
        manifest = json.load(f)
    repeat = manifest['repeat']
    with numpy.load(os.path.join(args.dir, 'images.npz')) as data:
        images, labels = data['images'], data['labels']
    print('ONNX Runtime {} (CPUExecutionProvider, {} thread), NumPy {}, '
          'Python {}'.format(onnxruntime.__version__, args.threads,
                             numpy.__version__, sys.version.split()[0]))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL

    rows, failed = [], False
    for convnet in manifest['convnets']:
        session = onnxruntime.InferenceSession(
            os.path.join(args.dir, convnet['onnx']), options,
            providers=['CPUExecutionProvider'])

        def run(x):
            return session.run(None, {'image': x})[0]

        expected = numpy.load(os.path.join(args.dir,
                                           convnet['name'] + '_chainer.npy'))
        # The batch of one as well: the exported batch axis is symbolic.
        for batch in BATCHES:
            logits = in_batches(run, images, batch)
            error = (numpy.abs(logits - expected).max(axis=1)
                     / numpy.abs(expected).max(axis=1)).max()
            same = int((logits.argmax(axis=1)
                        == expected.argmax(axis=1)).sum())
            ok = error <= args.rtol and same == len(images)
            failed |= not ok
            print('{} (batch {}): largest logit error {:.2e} of the image\'s '
                  'largest logit, same class on {}/{} images, accuracy '
                  'Chainer {:.4f} ONNX Runtime {:.4f}: {}'.format(
                      convnet['name'], batch, error, same, len(images),
                      (expected.argmax(axis=1) == labels).mean(),
                      (logits.argmax(axis=1) == labels).mean(),
                      'ok' if ok else 'FAILED'))
        chainer_times = convnet['chainer_seconds_per_image']
        for batch in BATCHES:
            ort_time = seconds_per_image(run, images, batch, repeat)
            rows.append((convnet['name'], batch,
                         chainer_times[str(batch)] * 1e3, ort_time * 1e3))

    print()
    print('Inference time per image, CPU, one thread, median of {} passes '
          'over {} images:'.format(repeat, len(images)))
    print()
    print('| convnet | batch | Chainer (ms) | ONNX Runtime (ms) | '
          'Chainer / ONNX Runtime |')
    print('|---|---|---|---|---|')
    for name, batch, chainer_ms, ort_ms in rows:
        print('| {} | {} | {:.3f} | {:.3f} | {:.1f}x |'.format(
            name, batch, chainer_ms, ort_ms, chainer_ms / ort_ms))
    print()
    print('FAILED' if failed else 'all checks passed (logits within {:g} '
          'relative, identical classes)'.format(args.rtol))
    return 1 if failed else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    halves = parser.add_subparsers(dest='half', required=True)
    chainer_parser = halves.add_parser(
        'chainer', help='export, Chainer logits and timings (Python 3.10)')
    for flag, name, committed in CONVNETS:
        chainer_parser.add_argument(
            '--' + name, metavar='SNAPSHOT',
            help='the --deformable {} snapshot (default {}, skipped if '
            'absent)'.format(flag, committed))
    chainer_parser.add_argument('--images', type=int, default=1000,
                                help='first N scaled-MNIST test images')
    chainer_parser.add_argument('--out', required=True,
                                help='directory for the models and logits')
    ort_parser = halves.add_parser(
        'ort', help='ONNX Runtime against Chainer (Python >= 3.11)')
    ort_parser.add_argument('--dir', required=True,
                            help="the chainer half's --out")
    ort_parser.add_argument('--rtol', type=float, default=1e-4,
                            help="largest logit error relative to the "
                            "image's largest logit (default 1e-4)")
    ort_parser.add_argument('--threads', type=int, default=1,
                            help="ONNX Runtime's intra-op threads")
    chainer_parser.add_argument('--repeat', type=int, default=3,
                                help='timed passes of each half (the median '
                                'is reported)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.half == 'chainer':
        return chainer_half(args)
    return ort_half(args)


if __name__ == '__main__':
    sys.exit(main())
