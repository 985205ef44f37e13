"""`attndsl tune`: measure the knob choices of a spec's tunable kernels and record them.

For every tunable kernel of the planned IR (lowering.tunable) and every candidate knob choice
(schedules/knobs.py: the default first, then the rest of the grid, at most `trials`):
lower the variant, build it with meta_schedule's LocalBuilder (worker processes; all of a kernel's
variants in one call), time it with
meta_schedule's runner at each requested length, the local one or an RPCRunner through a TVM RPC
tracker, and commit a TuningRecord per (choice, length) to a meta_schedule JSONDatabase
(schedules/database.py). compile() then builds the choice the database picks.

The kernels are hand-written TVMScript, not block-style TIR, so meta_schedule's own search spaces
(which schedule blocks) do not apply; the space here is the knob grid, a knob is a
sample_categorical decision in the record's trace, and the grid is small enough to measure whole.
GPU targets tune the portable kernels' knobs (te_forms.py's chunk, softmax_rows.py's rows per
block, fft_blocks.py's threads per block) the same way, each choice built as compile() builds it
(dlight's schedules); meta_schedule's own search over the TE kernels' blocks is not used.
Timing inputs are random (meta_schedule's allocator), of concrete shapes: BH = batch·heads, the
length N, the position parameters (H, P), the samples S; scalar parameters (the FFT length, the
sampled kernels' block) are specialized. Integer buffers (the sampled kernels' row orders, sample
rows and sample blocks) hold arange over their last axis instead: identity order, sample t = row t,
in bounds where random integers would not be.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tvm
from tvm import tirx
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from attndsl import config
from attndsl.ir import postorder
from attndsl.schedules import cuda, database, knobs as knob_spaces

from . import abi, form_of, kernel_names, lower, tunable
from .build import resolve_target


def _compile(mod, target, _params):
    """meta_schedule's builder hook: our kernels need no s_tir passes (and its default build
    imports tvm.s_tir.tensor_intrin, 90 s here per worker); CUDA kernels are scheduled first, as
    compile() builds them (build.build)."""
    from .build import build
    ex = build(dict(mod.functions_items()), target)
    return getattr(ex, "mod", ex)


def _runner_init():
    """Run in each runner process: the FFT packed functions the Toeplitz kernels call."""
    from .fft import packed
    packed.register()


def concrete(func, n: int, op: abi.Op, sizes: dict | None = None):
    """`func`, a kernel of `op`, with its scalars (the ABI's, in order) specialized for length n and
    the op attributes `sizes` gives (a sampled kernel's block); buffers stay symbolic."""
    params = [p for p in func.params if not isinstance(p.ty, tirx.buffer.BufferType)]
    values = abi.scalar_values(op, n, sizes or {})
    assert len(params) == len(values), f"{op.name}: kernel scalars {params} vs the ABI's {op.scalars}"
    return func.specialize({p: tirx.IntImm(p.ty.dtype, v) for p, v in zip(params, values)}) if params else func


def _index_buffers(args_info, repeated_args):
    """Integer buffers of each argument list set to arange over their last axis (module docstring)."""
    for args in repeated_args:
        for (_, dtype, shape), arg in zip(args_info, args):
            if dtype.startswith("int"):
                arg.copyfrom(np.ascontiguousarray(np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape)))
    return repeated_args


def _alloc_local(device, args_info, alloc_repeat):
    """The LocalRunner's allocator (in its worker process): meta_schedule's, then _index_buffers."""
    from tvm.s_tir.meta_schedule.runner import local_runner
    return _index_buffers(args_info, local_runner.default_alloc_argument(device, args_info, alloc_repeat))


def _alloc_rpc(session, device, args_info, alloc_repeat):
    """The RPCRunner's allocator (tensors on the server): meta_schedule's, then _index_buffers."""
    from tvm.s_tir.meta_schedule.runner import rpc_runner
    return _index_buffers(args_info, rpc_runner.default_alloc_argument(session, device, args_info, alloc_repeat))


def arg_shapes(func, sizes: dict[str, int]) -> list:
    """meta_schedule TensorInfo of each buffer parameter, symbolic dims taken from `sizes`."""
    infos = []
    for p in func.params:
        if not isinstance(p.ty, tirx.buffer.BufferType):
            continue
        # a dim not in sizes is an argument the kernel ignores (te_forms._unused): one element
        shape = [int(s) if isinstance(s, tirx.IntImm) else sizes.get(s.name, 1) for s in p.ty.shape]
        infos.append(ms.arg_info.TensorInfo(str(p.ty.dtype), shape))
    return infos


def candidates(family: str, trials: int, seed: int = 0) -> list[dict]:
    """The default, then up to trials − 1 other grid points (all of them when they fit)."""
    grid = knob_spaces.grid(family)
    rest = grid[1:]
    if trials - 1 < len(rest):
        rest = random.Random(seed).sample(rest, max(0, trials - 1))
    return [grid[0]] + rest


@dataclass
class Measured:
    kernel: str
    family: str
    n: int
    times: dict = field(default_factory=dict)        # knob label -> mean seconds (failed: absent)
    errors: dict = field(default_factory=dict)       # knob label -> first line of the error

    @property
    def default(self) -> float | None:
        return self.times.get(knob_spaces.label(knob_spaces.defaults(self.family)))

    @property
    def best(self) -> tuple[str, float]:
        return min(self.times.items(), key=lambda kv: kv[1])


@derived_object          # meta_schedule's objects are subclassed through `_cls`, then re-wrapped
class _Builder(ms.builder.LocalBuilder._cls):
    """LocalBuilder without its start-up check, which boots a worker process (importing TVM, ~3 s)
    only to look the build functions up: a build function that fails still fails per candidate."""

    def _sanity_check(self) -> None:
        pass


@derived_object
class _Runner(ms.runner.LocalRunner._cls):
    """LocalRunner whose worker process boots while the candidates build (its start-up check
    otherwise waits for it): the check is sent to the worker, not waited on."""

    def _sanity_check(self) -> None:
        self.pool.submit(int)


def make_runner(rpc: tuple[str, int, str] | None, repeat: int, timeout_s: float):
    evaluator = ms.runner.EvaluatorConfig(number=1, repeat=repeat, min_repeat_ms=40,
                                          enable_cpu_cache_flush=False)
    if rpc is None:
        return _Runner(timeout_sec=timeout_s, evaluator_config=evaluator,
                       initializer=_runner_init, f_alloc_argument=_alloc_local)
    host, port, key = rpc
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                 session_timeout_sec=int(timeout_s))
    return ms.runner.RPCRunner(config, evaluator_config=evaluator, max_workers=1,
                               f_alloc_argument=_alloc_rpc)


