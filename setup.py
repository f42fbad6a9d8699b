from setuptools import find_packages
from setuptools import setup

setup(
    name='deformable',
    version='0.1.0',
    description='Deformable convolution (Dai et al., 2017) for Chainer: '
                'a FunctionNode with NumPy and CuPy paths, and its link',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['deformable', 'deformable.*']),
    python_requires='>=3.8',
    # The library itself needs only chainer and numpy; chainer 7.8.1 does
    # not import with NumPy 2.
    install_requires=['chainer>=7.8.1', 'numpy<2'],
    extras_require={
        'experiments': ['chainercv==0.13.1', 'matplotlib'],
        # Compiled CPU loops (several times faster), used when installed;
        # threadpoolctl holds BLAS to one thread while they use every core.
        'fast': ['numba', 'threadpoolctl'],
        'gpu': ['cupy-cuda12x<14'],
        # ChainerMN (in chainer) over MPI: mpi4py and an MPI runtime from
        # PyPI, mpiexec included, so that no system MPI is needed.
        'distributed': ['mpi4py', 'mpich'],
        # deformable.onnx, the ONNX exporter (DeformConv needs opset 19,
        # onnx 1.14 on).
        'onnx': ['onnx>=1.14'],
        # onnx: its reference evaluator's DeformConv checks the general op.
        'test': ['pytest', 'nbclient', 'nbformat', 'ipykernel', 'onnx'],
    },
    license='MIT',
)
