"""What runs compiled kernels: loading libraries without the TVM compiler (load.py) and running
their parallel loops on torch's OpenMP threads, fork-safely (omp.py)."""
