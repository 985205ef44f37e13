"""The command line: `attndsl check|emit|run FILE`.

    attndsl check model.attn                      parse and check every block
    attndsl emit model.attn --stage ast|ir|linear|tir|cuda|mlir|linalg [--after STAGE] [--target T]
    attndsl run model.attn --heads 8 --head-dim 64 --seq 1024 [--target cuda]   compile, check, time
    attndsl tune model.attn --lengths 1024,4096 --trials 9 [--db DIR] [--rpc-tracker HOST:PORT --rpc-key KEY]
                                                  measure the kernels' knob choices into a database
    attndsl calibrate [--db DIR]                  time every form on this CPU: the planner's crossovers
    attndsl bundle model.attn --heads 8 --head-dim 64 --target cuda --arch sm_90 --python 3.12 --out DIR
                                                  the kernels and a runtime for a machine without TVM's compiler
"""
from __future__ import annotations

import argparse
import sys
import time

from . import calibration
from .ast import learned_table
from .schedules.cuda import TARGETS


STAGES = ("ast", "ir", "linear", "tir", "cuda", "mlir", "linalg")


class UsageError(Exception):
    """A command line that cannot run (a bad option, an unreadable file): one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):          # one line, not the usage block
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _count(lo: int = 1, hi: int | None = None):
    """An argparse type: an int in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            val = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if val < lo or (hi is not None and val > hi):
            raise argparse.ArgumentTypeError(
                f"must be an integer {f'in [{lo}, {hi}]' if hi is not None else f'>= {lo}'}, got {val}")
        return val
    return parse


