"""Export Chainer graphs to ONNX, with our deformable node as ``DeformConv``.

:func:`export` runs a model once on example inputs, follows the graph from
the outputs back through each variable's ``creator_node`` to the inputs,
and writes every function node as standard ONNX operators (opset 19 or
later, the first with ``DeformConv``). A node it does not know raises
:class:`ExportError` naming it; nothing is left out silently.

Supported nodes: our deformable convolution (stride, pad, dilation, groups,
offset groups, mask, bias; with constant zero offsets and no mask it is a
plain ``Conv``), ``F.convolution_2d`` (also ``cover_all``), ``F.linear``,
``F.relu``, ``F.sigmoid``, ``F.max_pooling_nd`` / ``F.max_pooling_2d``
(also Chainer's default ``cover_all=True``), ``F.reshape`` and
``F.split_axis``.

**Offset layout.** Our offsets are planar per offset group, ``[dx of K
taps, dy of K taps]``; ``DeformConv`` wants ``(dy, dx)`` interleaved per
tap. When the offsets come straight from a convolution with constant
weights (the link's ``offset_conv``, possibly through the ``split_axis``
of a modulated link), that convolution's output channels are reordered in
its weights and bias, so the conversion costs nothing at run time;
otherwise a ``Gather`` along the channels converts them. The mask has the
same layout in both.

Needs the ``onnx`` package (``pip install deformable[onnx]``); ``import
deformable`` does not import this module.
"""

import collections

import numpy

import chainer
from chainer.functions.activation.relu import ReLU
from chainer.functions.activation.sigmoid import Sigmoid
from chainer.functions.array.reshape import Reshape
from chainer.functions.array.split_axis import SplitAxis
from chainer.functions.connection.convolution_2d import Convolution2DFunction
from chainer.functions.connection.linear import LinearFunction
from chainer.functions.pooling.max_pooling_nd import MaxPoolingND
from chainer.utils import conv

try:
    import onnx
    from onnx import helper
    from onnx import numpy_helper
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        'deformable.onnx needs the onnx package: pip install onnx, or '
        'install deformable with the onnx extra (pip install '
        '".[onnx]")') from e

from deformable import functions


# The first opset with DeformConv.
MIN_OPSET = 19
BATCH = 'batch'


class ExportError(ValueError):
    """The graph holds something the exporter cannot write faithfully."""


# --- The one place that knows our deformable node -------------------------

DeformableParams = collections.namedtuple(
    'DeformableParams',
    'x offset W b mask stride pad dilate groups')


def read_deformable_node(node):
    """Our deformable convolution's inputs and hyperparameters, or ``None``
    if ``node`` is another kind of node.

    This is the only function that knows the node's class
    (``deformable.functions.DeformableConvolution2DFunction``: its
    ``hyperparameters`` and ``named_inputs``); adapt it, and only it, when
    they change.

    Returns:
        :class:`DeformableParams`: the input variable nodes (``b`` and
        ``mask`` ``None`` when absent) and ``stride``, ``pad``, ``dilate``
        as ``(y, x)`` pairs, ``groups`` an int.
    """
    if type(node) is not functions.DeformableConvolution2DFunction:
        return None
    stride, pad, dilate, groups = node.hyperparameters
    return DeformableParams(*node.named_inputs(node.inputs), stride=stride,
                            pad=pad, dilate=dilate, groups=groups)


# --------------------------------------------------------------------------

def interleaving_permutation(n_groups, n_taps):
    """Channel order of ONNX's offsets in ours: ``theirs = ours[:, perm]``.

    It is the README's conversion applied to the channel indices, so that
    the conversion stays the specification.
    """
    n, G, K, out_h, out_w = 1, n_groups, n_taps, 1, 1
    o = numpy.arange(2 * G * K).reshape(n, 2 * G * K, out_h, out_w)
    theirs = o.reshape(n, G, 2, K, out_h, out_w)[:, :, ::-1].transpose(
        0, 1, 3, 2, 4, 5).reshape(n, 2 * G * K, out_h, out_w)
    return theirs.ravel()


