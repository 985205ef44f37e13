"""Where a module's kernels run: one frozen `Target`, resolved once from what the user wrote.

    "llvm" (or "cpu")                      this CPU, the CPU kernels
    Target("llvm", kernels="portable")     this CPU, the portable kernels (what GPU targets build,
                                           unscheduled): how they are tested without a GPU
    "cuda", "nvidia/nvidia-h100", "sm_90a", "sm_80"
                                           NVIDIA GPUs (schedules/cuda.py), the portable kernels
    "mlir-cpu"                             the torch-mlir backend (attndsl/mlir): no TVM kernels
    {"kind": ..., ...}                     a TVM target dict, by its kind

No TVM import here: a cache hit needs none. `tvm()` resolves the TVM target when building.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from attndsl.schedules import cuda

MLIR = "mlir-cpu"
KERNELS = ("cpu", "portable", "mlir")


@dataclass(frozen=True)
class Target:
    """name: "llvm", a CUDA name (cuda.TARGETS), "mlir-cpu" or the repr of a TVM target dict
    (`options`); kernels: "cpu", "portable" or "mlir", by default what the kind builds."""
    name: str = "llvm"
    kernels: str | None = None
    options: dict | None = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.name == "cpu":
            object.__setattr__(self, "name", "llvm")
        if self.options is None and self.name not in ("llvm", MLIR) and not cuda.is_cuda(self.name):
            raise cuda.unknown(self.name)
        default = {"llvm": "cpu", "cuda": "portable", "mlir": "mlir"}.get(self.kind, "cpu")
        kernels = self.kernels or default
        if kernels not in KERNELS or (kernels == "mlir") != (self.kind == "mlir") or (
                self.kind == "cuda" and kernels != "portable"):
            raise ValueError(f"target {self.name!r} cannot build kernels={kernels!r}: 'llvm' builds "
                             f"'cpu' (default) or 'portable', CUDA targets 'portable', "
                             f"'{MLIR}' its own")
        object.__setattr__(self, "kernels", kernels)

    @property
    def kind(self) -> str:
        """'llvm', 'cuda' or 'mlir'."""
        if self.name == MLIR:
            return "mlir"
        if self.options is not None:
            return "cuda" if cuda.is_cuda(self.options) else str(self.options.get("kind"))
        return "cuda" if cuda.is_cuda(self.name) else "llvm"

    @property
    def portable(self) -> bool:
        """Whether it builds the portable kernels (te_forms.py, softmax_rows.py, fft_blocks.py)."""
        return self.kernels == "portable"

    @property
    def gpu(self) -> bool:
        """Whether kernels bind their loops to GPU threads."""
        return self.kind == "cuda"

    @property
    def device(self) -> str:
        """The torch device type its tensors live on."""
        return "cuda" if self.gpu else "cpu"

    def spec(self) -> str | dict:
        """What TVM is given (lowering/build.resolve_target)."""
        return dict(self.options) if self.options is not None else self.name

    def __str__(self) -> str:
        if self.kind == "llvm" and self.portable:
            return f"{self.name} (portable kernels)"
        return self.name


def resolve(target) -> Target:
    """What a user passes as `target=` (a Target, a name or a TVM target dict) -> a Target."""
    if isinstance(target, Target):
        return target
    if isinstance(target, dict):
        if "kind" not in target:
            raise ValueError(f"a target dict needs a 'kind', got {target!r}")
        return Target(repr(sorted(target.items())), options=dict(target))
    if not isinstance(target, str):
        raise cuda.unknown(target)
    return Target(target)
