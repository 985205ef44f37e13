"""TIR shared by the kernels: vectorizable math, user expressions, register tiles, positions."""
