"""The tuning constants, each with what it was measured to do.

The CPU path's:

Each figure is the op's forward + backward time with the other value, as a
ratio to the default's, on mnist-l2 (100 x 32 x 28 x 28, 3x3), float32,
one thread, on the 2-core development VM (AMD EPYC, AVX2): ``python
benchmarks/tune.py``, output in ``results/benchmarks/tuning.md``.
"""

# Columns per block of output rows with the compiled loops (about a core's
# share of the cache): 256 KiB measured 1.09x, 4 MiB 0.99x (no gain, four
# times the memory).
BLOCK_BYTES = 2 ** 20

# The same for the pure-NumPy loops, whose cost is Python's per call:
# 2 MiB measured 1.11x, 32 MiB 1.15x.
NUMPY_BLOCK_BYTES = 8 * 2 ** 20

# Samples whose geometry the compiled loops find at once: 48 measured
# 1.06x, 256 1.00x.
SPAN = 112

# Bytes; the threads' buffers start on one, so that the loops' 32-byte
# vectors never straddle two: the backward kernel alone was 2-6% faster
# (commit 1195bd4); at the op's level 16 (NumPy's own) measured 1.00x.
CACHE_LINE = 64

# Width of the compiled loops' vectors, AVX2's registers (LLVM splits them
# where vectors are narrower): 16 (SSE's) measured 1.10x.
VECTOR_BYTES = 32

# Largest bordered image (elements) whose positions the compiled loops keep
# in 32 bits, int32's range: 64-bit positions throughout measured 1.02x.
INT32_PLANE_LIMIT = 2 ** 31 - 1

# The NumPy scatter adds up to this many samples landing on one input pixel
# (per tap) in rounds of fancy-indexed adds, the rest with a segmented sum:
# with offsets that send most samples to a few points (20 x 32 x 28 x 28),
# 2 measured 1.12x, 32 1.00x.
MAX_SCATTER_ROUNDS = 8

# The GPU's workspace (chainer.config.deformable_workspace_size): the
# buffers of one chunk of images. 64 MiB keeps the op's peak memory under
# torchvision's on the layers of benchmarks/bench_gpu_layers.py by estimate
# (its columns for 32 images of 128 channels at 28x28 take 115 MiB); to be
# measured on a GPU.
GPU_WORKSPACE_BYTES = 64 * 2 ** 20

# The GPU's gradient of x in the default mode: False, atomicAdd onto each
# sample's corners (COLUMN_GRADS); True, the deterministic mode's sorted
# gather (GATHER_CORNERS), which makes no atomics at all. The scatter was
# measured atomic-bound on an H200 (1.69 ms of a 3.25 ms backward, about 15
# times its bandwidth floor); benchmarks/bench_gpu_kernels.py times both,
# to be decided on a GPU.
GPU_GATHER_GRAD_X = False

# The GPU's deterministic mode makes its products in blocks of as many
# images as its backward's buffers fit in these bytes: a number set by the
# layer, never by the workspace, so that the products have the same shapes
# (and sums) in any chunk. 64 MiB, the default workspace: blocks about the
# size of the default mode's chunks; to be measured on a GPU.
GPU_DETERMINISTIC_BLOCK_BYTES = 64 * 2 ** 20