def tune(root, dtype: str, *, sizes: dict[str, int], lengths: list[int], trials: int,
         db_folder, target="llvm", rpc=None, repeat: int = 5, kernels: list[str] | None = None,
         progress: Callable[[str], None] = print, timeout_s: float = 300) -> list[Measured]:
    """Tune the planned IR's kernels; `sizes` gives BH, H and P (the lengths give N), and for the
    sampled kernels S and block.
    Returns one Measured per (kernel, length)."""
    from .target import resolve
    portable = resolve(target).portable              # GPU targets: the portable kernels' knobs
    target = tvm.target.Target(resolve_target(target))
    if portable and rpc is None and not cuda.has_gpu():
        raise RuntimeError(f"no CUDA GPU here to time the {target.kind.name} kernels on: run "
                           f"`attndsl tune` on the GPU's machine, or pass --rpc-tracker/--rpc-key of "
                           f"a TVM RPC server running there")
    names = {k: f for k, f in tunable(root, portable).items() if kernels is None or k in kernels}
    if not names:
        progress("nothing to tune: no kernel of this spec has knobs")
        return []
    db = database.open_db(db_folder)
    workloads = {k: db.commit_workload(database.workload(f))       # once per kernel
                 for k, f in lower(root, dtype, only=set(names), portable=portable).items() if k in names}
    builder = _Builder(max_workers=min(2, config.num_threads()), timeout_sec=timeout_s, f_build=_compile)
    device = "cpu" if target.kind.name == "llvm" else target.kind.name
    runner = make_runner(rpc, repeat, timeout_s)
    out = []
    pairs = _pairs(root, names)                      # (fwd, bwd) of a node share its candidates
    ops = {k: abi.OPS[form_of(node).op] for i, node in enumerate(postorder(root)) if form_of(node)
           for k in kernel_names(i, node)}
    total = sum(len(candidates(names[p[0]], trials)) for p in pairs)
    done = 0
    for pair in pairs:
        family = names[pair[0]]
        results = {(k, n): Measured(k, family, n) for k in pair for n in lengths}
        # every candidate's variants built in one call: the builder starts a pool of worker
        # processes per call (each importing TVM), so one pool serves them all
        t0 = time.perf_counter()
        choices = candidates(family, trials)
        variants, inputs = [], []
        for choice in choices:
            funcs = lower(root, dtype, {k: choice for k in pair}, only=set(pair), portable=portable)
            for k in pair:
                for n in lengths:
                    variants.append((choice, k, n, funcs[k]))
                    inputs.append(ms.builder.BuilderInput(tvm.IRModule(
                        {"main": concrete(funcs[k], n, ops[k], sizes).with_attr("global_symbol", "main")}), target))
        built = builder.build(inputs)
        progress(f"built {len(inputs)} variants of {'/'.join(pair)} ({time.perf_counter() - t0:.1f} s)")
        for choice in choices:
            done += 1
            label = knob_spaces.label(choice)
            t0 = time.perf_counter()
            runs = []
            for i, (c, k, n, func) in enumerate(variants):
                if c != choice:
                    continue
                b = built[i]
                if b.error_msg:
                    results[k, n].errors[label] = b.error_msg.strip().splitlines()[-1]
                    continue
                # NK, BHK: the keys' length and rows (quadratic.py), as the queries'
                info = arg_shapes(func, {**sizes, "N": n, "NK": n, "BHK": sizes["BH"]})
                runs.append((k, n, info, runner.run([ms.runner.RunnerInput(b.artifact_path, device, info)])[0]))
            for k, n, info, future in runs:
                res = future.result()
                if res.error_msg:
                    results[k, n].errors[label] = res.error_msg.strip().splitlines()[-1]
                    continue
                results[k, n].times[label] = database.mean_secs(res.run_secs)
                database.commit(db, workloads[k], family, choice, res.run_secs, target, info)
            progress(_bar(done, total, f"{'/'.join(pair)} {label}", time.perf_counter() - t0))
        out += [results[k, n] for k in pair for n in lengths]
    return out


