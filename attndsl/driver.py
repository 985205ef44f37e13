"""The build driver: a planned IR (pipeline.run) -> a loaded kernel library, in named steps.

    lower   the IR's kernels as TIR for the target's kernel set   lowering.lower
    tune    the knobs the tuning databases pick for this target  lowering.lower_tuned
    build   TVM compiles them for the target                      lowering/build.py
    cache   stored under a key of all that decides the code      cache.py
    load    the library, registered with the custom ops          ops.register_library

`Attention` asks for a `Library` per kernel dtype; `attndsl emit` stops after `lower` (or `build`,
for CUDA C); `attndsl tune` lowers and builds the variants it times through the same steps.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import platform
import time
from pathlib import Path

from . import cache, config, ops
from .ast import AttentionSpec
from .diagnostics import SpecError
from .ir import Add, Input, Node, Position, postorder
from .lowering.target import Target
from .schedules import lookup as tuning

STEPS = ("lower", "tune", "build", "cache", "load")


@dataclasses.dataclass(frozen=True)
class Library:
    """A loaded kernel library: `key` names it in ops; `hit` whether the cache held it; `seconds`
    to get it; `dirs` the tuning databases read; `tuned` {kernel: what a record chose};
    `unloadable`: why a library stored for another machine cannot be loaded here (CUDA kernels
    without a CUDA runtime), else None."""
    key: str
    hit: bool
    seconds: float
    dirs: tuple
    tuned: dict
    unloadable: str | None = None

    def describe(self, dtype: str) -> str:
        how = "compiled" if not self.hit else "found in the cache" if self.unloadable else "loaded from cache"
        why = f"; stored for a machine with a CUDA runtime ({self.unloadable})" if self.unloadable else ""
        return f"{dtype}: {how} in {self.seconds:.2f} s (key {self.key[:12]}{why})"


def lower(spec: AttentionSpec, root: Node, target: Target, dtype: str) -> dict:
    """Step `lower`: {kernel name: PrimFunc} of the planned IR `root` for `target`, default knobs;
    a node without kernels for it is a SpecError against `spec`."""
    from . import lowering
    try:
        return lowering.lower(root, dtype, portable=target.portable, gpu=target.gpu)
    except lowering.NotLowered as e:
        raise not_lowered(spec, e, target) from None


def library(spec: AttentionSpec, root: Node, target: Target, dims: tuple[int, int], dtype: str,
            tuned: bool = True, decode: bool = False) -> Library:
    """All the steps: the kernels of the planned IR `root` (head and value dims `dims`) in `dtype`
    for `target`, with the tuning databases' knobs unless `tuned` is False, from the cache or
    built and stored; registered with ops under the returned key (unless this machine cannot load
    it: CUDA kernels without a CUDA runtime, stored for one that can). `decode`: instead, the kernel of
    one decoding step (lowering.lower_decode; CPU only, never tuned)."""
    from . import lowering
    try:
        if decode and (target.kind != "llvm" or not lowering.decodable(root)):
            raise lowering.NotLowered([root])
        lowering.check(root, target.portable)
    except lowering.NotLowered as e:
        raise not_lowered(spec, e, target) from None
    dirs = tuning.tuning_dirs() if tuned and not decode else []
    unloadable = None
    if target.kind == "cuda":
        from .runtime import cuda
        unloadable = cuda.load_runtime()
    # what decides the code, not where the spec was written: the planned IR (spans left out); the
    # CPU's model only for CPU kernels (a CUDA library's host code is generic x86-64/aarch64)
    host = _host_cpu() if target.kind == "llvm" else platform.machine()
    key = cache.make_key(ir=canonical(root), dims=list(dims), dtype=dtype,
                         target=[str(target.spec()), target.kernels], host=host,
                         lowering=kernel_source_hash(), tuning=tuning.fingerprint(dirs),
                         **({"decode": True} if decode else {}))
    t0 = time.perf_counter()
    if unloadable is not None:               # stored for another machine: build it only once
        kept = cache.stored(key)
        if kept is not None and config.cuda_arch() in (None, *kept.get("cuda_arch", ())):
            return Library(key, True, time.perf_counter() - t0, tuple(dirs), kept.get("tuned", {}), unloadable)
    expect = (lowering.DECODE_KERNEL,) if decode else kernels_of(root)
    if target.kind == "llvm":                # a library built for another key is caught at load
        expect += (f"attndsl_key_{key[:16]}",)
    notes: dict = {}

    def build():
        try:
            from .lowering.build import build, resolve_target
        except ImportError as e:
            raise RuntimeError(f"the kernels of spec '{spec.name}' ({dtype}, {target}, dims {dims}) are "
                               f"not in the cache at {config.cache_dir()}, and TVM's compiler "
                               f"cannot be imported here ({e}); build them where apache-tvm is "
                               f"installed (attndsl.bundle) or pip install apache-tvm==0.27.0.post1") from None
        tvm_target = resolve_target(target)
        if decode:
            funcs, chosen = lowering.lower_decode(root, dtype), {}
        else:
            funcs, chosen = lowering.lower_tuned(root, dtype, dirs, tvm_target, target.portable, gpu=target.gpu)
        notes["tuned"] = {k: {"knobs": c.knobs, "speedup": round(c.speedup, 4),
                              "lengths": list(c.lengths), "db": c.folder} for k, c in chosen.items()}
        if target.kind == "llvm":
            funcs.update(_stamp(expect[-1]))
        lib = build(funcs, tvm_target)
        if target.kind == "cuda":
            from .runtime import cuda
            if cuda.compile_ahead(lib):
                notes["cuda_arch"] = [config.cuda_arch()]
        return lib

    lib, hit = cache.load_or_build(key, build, label=f"{spec.name}/{dtype}", notes=notes,
                                   loadable=unloadable is None, expect=expect)
    if unloadable is None:
        ops.register_library(key, lib)
    return Library(key, hit, time.perf_counter() - t0, tuple(dirs), notes.get("tuned", {}), unloadable)


# --- the cache key --------------------------------------------------------------------------------

@functools.cache
def kernel_source_hash() -> str:
    """Kernel code is part of the cache key: any edit under lowering/ or schedules/ (every
    subfolder), or to expr.py (how a user EXPR is planned and differentiated into the kernels'
    TIR), rebuilds. Read once per process."""
    from . import expr, lowering, schedules
    h = hashlib.sha256()
    for pkg in (lowering, schedules):
        root = Path(pkg.__file__).parent
        for p in sorted(root.rglob("*.py")):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    h.update(Path(expr.__file__).read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def _host_cpu() -> str:
    from .runtime.load import host_cpu
    return host_cpu()


def canonical(x):
    """A JSON-able form of an IR node (or any AST value) that holds what it means and not where it
    was written: every compared dataclass field (spans are not compared), floats exact."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return [type(x).__name__, {f.name: canonical(getattr(x, f.name))
                                   for f in dataclasses.fields(x) if f.compare}]
    if isinstance(x, (tuple, list)):
        return [canonical(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"no canonical form for {type(x).__name__}")


def kernels_of(root: Node) -> tuple[str, ...]:
    """The kernel names a library for the planned IR `root` holds (those the module calls)."""
    from .lowering import kernel_names
    return tuple(name for i, node in enumerate(postorder(root))
                 if not isinstance(node, (Input, Position, Add)) for name in kernel_names(i, node))


def _stamp(name: str) -> dict:
    """A function that does nothing, named after the cache key: its presence tells a loaded
    library was built for this key."""
    from tvm import tirx
    return {name: tirx.PrimFunc([], tirx.Evaluate(0)).with_attr("global_symbol", name)}


def not_lowered(spec: AttentionSpec, e, target: Target) -> SpecError:
    """The SpecError for a lowering.NotLowered `e` on `target`."""
    from . import lowering
    node = e.nodes[-1]
    what = f"the {node.op} form '{node.form}'" if getattr(node, "form", None) else f"the {node.op} node"
    where = f"for target {target.kind}" if target.portable else "to TVM"
    return SpecError(f"{what} is not lowered {where}, so spec '{spec.name}' cannot be compiled",
                     spec.span, help=f"forms with {target.kind} kernels: "
                     f"{', '.join(lowering.lowered_forms(target.portable))}"
                     + ("; target='llvm' compiles every form" if target.portable else ""))