def export(model, args, path=None, input_names=None, output_names=None,
           opset_version=MIN_OPSET, dynamic_batch=True, graph_name=None):
    """Exports ``model`` as an ONNX model.

    The model runs once on ``args`` under ``chainer.using_config('train',
    False)`` and the graph it builds is written out; parameters become
    initializers named by their path in the model (``l2/deform_conv/W``).

    Args:
        model: A callable, usually a :class:`chainer.Link`, taking the
            arrays of ``args`` and returning a :class:`~chainer.Variable`
            or a tuple of them.
        args: An example input (array or Variable) or a tuple of them.
        path (str or None): Where to save the model, if given.
        input_names, output_names (list of str or None): Names of the
            graph's inputs and outputs (default ``input0, ...`` and
            ``output0, ...``).
        opset_version (int): The default domain's opset, at least 19.
        dynamic_batch (bool): Make axis 0 of every input and output a
            symbolic ``batch`` dimension, so that the model runs on any
            batch size; a node that mixes the batch axis with others is
            then refused.
        graph_name (str or None): Default: the model's class name.

    Returns:
        onnx.ModelProto: The model, checked by ``onnx.checker``.

    Raises:
        ExportError: A node is not supported (the message names it), or
            the graph cannot be written faithfully.
    """
    if opset_version < MIN_OPSET:
        raise ValueError('opset_version must be at least {} (the first with '
                         'DeformConv), got {}'.format(MIN_OPSET,
                                                      opset_version))
    if not isinstance(args, (tuple, list)):
        args = (args,)
    inputs = [a if isinstance(a, chainer.Variable) else chainer.Variable(a)
              for a in args]
    with chainer.using_config('train', False), \
            chainer.using_config('enable_backprop', True):
        outputs = model(*inputs)
    if not isinstance(outputs, (tuple, list)):
        outputs = (outputs,)
    input_names = _names(input_names, 'input', len(inputs))
    output_names = _names(output_names, 'output', len(outputs))
    params = {}
    if isinstance(model, chainer.Link):
        params = {id(p.node): name.lstrip('/')
                  for name, p in model.namedparams()}
    exporter = _Exporter(inputs, input_names, outputs, output_names, params,
                         dynamic_batch)
    graph = exporter.graph(graph_name or type(model).__name__)
    opsets = [helper.make_opsetid('', opset_version)]
    onnx_model = helper.make_model(
        graph, opset_imports=opsets, producer_name='deformable',
        ir_version=helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(onnx_model, full_check=True)
    if path is not None:
        onnx.save(onnx_model, path)
    return onnx_model


def _names(names, prefix, count):
    if names is None:
        return ['{}{}'.format(prefix, i) for i in range(count)]
    names = list(names)
    if len(names) != count:
        raise ValueError('{} {} names for {} {}s'.format(
            len(names), prefix, count, prefix))
    return names


def _describe(node):
    return '{} (rank {})'.format(node.label, node.rank)


def _output_nodes(node):
    # FunctionNode.outputs holds weak references; an unused output of a
    # split may be gone, and is then None.
    return [ref() for ref in node.outputs]


class _Exporter(object):

    def __init__(self, inputs, input_names, outputs, output_names, params,
                 dynamic_batch):
        self.dynamic_batch = dynamic_batch
        self.params = params
        self.inputs = [v.node for v in inputs]
        self.outputs = []
        self.names = {}         # id(variable node) -> tensor name
        self.used_names = set()
        for node, name in zip(self.inputs, input_names):
            self._name(node, name)
        for v, name in zip(outputs, output_names):
            if not isinstance(v, chainer.Variable):
                raise ExportError('the model returned {}, not a Variable'
                                  .format(type(v).__name__))
            if v.creator_node is None:
                raise ExportError('output {!r} is not computed by any '
                                  'function node'.format(name))
            if id(v.node) in self.names:
                raise ExportError('output {!r} is also {!r}'.format(
                    name, self.names[id(v.node)]))
            self.outputs.append(v.node)
            self._name(v.node, name)
        self.onnx_nodes = []
        self.initializers = []
        self.counts = collections.Counter()
        self.function_nodes, self.uses = self._trace()
        # id(convolution node) -> order of its output channels, for the
        # offsets converted in a convolution's weights; ids of the offset
        # variable nodes so converted.
        self.channel_orders = {}
        self.converted_offsets = set()
        self._plan_offset_conversions()

    # -- Graph --------------------------------------------------------------

    def _trace(self):
        """The function nodes between inputs and outputs, in topological
        order, and how often each variable node is used."""
        input_ids = {id(v) for v in self.inputs}
        found, order = set(), []
        uses = collections.Counter(id(v) for v in self.outputs)
        stack = [v.creator_node for v in self.outputs]
        while stack:
            node = stack.pop()
            if id(node) in found:
                continue
            found.add(id(node))
            order.append(node)
            for v in node.inputs:
                uses[id(v)] += 1
                if v.creator_node is not None and id(v) not in input_ids:
                    stack.append(v.creator_node)
        # A node's rank exceeds its inputs' creators'; sorted() is stable.
        return sorted(order, key=lambda node: node.rank), uses

    def graph(self, name):
        for node in self.function_nodes:
            self._emit(node)
        return helper.make_graph(
            self.onnx_nodes, name,
            [self._value_info(v) for v in self.inputs],
            [self._value_info(v) for v in self.outputs],
            initializer=self.initializers)

    def _value_info(self, v):
        shape = list(v.shape)
        if self.dynamic_batch:
            shape[0] = BATCH
        return helper.make_tensor_value_info(
            self.names[id(v)], helper.np_dtype_to_tensor_dtype(v.dtype),
            shape)

    # -- Names and constants ------------------------------------------------

    def _name(self, v, name):
        if name in self.used_names:
            raise ExportError('two tensors named {!r}'.format(name))
        self.used_names.add(name)
        self.names[id(v)] = name
        return name

    def _fresh(self, prefix):
        while True:
            name = '{}_{}'.format(prefix, self.counts[prefix])
            self.counts[prefix] += 1
            if name not in self.used_names:
                self.used_names.add(name)
                return name

    def _constant(self, array, prefix):
        name = self._fresh(prefix)
        self.initializers.append(
            numpy_helper.from_array(numpy.asarray(array), name))
        return name

    def _is_constant(self, v):
        return v.creator_node is None and v not in self.inputs

    def _value(self, v, node):
        """The array of a constant (leaf, non-input) variable node."""
        var = v.get_variable_or_none()
        array = var.array if var is not None else v.data
        if array is None:
            raise ExportError(
                'an input of {} is a constant whose value Chainer did not '
                'keep; pass it as a Variable that stays alive, or as a '
                'parameter of the model'.format(_describe(node)))
        return chainer.backend.CpuDevice().send(array)

    def _input(self, v, node):
        """The tensor name of input ``v`` of ``node`` (a constant becomes
        an initializer on first use)."""
        if id(v) not in self.names:
            if not self._is_constant(v):
                raise ExportError('{} reads a variable the exporter has not '
                                  'written'.format(_describe(node)))
            if id(v) in self.params:
                self._name(v, self.params[id(v)])
            else:
                self.names[id(v)] = self._fresh('constant')
            self.initializers.append(numpy_helper.from_array(
                self._value(v, node), self.names[id(v)]))
        return self.names[id(v)]

    def _outputs(self, node, prefix):
        names = []
        for v in _output_nodes(node):
            if v is not None and id(v) in self.names:
                names.append(self.names[id(v)])
            elif v is not None:
                self.names[id(v)] = self._fresh(prefix)
                names.append(self.names[id(v)])
            else:
                names.append(self._fresh(prefix))
        return names

    def _add(self, op_type, inputs, node, **attributes):
        outputs = self._outputs(node, op_type)
        self.onnx_nodes.append(helper.make_node(
            op_type, inputs, outputs, name=self._fresh(op_type + '_node'),
            **attributes))

    # -- Offsets: planar to interleaved --------------------------------------

    def _plan_offset_conversions(self):
        """Reorders, where it can, the output channels of the convolution
        that computes a deformable node's offsets instead of converting
        the offsets at run time."""
        for node in self.function_nodes:
            params = read_deformable_node(node)
            if params is None or self._plain_convolution(node):
                continue
            target = self._offset_source(params.offset)
            if target is None:
                continue
            conv, start = target
            n_taps = params.W.shape[2] * params.W.shape[3]
            n_offsets = params.offset.shape[1]
            order = self.channel_orders.setdefault(
                id(conv), numpy.arange(_output_nodes(conv)[0].shape[1]))
            order[start:start + n_offsets] = start + interleaving_permutation(
                n_offsets // (2 * n_taps), n_taps)
            self.converted_offsets.add(id(params.offset))

    def _offset_source(self, offset):
        """``(convolution node, first channel)`` when ``offset`` is a run of
        channels that a convolution with constant weights computes for it
        alone (directly or through a split along the channels); else
        ``None``."""
        if self.uses[id(offset)] != 1 or offset in self.outputs:
            return None
        creator, start = offset.creator_node, 0
        if isinstance(creator, SplitAxis):
            split_input = creator.inputs[0]
            if (_axis(creator.axis, len(split_input.shape)) != 1
                    or self.uses[id(split_input)] != 1
                    or split_input in self.outputs):
                return None
            start = _split_starts(creator)[_output_nodes(creator).index(
                offset)]
            creator = split_input.creator_node
        if creator is None or not self._convolution_weights_constant(creator):
            return None
        return creator, start

    def _convolution_weights_constant(self, node):
        if isinstance(node, Convolution2DFunction):
            return all(self._is_constant(v) for v in node.inputs[1:])
        params = read_deformable_node(node)
        if params is None or not self._plain_convolution(node):
            return False
        return all(self._is_constant(v) for v in (params.W, params.b)
                   if v is not None)

    def _plain_convolution(self, node):
        """Whether our deformable node has constant zero offsets and no
        mask: a plain convolution."""
        params = read_deformable_node(node)
        return (params.mask is None and self._is_constant(params.offset)
                and not numpy.any(self._value(params.offset, node)))

    def _weights(self, node, W, b):
        """Tensor names of a convolution's weight and bias, with its output
        channels reordered if planned."""
        order = self.channel_orders.get(id(node))
        if order is None:
            return [self._input(v, node) for v in (W, b) if v is not None]
        return [self._constant(self._value(v, node)[order],
                               self.params.get(id(v), 'constant')
                               + '_interleaved')
                for v in (W, b) if v is not None]

    # -- Nodes ---------------------------------------------------------------

    def _emit(self, node):
        params = read_deformable_node(node)
        if params is not None:
            return self._deformable(node, params)
        for node_class, emit in self._EMITTERS:
            if type(node) is node_class:
                return emit(self, node)
        raise ExportError(
            'cannot export {}: the ONNX exporter does not support this '
            'function node (supported: {})'.format(
                _describe(node), ', '.join(
                    ['our deformable convolution']
                    + [c.__name__ for c, _ in self._EMITTERS])))

    def _deformable(self, node, p):
        x = self._input(p.x, node)
        kh, kw = p.W.shape[2:]
        attributes = dict(
            kernel_shape=[kh, kw], strides=list(p.stride),
            pads=[p.pad[0], p.pad[1], p.pad[0], p.pad[1]],
            dilations=list(p.dilate), group=p.groups)
        if self._plain_convolution(node):
            return self._add('Conv', [x] + self._weights(node, p.W, p.b),
                             node, **attributes)
        for v in (p.offset, p.mask):
            if v is not None and self._is_constant(v) and self.dynamic_batch:
                raise ExportError(
                    '{} has a constant offset or mask, which has a fixed '
                    'batch size; export with dynamic_batch=False'.format(
                        _describe(node)))
        n_taps = kh * kw
        n_groups = p.offset.shape[1] // (2 * n_taps)
        offset = self._input(p.offset, node)
        if id(p.offset) not in self.converted_offsets:
            interleaved = self._fresh('offset_interleaved')
            self.onnx_nodes.append(helper.make_node(
                'Gather', [offset, self._constant(
                    interleaving_permutation(n_groups, n_taps).astype(
                        numpy.int64), 'offset_order')],
                [interleaved], axis=1, name=self._fresh('Gather_node')))
            offset = interleaved
        inputs = [x, self._input(p.W, node), offset,
                  '' if p.b is None else self._input(p.b, node)]
        if p.mask is not None:
            inputs.append(self._input(p.mask, node))
        while not inputs[-1]:
            inputs.pop()
        self._add('DeformConv', inputs, node, offset_group=n_groups,
                  **attributes)

    def _convolution(self, node):
        x, W = node.inputs[:2]
        b = node.inputs[2] if len(node.inputs) == 3 else None
        # cover_all adds stride - 1 rows and columns of zeros at the end,
        # as Chainer's im2col does.
        extra_y, extra_x = ((node.sy - 1, node.sx - 1) if node.cover_all
                            else (0, 0))
        self._add('Conv', [self._input(x, node)] + self._weights(node, W, b),
                  node, kernel_shape=list(W.shape[2:]),
                  strides=[node.sy, node.sx],
                  pads=[node.ph, node.pw, node.ph + extra_y,
                        node.pw + extra_x],
                  dilations=[node.dy, node.dx], group=node.groups)

    def _linear(self, node):
        names = [self._input(v, node) for v in node.inputs]
        self._add('Gemm', names, node, transB=1)

    def _max_pooling(self, node):
        x = node.inputs[0]
        sizes = x.shape[2:]
        # Chainer pads with -inf; cover_all pads stride - 1 more at the end
        # (its output size is ceil-like). ONNX's MaxPool ignores padding,
        # which is the same unless a window holds padding only (Chainer
        # gives -inf there).
        ends = [p + (s - 1 if node.cover_all else 0)
                for p, s in zip(node.pad, node.stride)]
        for size, k, s, p in zip(sizes, node.ksize, node.stride, node.pad):
            out = conv.get_conv_outsize(size, k, s, p, node.cover_all)
            if p >= k or (out - 1) * s - p >= size:
                raise ExportError(
                    '{}: a pooling window covers padding only (kernel {}, '
                    'stride {}, pad {}, input {}); Chainer gives -inf there '
                    'and ONNX does not define it'.format(
                        _describe(node), node.ksize, node.stride, node.pad,
                        tuple(sizes)))
        self._add('MaxPool', [self._input(x, node)], node,
                  kernel_shape=list(node.ksize), strides=list(node.stride),
                  pads=list(node.pad) + ends)

    def _reshape(self, node):
        x = node.inputs[0]
        out_shape = list(_output_nodes(node)[0].shape)
        if self.dynamic_batch:
            if out_shape[0] != x.shape[0] or 0 in out_shape[1:]:
                raise ExportError(
                    '{} reshapes {} to {}, changing the batch axis; export '
                    'with dynamic_batch=False'.format(
                        _describe(node), x.shape, tuple(out_shape)))
            out_shape[0] = 0    # ONNX: keep the input's size
        self._add('Reshape', [self._input(x, node), self._constant(
            numpy.array(out_shape, numpy.int64), 'shape')], node)

    def _split(self, node):
        x = node.inputs[0]
        axis = _axis(node.axis, len(x.shape))
        if axis == 0 and self.dynamic_batch:
            raise ExportError('{} splits the batch axis; export with '
                              'dynamic_batch=False'.format(_describe(node)))
        self._add('Split', [self._input(x, node), self._constant(
            numpy.array(_split_sizes(node), numpy.int64), 'split')], node,
            axis=axis)

    def _unary(op_type):
        def emit(self, node):
            self._add(op_type, [self._input(node.inputs[0], node)], node)
        return emit

    _EMITTERS = (
        (Convolution2DFunction, _convolution),
        (LinearFunction, _linear),
        (MaxPoolingND, _max_pooling),
        (ReLU, _unary('Relu')),
        (Sigmoid, _unary('Sigmoid')),
        (Reshape, _reshape),
        (SplitAxis, _split),
    )
    del _unary


def _axis(axis, ndim):
    return axis + ndim if axis < 0 else axis


def _split_starts(node):
    """The first index of each of a ``SplitAxis`` node's outputs."""
    sizes = _split_sizes(node)
    return [int(start) for start in numpy.cumsum([0] + sizes[:-1])]


def _split_sizes(node):
    """The sizes of a ``SplitAxis`` node's outputs along its axis."""
    shape = node.inputs[0].shape
    pieces = numpy.split(numpy.arange(shape[_axis(node.axis, len(shape))]),
                         node.indices_or_sections)
    return [len(piece) for piece in pieces]
