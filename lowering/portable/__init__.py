"""The portable kernels: what GPU targets build (scheduled by schedules/cuda.py) and what
Target("llvm", kernels="portable") runs on the CPU unscheduled."""
