"""Loops over a sample's channels, written as LLVM vector operations.

Numba runs LLVM with its SLP vectorizer off, and LLVM's loop vectorizer
only pays off from 32 floats on: the 8 channels of an offset group (32
channels in 4 groups) would go one float at a time, and that costs the
general op twice the default's time. These intrinsics take the channels
``tuning.VECTOR_BYTES`` at a time, then the rest one by one. Per-channel
results (the blend, the scatter) are the scalar code's, bit for bit; sums
over channels are added in one fixed order (:func:`tap_backward`).

Arrays must be C-contiguous; positions are flat element indices into them,
unchecked (like Numba's own indexing): the callers compute them from the
sampling geometry, whose corners stay inside the bordered plane.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from deformable import tuning


def _lanes(dtype):
    return tuning.VECTOR_BYTES // (dtype.bitwidth // 8)


def _contiguous_alike(*arrays):
    """Whether all are C-contiguous float arrays of one dtype."""
    return all(isinstance(a, types.Array) and a.layout == 'C'
               and isinstance(a.dtype, types.Float)
               and a.dtype == arrays[0].dtype for a in arrays)


def _pointer(context, builder, array_type, array):
    return context.make_array(array_type)(context, builder, array).data


def _splat(builder, value, lanes):
    vector = ir.VectorType(value.type, lanes)
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), value,
                                 ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32),
                                                            lanes), None))


class _Access(object):
    """Loads and stores of one width (1: scalars) at ``base + index``."""

    def __init__(self, builder, lanes, align):
        self.builder = builder
        self.lanes = lanes
        self.align = align

    def _address(self, base, index, element):
        pointer = self.builder.gep(base, [index])
        if self.lanes == 1:
            return pointer
        return self.builder.bitcast(
            pointer, ir.VectorType(element, self.lanes).as_pointer())

    def load(self, base, index):
        return self.builder.load(
            self._address(base, index, base.type.pointee), align=self.align)

    def store(self, value, base, index):
        self.builder.store(
            value, self._address(base, index, base.type.pointee),
            align=self.align)

    def splat(self, value):
        return value if self.lanes == 1 else _splat(self.builder, value,
                                                    self.lanes)


def _channel_loops(context, builder, count, dtype, body):
    """``body(access, j, exact)`` for j in ``[0, count)``: a vector of
    channels at a time while they last, then one; ``exact`` when one vector
    is all there is.

    Exactly one vector's worth (8 float32 channels: 32 channels in 4
    offset groups) skips the loops: they cost more than the work.
    """
    intp = context.get_value_type(types.intp)
    lanes = _lanes(dtype)
    align = dtype.bitwidth // 8
    vector = _Access(builder, lanes, align)
    zero = ir.Constant(intp, 0)
    one_vector = builder.icmp_signed('==', count, ir.Constant(intp, lanes))
    with builder.if_else(one_vector, likely=True) as (then, otherwise):
        with then:
            body(vector, zero, True)
        with otherwise:
            full = builder.and_(count, ir.Constant(intp, -lanes))
            for access, start, stop in ((vector, zero, full),
                                        (_Access(builder, 1, align), full,
                                         count)):
                with cgutils.for_range_slice(
                        builder, start, stop,
                        ir.Constant(intp, access.lanes)) as (j, _):
                    body(access, j, False)


def _corner_positions(builder, position, steps):
    """The four corners' positions (00, 01, 10, 11) from the top-left's."""
    return [builder.add(position, step) for step in steps]


def _weighted_sum(builder, access, weights, corners):
    """``w00 v00 + w01 v01 + w10 v10 + w11 v11``, in that order."""
    total = None
    for weight, value in zip(weights, corners):
        term = builder.fmul(access.splat(weight), value)
        total = term if total is None else builder.fadd(total, term)
    return total


def _corner_steps(builder, step_x, step_y):
    zero = ir.Constant(step_x.type, 0)
    return zero, step_x, step_y, builder.add(step_y, step_x)


def _is_tuple_of(value, count, kind):
    return (isinstance(value, types.UniTuple) and value.count == count
            and isinstance(value.dtype, kind))


def _unpack(builder, value, count):
    return [builder.extract_value(value, i) for i in range(count)]


@intrinsic
def blend(typingctx, out, at, source, corner, steps, count, weights):
    """``out[at + j] = w00 source[corner + j] + w01 source[corner + step_x
    + j] + w10 source[corner + step_y + j] + w11 source[corner + step_y +
    step_x + j]`` for ``j < count``: a bilinear sample of ``count``
    channels (``steps``: ``(step_x, step_y)``; ``weights``: ``(w00, w01,
    w10, w11)``)."""
    if not (_contiguous_alike(out, source)
            and _is_tuple_of(steps, 2, types.Integer)
            and _is_tuple_of(weights, 4, types.Float)
            and weights.dtype == out.dtype):
        return None
    signature = types.void(out, types.intp, source, types.intp, steps,
                           types.intp, weights)

    def codegen(context, builder, sig, args):
        out_, at_, source_, corner_, steps_, count_, weights_ = args
        out_base = _pointer(context, builder, sig.args[0], out_)
        source_base = _pointer(context, builder, sig.args[2], source_)
        steps = _corner_steps(builder, *_unpack(builder, steps_, 2))
        weights = _unpack(builder, weights_, 4)

        def body(access, j, exact):
            corners = [access.load(source_base, where) for where in
                       _corner_positions(builder, builder.add(corner_, j),
                                         steps)]
            access.store(_weighted_sum(builder, access, weights, corners),
                         out_base, builder.add(at_, j))
        _channel_loops(context, builder, count_, sig.args[0].dtype, body)
        return context.get_dummy_value()
    return signature, codegen


def _sum_lanes(builder, vectors):
    """The lane sums of 4 vectors (float32 x 8 or float64 x 4), as one
    4-lane vector, in a fixed order: pairwise sums within 128-bit halves
    first (:func:`_pair_sums`, what x86's ``haddps`` does), then across."""
    a_b = _pair_sums(builder, vectors[0], vectors[1])
    c_d = _pair_sums(builder, vectors[2], vectors[3])
    lanes = a_b.type.count
    if lanes == 8:
        # [a0123 b0123 c0123 d0123 | a4567 b4567 c4567 d4567]
        quads = _pair_sums(builder, a_b, c_d)
        return builder.fadd(
            builder.shuffle_vector(quads, quads, _indices([0, 1, 2, 3])),
            builder.shuffle_vector(quads, quads, _indices([4, 5, 6, 7])))
    # [a01 b01 a23 b23], [c01 d01 c23 d23]
    return builder.fadd(
        builder.shuffle_vector(a_b, c_d, _indices([0, 1, 4, 5])),
        builder.shuffle_vector(a_b, c_d, _indices([2, 3, 6, 7])))


def _pair_sums(builder, a, b):
    """Sums of neighbouring lanes of ``a`` and ``b``, interleaved within
    each 128-bit half: ``[a0+a1, a2+a3, b0+b1, b2+b3, ...]`` (float32),
    ``[a0+a1, b0+b1, a2+a3, b2+b3]`` (float64)."""
    lanes = a.type.count
    block = lanes // 2 if lanes == 4 else 4
    even, odd = [], []
    for start in range(0, lanes, block):
        for source in (0, lanes):
            for i in range(0, block, 2):
                even.append(source + start + i)
                odd.append(source + start + i + 1)
    return builder.fadd(builder.shuffle_vector(a, b, _indices(even)),
                        builder.shuffle_vector(a, b, _indices(odd)))


def _indices(values):
    return ir.Constant(ir.VectorType(ir.IntType(32), len(values)), values)


@intrinsic
def tap_backward(typingctx, planes, corner, steps, count, columns, at,
                 weights, flags, sums, sums_at):
    """A tap's share of the backward, with its corners loaded once.

    ``planes`` is ``(source, target)``, ``columns`` ``(columns,
    grad_columns)``, ``steps`` ``(step_x, step_y)``, ``weights`` ``(w00,
    w01, w10, w11)``, ``flags`` ``(dots, scatter, fill, accumulate)``. For
    ``j < count``: if ``fill``, writes :func:`blend`'s ``columns[at + j]``
    (for the weight's gradient); if ``dots``, writes ``(s00, s01, s10,
    s11)`` to ``sums[sums_at:sums_at + 4]`` (adds them, if ``accumulate``),
    ``s = sum_j grad_columns[at + j] source[corner + step + j]`` for each
    corner's step (one vector store: four scalar ones cost a tap of 8
    channels more than its dots); if ``scatter``, adds ``w grad_columns[at
    + j]`` to ``target[corner + step + j]`` for each corner's step and
    weight. The corners must not overlap (their steps at least ``count``
    apart).

    Each vector lane keeps its own sums (the channels after the last whole
    vector go to the first lane), added up at the end by
    :func:`_sum_lanes`: the same order on every run.
    """
    if not (isinstance(planes, types.UniTuple)
            and isinstance(columns, types.UniTuple)
            and _contiguous_alike(planes.dtype, columns.dtype, sums)
            and planes.dtype.dtype == columns.dtype.dtype
            and _is_tuple_of(steps, 2, types.Integer)
            and _is_tuple_of(weights, 4, types.Float)
            and weights.dtype == sums.dtype
            and _is_tuple_of(flags, 4, types.Boolean)):
        return None
    dtype = sums.dtype
    signature = types.void(planes, types.intp, steps, types.intp, columns,
                           types.intp, weights, flags, sums, types.intp)

    def codegen(context, builder, sig, args):
        (planes_, corner_, steps_, count_, columns_, at_, weights_, flags_,
         sums_, sums_at_) = args
        source_, target_ = _unpack(builder, planes_, 2)
        plane_type, column_type = sig.args[0].dtype, sig.args[4].dtype
        source_base = _pointer(context, builder, plane_type, source_)
        target_base = _pointer(context, builder, plane_type, target_)
        columns_base, grad_base = [
            _pointer(context, builder, column_type, array)
            for array in _unpack(builder, columns_, 2)]
        sums_base = _pointer(context, builder, sig.args[8], sums_)
        steps = _corner_steps(builder, *_unpack(builder, steps_, 2))
        weights = _unpack(builder, weights_, 4)
        dots_, scatter_, fill_, accumulate_ = _unpack(builder, flags_, 4)
        element = context.get_value_type(dtype)
        lanes = _lanes(dtype)
        # A vector of sums per corner; the channels after the last whole
        # vector add to its first lane.
        vector = ir.VectorType(element, lanes)
        lane_sums = [cgutils.alloca_once_value(
            builder, ir.Constant(vector, None)) for _ in range(4)]
        first_lane = ir.Constant(ir.IntType(32), 0)

        def add_to(slot, product, access, exact):
            if exact:
                builder.store(product, slot)
            elif access.lanes > 1:
                builder.store(builder.fadd(builder.load(slot), product), slot)
            else:
                partial = builder.load(slot)
                builder.store(builder.insert_element(partial, builder.fadd(
                    builder.extract_element(partial, first_lane), product),
                    first_lane), slot)

        def body(access, j, exact, with_dots, with_scatter, with_fill):
            position = builder.add(at_, j)
            wheres = _corner_positions(builder, builder.add(corner_, j),
                                       steps)
            corners = [access.load(source_base, where) for where in wheres]
            if with_fill:
                access.store(_weighted_sum(builder, access, weights, corners),
                             columns_base, position)
            gradient = access.load(grad_base, position)
            for q, (where, weight) in enumerate(zip(wheres, weights)):
                if with_dots:
                    add_to(lane_sums[q], builder.fmul(gradient, corners[q]),
                           access, exact)
                if with_scatter:
                    access.store(builder.fadd(
                        access.load(target_base, where),
                        builder.fmul(access.splat(weight), gradient)),
                        target_base, where)

        # A loop for each case, chosen once.
        def cases(flags, chosen):
            if not flags:
                _channel_loops(
                    context, builder, count_, dtype,
                    lambda access, j, exact: body(access, j, exact, *chosen))
                return
            with builder.if_else(flags[0]) as (yes, no):
                for branch, value in ((yes, True), (no, False)):
                    with branch:
                        cases(flags[1:], chosen + (value,))
        cases((dots_, scatter_, fill_), ())

        with builder.if_then(dots_):
            totals = _sum_lanes(builder, [builder.load(slot)
                                          for slot in lane_sums])
            out = _Access(builder, 4, dtype.bitwidth // 8)
            with builder.if_else(accumulate_) as (add, store):
                with add:
                    out.store(builder.fadd(out.load(sums_base, sums_at_),
                                           totals), sums_base, sums_at_)
                with store:
                    out.store(totals, sums_base, sums_at_)
        return context.get_dummy_value()
    return signature, codegen