def _lengths(text: str) -> list[int]:
    """--lengths: comma-separated sequence lengths, each >= 1."""
    one = _count()
    out = [one(n.strip()) for n in text.split(",") if n.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated lengths, got {text!r}")
    return out


def _load(path: str):
    from . import parse, read_spec
    from .diagnostics import SpecError
    try:
        text, filename = read_spec(path)
    except SpecError as e:            # no such file, unreadable, too large: not a mistake in a spec
        raise UsageError(e.message) from None
    return parse(text, filename=filename)


def cmd_check(args) -> int:
    specs = _load(args.file)
    for b in specs.blocks:
        params = f", params {', '.join(p.name for p in b.params)}" if b.params else ""
        print(f"{b.span}: attention {b.name}: ok (kernel {b.kernel.name}, position {b.position.name}, "
              f"mask {b.mask.name}{params})")
    return 0


def _blocks(args):
    specs = _load(args.file)
    return [specs.block(args.name)] if args.name else list(specs.blocks)


def cmd_emit(args) -> int:
    from . import pipeline
    from .ir import format_ir
    if args.stage == "mlir":
        return _emit_mlir(args)
    if args.stage == "linalg":
        return _emit_linalg(args)
    forms = None
    if args.stage in ("tir", "cuda"):            # plan among the forms the target has kernels for
        from . import lowering
        forms = lowering.forms_for(_kernel_target(args))
    for spec in _blocks(args):
        if args.stage == "ast":
            print(_format_ast(spec))
            continue
        planned = pipeline.run(spec, args.head_dim, args.value_dim or args.head_dim, forms=forms)
        if args.stage == "ir":
            print(f"// {spec.name}: the spec's O(N²) meaning as IR\n{format_ir(planned.stage('ir'))}")
        elif args.stage == "linear":
            print(f"// {spec.name}: after {', '.join(n for n, _ in planned.stages[1:])}\n"
                  f"{format_ir(planned.root)}")
        else:
            _emit_kernels(spec, planned, args)
    return 0


def _kernel_target(args):
    """--target as a Target (lowering/target.py), where --stage cuda without one means the GPU."""
    from .lowering.target import resolve
    return resolve("cuda" if args.stage == "cuda" and args.target == "llvm" else args.target)


def _emit_kernels(spec, planned, args) -> None:
    """--stage tir: the kernels' TVMScript for --target (scheduled, for CUDA); --stage cuda: the
    CUDA C that TVM generates for them (built here: no GPU needed)."""
    from . import driver
    from .lowering import build
    target = _kernel_target(args)
    funcs = driver.lower(spec, planned.root, target, args.dtype)
    tgt = build.resolve_target(target)
    if args.stage == "tir":
        if target.gpu:
            from .schedules import cuda
            print(cuda.schedule(build.tvm.IRModule(funcs), tgt).script())
        else:
            print(build.module_text(funcs))
        return
    print(f"// {spec.name}: CUDA C for {tgt.attrs.get('arch')} ({len(funcs)} kernels, TVM {build.tvm.__version__})")
    source = build.cuda_source(build.build(funcs, tgt))
    print(source)
    from .schedules import cuda
    try:
        table = cuda.census_table(cuda.census(source, tgt))
    except RuntimeError as e:
        print(f"// census: not taken ({e})")
        return
    print(f"// census: each kernel as nvcc's ptxas -v compiles it for {cuda.arch(tgt)}, and its CUDA C\n"
          + "\n".join(f"// {line}" for line in table.splitlines()))


def _emit_mlir(args) -> int:
    """One module, a function per block: the IR after `--after` in the attn dialect."""
    from . import pipeline
    from .diagnostics import SpecError, did_you_mean
    from .mlir import to_mlir
    if args.after not in pipeline.STAGES:
        raise SpecError(f"unknown stage {args.after!r}", help=did_you_mean(args.after, pipeline.STAGES, "stages"))
    roots = {spec.name: pipeline.run(spec, args.head_dim, args.value_dim or args.head_dim).stage(args.after)
             for spec in _blocks(args)}
    print(f"// {args.file}: the IR after {args.after}, attn dialect (attndsl.mlir)\n{to_mlir(roots).rstrip()}")
    return 0


def _emit_linalg(args) -> int:
    """The planned IR lowered from the attn dialect to linalg on tensors (what target='mlir-cpu'
    compiles): a module per block, its entry point @run_NAME."""
    from . import pipeline
    from .mlir import backend, linalg
    print(f"// {args.file}: linalg on tensors ({args.dtype}), from the attn dialect by attndsl.mlir.linalg")
    for spec in _blocks(args):
        planned = pipeline.run(spec, args.head_dim, args.value_dim or args.head_dim)
        try:
            module = linalg.lower({spec.name: planned.root}, backend.params(spec, args.heads, args.head_dim),
                                  args.dtype)
        except linalg.NotLowered as e:
            print(f"// block {spec.name}: {e}")
            continue
        print(f"// block {spec.name}\n{str(module).rstrip()}")
    return 0


def _format_ast(spec) -> str:
    from .expr import to_text
    out = [f"AttentionSpec {spec.name}  @ {spec.span}"]
    for field in ("kernel", "position", "apply", "sampling", "mask"):
        c = getattr(spec, field)
        params = ", ".join(f"{k}={v}" for k, v in c.params)
        expr = f" = {to_text(c.expr)}" if c.expr is not None else ""
        out.append(f"  {field:9s} {c.name}({params}){expr}  @ {spec.span_of(field)}")
    out.append(f"  scale     {spec.scale if spec.scale is not None else '1/sqrt(head_dim)'}")
    for p in spec.params:
        out.append(f"  param     {p.name}{'[heads]' if p.per_head else ''} = {p.init}  @ {p.span}")
    return "\n".join(out)


def cmd_run(args) -> int:
    import torch

    from . import compile
    from .lowering.target import resolve
    device = resolve(args.target).device
    if device == "cuda" and not torch.cuda.is_available():
        print(f"attndsl run: target {args.target} runs on a CUDA GPU, and torch sees none here "
              f"(`attndsl emit FILE --stage cuda` shows its kernels without one)", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    status = 0
    for spec in _blocks(args):
        t0 = time.perf_counter()
        attn = compile(args.file, spec.name, heads=args.heads, head_dim=args.head_dim,
                       value_dim=args.value_dim, target=args.target).to(device)
        t_compile = time.perf_counter() - t0
        shape = (args.batch, args.heads, args.seq)
        q, k = torch.randn(*shape, args.head_dim), torch.randn(*shape, args.head_dim)
        v = torch.randn(*shape, args.value_dim or args.head_dim)
        q, k, v = (t.to(device) for t in (q, k, v))
        out = attn(q, k, v)
        ref = attn.reference(q.double(), k.double(), v.double())
        err = ((out.double() - ref).norm() / ref.norm()).item()
        times = []
        for _ in range(args.repeat):
            sync()
            t = time.perf_counter()
            attn(q, k, v)
            sync()
            times.append(time.perf_counter() - t)
        sampled = spec.sampling.name != "none"       # an estimate: its error is shown, not judged
        ok = sampled or err < 1e-4
        status |= not ok
        verdict = "estimate" if sampled else "ok" if ok else "FAIL"
        print(f"{spec.name:24s} compile {t_compile:6.2f} s   rel.err vs reference {err:.1e} "
              f"{verdict}   forward {min(times) * 1e3:8.2f} ms  "
              f"(B={args.batch} H={args.heads} N={args.seq})")
    return status


def _table_width(spec) -> int:
    """P of the kernels' position parameters (H, P): 2W+1 for a learned table, else 1."""
    if learned_table(spec.position):
        return 2 * int(spec.position["max_distance"]) + 1
    return 1


def _tuning_sizes(spec, args) -> dict[str, int]:
    """The tuner's concrete sizes besides N: B·H, the position parameters' (H, P), and a sampled
    spec's samples S and block of sorted rows (as sampling.draw passes them)."""
    from .sampling import block_rows
    sizes = {"BH": args.batch * args.heads, "H": args.heads, "P": _table_width(spec)}
    if spec.sampling.name in ("kde", "uniform"):
        sizes["S"] = int(spec.sampling["samples"])
        sizes["block"] = block_rows(spec.sampling)
    return sizes


def cmd_tune(args) -> int:
    from pathlib import Path

    from . import lowering, pipeline
    from .lowering import tune
    from .lowering.target import resolve
    from .passes.plan import LADDER
    from .schedules import lookup
    db = Path(args.db) if args.db else lookup.user_db()
    rpc = None
    if args.rpc_tracker:
        host, _, port = args.rpc_tracker.rpartition(":")
        if not host or not port.isdigit() or not args.rpc_key:
            print("--rpc-tracker wants HOST:PORT, and --rpc-key the key the servers registered with",
                  file=sys.stderr)
            return 2
        rpc = (host, int(port), args.rpc_key)
    lengths = args.lengths
    forms = lowering.forms_for(resolve(args.target))
    for spec in _blocks(args):
        # every plan a module of the spec keeps (one per range of lengths: module.py)
        plans = pipeline.run_lengths(spec, args.head_dim, args.value_dim or args.head_dim, LADDER, forms=forms)
        for planned in {id(p): p for p in plans}.values():
            print(f"tuning {spec.name} [{', '.join(planned.forms)}] ({args.dtype}, B·H={args.batch * args.heads}, "
                  f"N={','.join(map(str, lengths))}) into {db}")
            try:
                rows = tune.tune(planned.root, args.dtype, lengths=lengths, trials=args.trials, db_folder=db,
                                 sizes=_tuning_sizes(spec, args),
                                 target=args.target, rpc=rpc)
            except RuntimeError as e:
                print(f"attndsl tune: {e}", file=sys.stderr)
                return 2
            if rows:
                print(tune.summary(rows))
    return 0


def cmd_calibrate(args) -> int:
    from pathlib import Path

    from .schedules import lookup
    db = Path(args.db) if args.db else lookup.user_db()
    print(f"calibrating the cost model on {calibration.cpu_model()} (B·H={calibration.BH}, "
          f"D={calibration.DIM}, float32, N={','.join(map(str, args.lengths))}): forward time per form")
    result = calibration.measure(lengths=args.lengths)
    path = calibration.save(result, db)
    rates = result["rates"]
    fastest = min(rates.values())
    print("\n".join(f"  {form:13s} {rate / fastest:5.2f}x the fastest form's time per flop"
                    for form, rate in sorted(rates.items(), key=lambda x: x[1])))
    print(f"wrote {path}; compile() plans with it on this CPU (ATTNDSL_UNCALIBRATED=1: flops alone)")
    return 0


def cmd_bundle(args) -> int:
    from . import bundle, compile
    blocks = _blocks(args)
    if args.arch and args.target == "llvm":
        raise UsageError("--arch compiles CUDA kernels ahead: it needs a CUDA --target")
    with bundle.kernels(args.out, arch=args.arch):
        for spec in blocks:
            attn = compile(args.file, spec.name, heads=args.heads, head_dim=args.head_dim,
                           value_dim=args.value_dim, target=args.target, dtype=None)
            for dtype in args.dtype:
                attn.build(dtype)
            print(f"  {spec.name}: {', '.join(args.dtype)} for {args.target}", flush=True)
    manifest = bundle.runtime(args.out, pythons=args.python)
    print(f"wrote {args.out}: {len(manifest['libraries'])} libraries, Python {', '.join(manifest['pythons'])}, "
          f"{bundle.size(args.out) / (1 << 20):.1f} MiB; on the other machine: source {args.out}/env.sh")
    return 0


def main(argv=None) -> int:
    from . import MAX_HEAD_DIM
    from .diagnostics import SpecError
    dim = _count(1, MAX_HEAD_DIM)
    p = _Parser(prog="attndsl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="parse and check a spec file")
    c.add_argument("file")
    for name in ("emit", "run"):
        s = sub.add_parser(name, help={"emit": "print a compiler stage",
                                       "run": "compile, check against the reference, time"}[name])
        s.add_argument("file")
        s.add_argument("--name", help="the attention block (default: all)")
        s.add_argument("--heads", type=_count(), default=8)
        s.add_argument("--head-dim", type=dim, default=64)
        s.add_argument("--value-dim", type=dim, default=None)
        if name == "emit":
            s.add_argument("--stage", choices=STAGES, default="linear")
            s.add_argument("--after", default="plan", help="with --stage mlir: the pipeline stage to "
                           "print, ir|fold_scale|linearize|fuse_softmax|fuse_maps|plan (default: plan)")
            s.add_argument("--dtype", choices=("float32", "float64"), default="float32")
            s.add_argument("--target", choices=("llvm", *TARGETS), default="llvm",
                           help="with --stage tir|cuda: the kernels of this target "
                           "(--stage cuda: default cuda, the H100)")
        else:
            s.add_argument("--target", choices=("llvm", *TARGETS), default="llvm",
                           help="llvm: this CPU; a CUDA target runs on this machine's GPU")
            s.add_argument("--batch", type=_count(), default=2)
            s.add_argument("--seq", type=_count(), default=1024)
            s.add_argument("--repeat", type=_count(), default=5)
    t = sub.add_parser("tune", help="measure the knob choices of a spec's kernels into a tuning database")
    t.add_argument("file")
    t.add_argument("--name", help="the attention block (default: all)")
    t.add_argument("--heads", type=_count(), default=8)
    t.add_argument("--batch", type=_count(), default=1)
    t.add_argument("--head-dim", type=dim, default=64)
    t.add_argument("--value-dim", type=dim, default=None)
    t.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    t.add_argument("--lengths", type=_lengths, default=[1024, 4096],
                   help="sequence lengths to time (comma-separated)")
    t.add_argument("--trials", type=_count(), default=9, help="knob choices per kernel, the default included")
    t.add_argument("--target", choices=("llvm", *TARGETS), default="llvm",
                   help="llvm: this CPU; a CUDA target: the portable kernels, timed on this machine's "
                   "GPU or through --rpc-tracker")
    t.add_argument("--db", help="the database folder (default: $ATTNDSL_TUNING_DB, else <cache dir>/tuning)")
    t.add_argument("--rpc-tracker", help="HOST:PORT of a TVM RPC tracker to time on")
    t.add_argument("--rpc-key", help="the device key the tracker's servers registered with")
    cal = sub.add_parser("calibrate", help="time every form on this CPU, so the planner's crossover lengths "
                         "are where the kernels cross")
    cal.add_argument("--lengths", type=_lengths, default=list(calibration.LENGTHS), help="sequence lengths to time")
    cal.add_argument("--db", help="the folder to write calibration.json to (default: the tuning database's)")
    bun = sub.add_parser("bundle", help="compile a spec's kernels, with a runtime that loads them, for a "
                         "machine without TVM's compiler (docs/backends.md)")
    bun.add_argument("file")
    bun.add_argument("--name", help="the attention block (default: all)")
    bun.add_argument("--heads", type=_count(), default=8)
    bun.add_argument("--head-dim", type=dim, default=64)
    bun.add_argument("--value-dim", type=dim, default=None)
    bun.add_argument("--target", choices=("llvm", *TARGETS), default="llvm",
                     help="llvm: CPUs of this machine's model; a CUDA target: any x86-64 host with that GPU")
    bun.add_argument("--arch", help="CUDA: compile the kernels ahead for this GPU (e.g. sm_90; needs nvcc here)")
    bun.add_argument("--dtype", choices=("float32", "float64"), action="append",
                     help="kernel dtypes to include (repeatable; default float32)")
    bun.add_argument("--python", action="append", help="the other machine's Python version, e.g. 3.12 "
                     "(repeatable; default this one's)")
    bun.add_argument("--out", required=True, help="the bundle's folder (its cache stays in OUT.work)")
    args = p.parse_args(argv)
    if args.cmd == "bundle":
        args.dtype = args.dtype or ["float32"]
    try:
        return {"check": cmd_check, "emit": cmd_emit, "run": cmd_run, "tune": cmd_tune,
                "calibrate": cmd_calibrate, "bundle": cmd_bundle}[args.cmd](args)
    except UsageError as e:
        print(f"attndsl {args.cmd}: {e}", file=sys.stderr)
        return 2
    except SpecError as e:
        print(e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
