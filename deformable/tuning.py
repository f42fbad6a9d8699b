"""The CPU path's tuning constants, each with what it was measured for.

Figures are from ``benchmarks/tune.py`` on the 2-core development VM
(AMD EPYC, AVX2), float32, mnist-l2 (100 x 32 x 28 x 28, 3x3) unless named.
"""

# Columns per block of output rows with the compiled loops: a core's share
# of the cache, so that a block's product reads them where they were just
# written.
BLOCK_BYTES = 2 ** 20

# The same for the pure-NumPy loops, whose cost is Python's per call.
NUMPY_BLOCK_BYTES = 8 * 2 ** 20

# Samples whose geometry the compiled loops find at once.
SPAN = 112

# Bytes; the threads' buffers start on one.
CACHE_LINE = 64

# Width of the compiled loops' vectors: AVX2's registers (LLVM splits
# them where vectors are narrower).
VECTOR_BYTES = 32

# Largest bordered image (elements) whose positions the compiled loops keep
# in 32 bits: int32's range (less to compute and to keep in cache than 64).
INT32_PLANE_LIMIT = 2 ** 31 - 1

# The NumPy scatter adds up to this many samples landing on one input pixel
# (per tap) in rounds of fancy-indexed adds; the rest with a segmented sum.
MAX_SCATTER_ROUNDS = 8