def _pairs(root, names: dict) -> list[tuple[str, ...]]:
    pairs = []
    for i, node in enumerate(postorder(root)):
        pair = tuple(k for k in kernel_names(i, node) if k in names)
        if pair:
            pairs.append(pair)
    return pairs


def _bar(done: int, total: int, what: str, secs: float) -> str:
    width = 24
    fill = round(width * done / total)
    return f"[{'#' * fill}{'.' * (width - fill)}] {done}/{total}  {what}  ({secs:.1f} s)"


def summary(rows: list[Measured]) -> str:
    """A markdown table: per kernel and length, the default's time, the best choice and its time."""
    lines = ["| kernel | N | default | best choice | best | speed-up |", "|---|---|---|---|---|---|"]
    for r in rows:
        if not r.times:
            lines.append(f"| {r.kernel} | {r.n} | failed: {next(iter(r.errors.values()), '?')} | | | |")
            continue
        label, best = r.best
        d = r.default
        lines.append(f"| {r.kernel} | {r.n} | {_ms(d)} | {label} | {_ms(best)} | "
                     f"{(d / best if d else float('nan')):.2f}x |")
    return "\n".join(lines)


def _ms(s: float | None) -> str:
    return "failed" if s is None else f"{s * 1e3:.2f} ms"
