"""The CUDA path: the portable kernels (lowering/portable/te_forms.py, softmax_rows.py, fft_blocks.py)
that GPU targets build.

On any machine: the portable kernels built for the CPU (unscheduled, as they are) vs the O(N²)
reference, forward and backward, every feature-map family × {full, causal}, float64 gradcheck;
every portable example spec builds for the H100 (sm_90a) and sm_80 without a GPU; the generated
CUDA C compiles with nvcc (where nvcc exists); `attndsl emit --stage cuda`; a clean SpecError for
a form without portable kernels (one taken out of the registry: every form has them). With a GPU (torch.cuda): the same checks on the device.
"""
from __future__ import annotations

import dataclasses
import functools

from pathlib import Path

import pytest
import torch

import attndsl
from attndsl import cli, lowering, pipeline
from attndsl.diagnostics import SpecError
from attndsl.ir import postorder
from attndsl.passes import plan
try:                        # TVM's compiler: absent where tools/gpu_check.sh runs the GPU tests from
    from attndsl.lowering import build                           # the runtime-only bundle
    from attndsl.lowering.portable import te_forms
except ImportError:
    build = te_forms = None
from attndsl.schedules import cuda as cuda_schedules

from conftest import RTOL, assert_close, gradcheck_with_table, shared
from test_linear import KERNELS, MASKS, inputs, spec

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CUDA_TARGETS = ["nvidia/nvidia-h100", "sm_80"]
CASES = [(kern, mask) for kern in KERNELS for mask in MASKS]
# the decayed form (geometric position terms), causal and two-way
DECAYED = {"alibi-causal": "kernel = elu1; position = alibi; mask = causal",
           "alibi-full": "kernel = elu1; position = alibi",
           "affine-full": "kernel = relu; position(r) = -0.1 * abs(r) + 0.05 * r",
           "affine-causal": "kernel = favor(features=16, seed=2); position(r) = -0.2 * abs(r); mask = causal"}
# the banded form (a table clipped at W): W below, across and beyond the chunks of te_forms.CHUNK
BANDED = {"clipped-full": "kernel = elu1; position = toeplitz(max_distance=5, init=normal)",
          "clipped-causal": "kernel = relu; position = toeplitz(max_distance=3, init=normal); mask = causal",
          "wide-full": "kernel = favor(features=16, seed=1); position = toeplitz(max_distance=70, init=normal)",
          "wide-causal": "kernel = elu1; position = toeplitz(max_distance=100, init=normal); mask = causal",
          "longer-than-n": "kernel = elu1; position = toeplitz(max_distance=400, init=normal)"}
# the Toeplitz-FFT forms (fft_blocks.py): a table as long as the sequence, a user function, FastRPB;
# odd M and D (a pair's second half empty)
FFT = {"table-full": "kernel = elu1; position = toeplitz(max_distance=400, init=normal)",
       "table-causal": "kernel = relu; position = toeplitz(max_distance=400, init=normal); mask = causal",
       "user-full": "kernel = elu1; position(r) = -0.3 * abs(r) * abs(r) / (1 + abs(r))",
       "values-table": "kernel = elu1; position = toeplitz(max_distance=400, init=normal); apply = values",
       "values-alibi-causal": "kernel = elu1; position = alibi; apply = values; mask = causal"}
# the quadratic form (softmax_rows.py), with every position kind
SOFTMAX = {"plain-full": "", "plain-causal": "mask = causal",
           "table-full": "position = toeplitz(max_distance=4, init=normal)",
           "table-causal": "position = toeplitz(max_distance=200, init=normal); mask = causal",
           "alibi-causal": "position = alibi; mask = causal",
           "user-full": "position(r) = -0.05 * abs(r) + 0.01 * r"}
# the sampled forms (softmax_rows.py): an estimator for given samples, so compared with the CPU kernels
SAMPLED = {"kde": "sampling = kde(buckets=4, block=8, samples=6, seed=1)",
           "kde-sampled": "sampling = kde(buckets=4, block=8, samples=6, seed=1, heavy=0, tail=sampled, "
                          "residual=values)",
           "uniform-causal": "sampling = uniform(samples=5, seed=2); mask = causal",
           "uniform-full": "sampling = uniform(samples=5, seed=2)"}
HAS_GPU = torch.cuda.is_available()


# this CPU running the portable kernels (as a GPU target builds them, minus the schedule)
PORTABLE_CPU = attndsl.Target("llvm", kernels="portable")


def compiled(kernel: str, mask: str, target=PORTABLE_CPU, heads=2, head_dim=8, value_dim=6):
    return shared(spec(kernel, mask), heads=heads, head_dim=head_dim, value_dim=value_dim, target=target)


def check_against_reference(attn, q, k, v, rtol):
    q64, k64, v64 = (t.detach().double().clone().requires_grad_() for t in (q, k, v))
    ref = attn.reference(q64, k64, v64)
    qc, kc, vc = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attn(qc, kc, vc)
    assert out.dtype == q.dtype and out.device == q.device and out.shape == ref.shape
    assert_close("out", ref, out, rtol)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g.to(out))
    for name, a, b in (("dq", q64, qc), ("dk", k64, kc), ("dv", v64, vc)):
        assert_close(name, a.grad, b.grad, 20 * rtol)


# --- the portable kernels' maths, on the CPU ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kernel,mask", CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_portable_kernels_match_reference(kernel, mask, dtype):
    attn = compiled(kernel, mask)
    assert "portable kernels" in attn.explain()
    check_against_reference(attn, *inputs(2, 2, 70, 8, 6, dtype, kernel), RTOL[dtype])


@pytest.mark.parametrize("kernel,mask", CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_portable_gradcheck_float64(kernel, mask):
    attn = compiled(kernel, mask)            # the float64 kernels test_portable_kernels_match_reference builds
    q, k, v = (t.requires_grad_() for t in inputs(1, 2, 5, 8, 6, torch.float64, kernel))
    assert torch.autograd.gradcheck(attn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def decayed(case: str, target=PORTABLE_CPU, head_dim=8, value_dim=6) -> attndsl.Attention:
    attn = shared(f"attention t {{ {DECAYED[case]} }}", heads=2, head_dim=head_dim, value_dim=value_dim,
                  target=target)
    assert "form decayed" in attn.explain()
    return attn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", sorted(DECAYED))
def test_portable_decayed_matches_reference(case, dtype):
    check_against_reference(decayed(case), *inputs(2, 2, 150, 8, 6, dtype), RTOL[dtype])


@pytest.mark.parametrize("case", sorted(DECAYED))
def test_portable_decayed_gradcheck_float64(case):
    """Across chunks (N = C + 3): the decayed states carried from chunk to chunk, both ways."""
    attn = decayed(case, head_dim=3, value_dim=2)
    q, k, v = (t.requires_grad_() for t in inputs(1, 2, te_forms.CHUNK + 3, 3, 2, torch.float64))
    assert torch.autograd.gradcheck(attn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def with_table(body: str, form: str, target=PORTABLE_CPU, head_dim=8, value_dim=6) -> attndsl.Attention:
    """`attention t { body }` planned as `form` (forced, as a table longer than the sequence is
    either banded or FFT; but not values_fft, whose spec has a linear site too, which plan= would
    force as well), its table (if any) far from the zero init."""
    attn = shared(f"attention t {{ {body} }}", init=_spread_table, heads=2, head_dim=head_dim,
                  value_dim=value_dim, target=target, plan="auto" if form == "values_fft" else form)
    assert f"form {form}" in attn.explain()
    return attn


def _spread_table(attn):
    if attn.position_table is not None:
        with torch.no_grad():
            attn.position_table.copy_(0.5 * torch.randn_like(attn.position_table))


def softmax(case: str, **kw) -> attndsl.Attention:
    return with_table(SOFTMAX[case], "quadratic", **kw)


def banded(case: str, **kw) -> attndsl.Attention:
    return with_table(BANDED[case], "banded", **kw)


def fft(case: str, **kw) -> attndsl.Attention:
    return with_table(FFT[case], "values_fft" if "apply = values" in FFT[case] else "toeplitz_fft", **kw)


WITH_TABLE = {"quadratic": softmax, "banded": banded, "fft": fft}
TABLE_CASES = ([("quadratic", c) for c in sorted(SOFTMAX)] + [("banded", c) for c in sorted(BANDED)]
               + [("fft", c) for c in sorted(FFT)])


def check_with_table(attn, q, k, v, rtol):
    """Out, dq, dk, dv and (where there is a table) d table vs the reference."""
    check_against_reference(attn, q, k, v, rtol)
    if attn.position_table is not None:
        g = torch.randn(v.shape, dtype=torch.float64, device=v.device)
        attn.zero_grad()
        (attn.reference(q.double(), k.double(), v.double()) * g).sum().backward()
        ref = attn.position_table.grad.clone()
        attn.zero_grad()
        (attn(q, k, v) * g.to(q)).sum().backward()
        assert_close("dtable", ref, attn.position_table.grad.to(ref.device), 20 * rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("form,case", TABLE_CASES, ids=[f"{f}-{c}" for f, c in TABLE_CASES])
def test_portable_softmax_and_banded_match_reference(form, case, dtype):
    """N = 150. Banded: the band by offsets, the far keys through chunk states shifted by W (both
    sides without a mask), the table's gradient per offset and in its two far slots. FFT: M = 7,
    D = 5 (odd pairs), L = 512 (9 radix-2 stages, two passes of 256 threads each)."""
    kw = {"head_dim": 7, "value_dim": 5} if form == "fft" else {}
    check_with_table(WITH_TABLE[form](case, **kw), *inputs(2, 2, 150, kw.get("head_dim", 8),
                                                           kw.get("value_dim", 6), dtype), RTOL[dtype])


@pytest.mark.parametrize("case", sorted(SOFTMAX))
def test_portable_softmax_gradcheck_float64(case):
    gradcheck_with_table(softmax(case), *inputs(1, 2, 11, 8, 6, torch.float64))


@pytest.mark.parametrize("case", sorted(FFT))
def test_portable_fft_gradcheck_float64(case):
    gradcheck_with_table(fft(case, head_dim=7, value_dim=5), *inputs(1, 2, 11, 7, 5, torch.float64))


@pytest.mark.parametrize("case", ["clipped-full", "clipped-causal", "wide-full"])
def test_portable_banded_gradcheck_float64(case):
    """N = C + 9, so far keys fall in the chunk before and the chunk after."""
    gradcheck_with_table(banded(case, head_dim=3, value_dim=2),
                         *inputs(1, 2, te_forms.CHUNK + 9, 3, 2, torch.float64))


@pytest.fixture
def no_portable_fft(monkeypatch):
    """The registry as if the portable Toeplitz-FFT kernels did not exist."""
    monkeypatch.setitem(lowering.FORMS, "toeplitz_fft", dataclasses.replace(lowering.FORMS["toeplitz_fft"],
                                                                            portable=None))


def test_the_planner_picks_forms_the_target_has_kernels_for(no_portable_fft):
    """A table as long as the sequence: Toeplitz-FFT where the target has FFT kernels, else
    banded (exact, O(N·W))."""
    text = "attention t { kernel = elu1; position = toeplitz(max_distance=4096) }"
    cpu = pipeline.run(attndsl.parse(text).block("t"), 64, 64)
    assert [d.form for d in cpu.decisions] == ["toeplitz_fft"]
    gpu = attndsl.compile(text, heads=2, head_dim=64, target="sm_80", dtype=None)
    assert "form banded" in gpu.explain() and "toeplitz_fft=" not in gpu.explain()
    assert all("pairwise" not in p.forms for p in gpu.plans)     # no portable kernels: planned around


def test_every_planned_form_has_cpu_and_portable_kernels():
    """Every registered form has CPU kernels and, but for the CPU-only pairwise form, portable ones
    (a portable target plans around it: the test above); every form the
    planner can choose for some spec is registered."""
    assert all(f.cpu is not None for f in lowering.FORMS.values())
    assert [n for n, f in lowering.FORMS.items() if f.portable is None] == ["pairwise"]
    valid = {f.name for body in SPECS_OF_EVERY_FORM
             for site in _sites(f"attention t {{ {body} }}") for f in plan.candidates(site)}
    assert valid == set(lowering.FORMS)


SPECS_OF_EVERY_FORM = ["kernel = elu1", "kernel = elu1; mask = causal", "kernel = elu1; position = alibi",
                       "kernel = elu1; position = toeplitz(max_distance=8)",
                       "kernel = elu1; position = toeplitz(max_distance=8); apply = values", "",
                       SAMPLED["kde"], SAMPLED["uniform-full"]]


def _sites(text: str) -> list:
    """The form sites of a spec's IR before planning."""
    ir = pipeline.run(attndsl.parse(text).block("t"), 8, 8).stage("fuse_maps")
    return [x for x in postorder(ir) if hasattr(x, "form")]


def test_a_table_as_long_as_the_sequence_takes_the_fft_form_on_cuda():
    text = "attention t { kernel = elu1; position = toeplitz(max_distance=4096) }"
    assert "form toeplitz_fft" in attndsl.compile(text, heads=2, head_dim=64, target="sm_80",
                                                dtype=None).explain()      # the plan; other tests build


def sampled(case: str, target=PORTABLE_CPU, head_dim=8, value_dim=6) -> attndsl.Attention:
    return attndsl.compile(f"attention t {{ {SAMPLED[case]} }}", heads=2, head_dim=head_dim,
                           value_dim=value_dim, target=target)


def out_and_grads(attn, q, k, v):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attn(q, k, v)
    out.backward(torch.ones_like(out) + torch.arange(out.numel()).reshape(out.shape).to(out) % 3)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", sorted(SAMPLED))
def test_portable_sampled_matches_the_cpu_kernels(case, dtype):
    """Same seed, same samples: the row-per-thread kernels give the CPU kernels' estimate and its
    exact gradient (through the sample weights too, for kde)."""
    q, k, v = inputs(2, 2, 53, 8, 6, dtype)
    got = out_and_grads(sampled(case), q, k, v)
    assert "portable kernels" in sampled(case).explain()
    want = out_and_grads(sampled(case, target="llvm"), q, k, v)
    for name, a, b in zip(("out", "dq", "dk", "dv"), want, got):
        assert_close(name, a, b, 10 * RTOL[dtype])


# --- the scheduled CUDA kernels' maths, on the CPU -----------------------------------------------------

def serialized_library(attn, n: int, dtype: str) -> str:
    """The kernels of `attn`'s plan at length n as the CUDA target schedules them (dlight), with
    every GPU thread binding turned into a serial loop and built for the CPU, registered with ops;
    its key. Exact for kernels without shared memory or barriers: every thread's work in turn."""
    import re

    import tvm
    from tvm.script import from_source
    from attndsl import ops
    from attndsl.schedules import cuda
    root = attn.plans[attn._plan_index(n, getattr(torch, dtype))].root
    funcs = lowering.lower(root, dtype, portable=True, gpu=True)
    text = cuda.schedule(tvm.IRModule(funcs), build.resolve_target("nvidia/nvidia-h100")).script()
    assert "T.thread_binding" in text and '"shared' not in text and "storage_sync" not in text
    text = re.sub(r'T\.thread_binding\((.*), thread="[^"]+"\):', r"T.serial(\1):", text)
    # TVM 0.27's parser reads float64's lowest value, as its printer writes it, as a float32
    lowest = 'T.min_value("float64")'
    text = re.sub(r"T\.float64\((-\d{300,}\.0)\)", lambda m: lowest if float(m[1]) == torch.finfo(torch.float64).min
                  else m[0], text)
    serial = from_source(text)
    key = f"serialized-{id(attn)}-{n}-{dtype}"
    ops.register_library(key, build.build({gv.name_hint: f for gv, f in serial.functions.items()},
                                          build.resolve_target("llvm")))
    return key


# the portable kernel families without shared memory or barriers (the FFT blocks have both)
SCHEDULED = {
    "prefix_sum": lambda: compiled("elu1", "causal"),
    "decayed": lambda: decayed("alibi-causal"),
    "linear-favor": lambda: compiled("favor", "full"),
    "banded": lambda: banded("clipped-causal"),
    "quadratic-table": lambda: softmax("table-causal"),
    "kde": lambda: sampled("kde"),
}


@pytest.mark.parametrize("case", SCHEDULED)
def test_scheduled_cuda_kernels_compute_what_the_unscheduled_ones_do(case):
    """dlight's index splitting, fusion and bound guards, run on the CPU: the scheduled kernels
    with their threads serialized give the unscheduled portable build's output and gradients."""
    attn, n = SCHEDULED[case](), 150
    q, k, v = inputs(2, 2, n, 8, 6, torch.float64)
    want = out_and_grads(attn, q, k, v)
    i = attn._plan_index(n, torch.float64)
    plain = attn._library("float64", i)
    from attndsl import ops
    try:
        key = attn._libs[i, "float64"] = serialized_library(attn, n, "float64")
        got = out_and_grads(attn, q, k, v)
        assert any(lib == key for lib, _ in ops._KERNELS)          # the serialized kernels ran
    finally:
        attn._libs[i, "float64"] = plain
    for name, a, b in zip(("out", "dq", "dk", "dv"), want, got):
        assert_close(name, a, b, 1e-12)


def test_portable_kde_is_exact_when_one_block_holds_every_key():
    attn = attndsl.compile("attention t { sampling = kde(buckets=4, block=64, samples=6) }", heads=2,
                           head_dim=8, value_dim=6, target=PORTABLE_CPU)
    check_against_reference(attn, *inputs(1, 2, 40, 8, 6, torch.float64), RTOL[torch.float64])


@pytest.mark.parametrize("case", ["kde", "uniform-causal"])
def test_portable_sampled_gradcheck_float64(case):
    attn = sampled(case, head_dim=3, value_dim=2)
    q, k, v = (t.requires_grad_() for t in inputs(1, 2, 19, 3, 2, torch.float64))
    assert torch.autograd.gradcheck(attn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_portable_gradcheck_across_chunks():
    """Causal rows in three chunks of te_forms.CHUNK: the prefix states and the in-chunk blocks."""
    attn = compiled("elu1", "causal", heads=1, head_dim=3, value_dim=2)
    n = 2 * te_forms.CHUNK + 3
    q, k, v = (t.requires_grad_() for t in inputs(1, 1, n, 3, 2, torch.float64, "elu1"))
    assert torch.autograd.gradcheck(attn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 130, 1000], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("mask", ["full", "causal"])
def test_portable_one_build_serves_every_length(mask, n):
    attn = compiled("favor", mask)
    q, k, v = inputs(1, 2, n, 8, 6, torch.float64, "favor")
    assert_close("out", attn.reference(q, k, v), attn(q, k, v), RTOL[torch.float64])


# --- CUDA code generation, no GPU needed --------------------------------------------------------------

def _portable_examples():
    """Every example block with portable kernels; the tests of one block run on one test worker
    (pytest -n --dist loadgroup), which builds its CUDA C once (cuda_build)."""
    for path in sorted(EXAMPLES.glob("*.attn")):
        for s in attndsl.parse(path.read_text(), filename=str(path)).blocks:
            root = pipeline.run(s, 16, 16).root
            try:
                lowering.check(root, portable=True)
            except lowering.NotLowered:
                continue
            yield pytest.param(path, s.name, id=f"{path.stem}-{s.name}",
                               marks=pytest.mark.xdist_group(f"cuda-{path.stem}-{s.name}"))


PORTABLE_EXAMPLES = list(_portable_examples())


def test_every_feature_map_family_has_a_portable_example():
    names = {p.values[1] for p in PORTABLE_EXAMPLES}
    assert {"linear_elu", "linear_elu_causal", "performer_causal", "squared_softplus",
            "gaussian_rff", "hyperbolic_causal", "alibi_linear", "softmax_causal", "softmax_rpe",
            "softmax_alibi", "kdeformer", "kdeformer_sampled", "uniform_sampled", "clipped_table", "smooth_bias",
            "fastrpb"} <= names


@functools.cache
def cuda_build(path: Path, name: str, target: str) -> tuple[tuple[str, ...], str]:
    """(kernel names, CUDA C) of an example block built for a CUDA target, once per test process."""
    s = attndsl.parse(path.read_text(), filename=str(path)).block(name)
    funcs = lowering.lower(pipeline.run(s, 64, 64).root, "float32", portable=True)
    tgt = build.resolve_target(target)
    assert tgt.kind.name == "cuda"
    return tuple(funcs), build.cuda_source(build.build(funcs, tgt))


# every example for the H100; the sm_80 build of one (its nvcc test shares it)
SM80 = pytest.param(EXAMPLES / "softmax.attn", "softmax_rpe", "sm_80", id="sm_80",
                    marks=pytest.mark.xdist_group("cuda-sm_80"))


@pytest.mark.parametrize("path,name,target", [pytest.param(*p.values, CUDA_TARGETS[0], id=p.id, marks=p.marks)
                                              for p in PORTABLE_EXAMPLES] + [SM80])
def test_examples_build_for_cuda(path, name, target):
    funcs, src = cuda_build(path, name, target)
    for kernel in funcs:                 # each PrimFunc is a host function launching its kernels
        assert f"{kernel}_kernel" in src, kernel
    assert src.count("__global__") >= len(funcs)
    assert "threadIdx.x" in src and "blockIdx.x" in src


def test_compile_for_cuda_builds_without_a_gpu():
    attn = attndsl.compile((EXAMPLES / "performer_causal.attn").read_text(), heads=2, head_dim=16,
                           target="sm_80")
    text = attn.explain()
    assert "target=sm_80" in text and "the portable kernels, bound to GPU threads" in text
    if not HAS_GPU:
        assert "stored for a machine with a CUDA runtime" in text
        with pytest.raises(ValueError, match="compiled for CUDA"):
            attn(*inputs(1, 2, 8, 16, 16, torch.float32, "favor"))


def test_forms_without_portable_kernels_are_a_spec_error(no_portable_fft):
    text = (EXAMPLES / "positions.attn").read_text()
    with pytest.raises(SpecError, match="not lowered for target cuda") as e:
        attndsl.compile(text, name="smooth_bias", heads=2, head_dim=16, target="cuda")
    assert ("forms with cuda kernels: banded, decayed, kde, linear, prefix_sum, quadratic, uniform, values_fft"
            in str(e.value))
    assert "target='llvm' compiles every form" in str(e.value)


def test_unknown_target_lists_the_cuda_names():
    with pytest.raises(ValueError, match="'nvidia/nvidia-h100'.*'sm_80'"):
        attndsl.compile("attention a { kernel = elu1 }", heads=1, head_dim=8, target="sm_99")


NVCC = cuda_schedules.nvcc_path()


# one example of each kernel family (map kinds, scan, decay, band, FFT scores and values, sampled,
# softmax with a position term); test_examples_build_for_cuda generates the CUDA C of every one
NVCC_EXAMPLES = {"squared_softplus", "gaussian_rff", "hyperbolic_causal", "performer_rpe", "alibi_linear",
                 "smooth_bias", "fastrpb", "kdeformer", "uniform_sampled", "softmax_alibi"}


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
@pytest.mark.parametrize("path,name,target", [pytest.param(*p.values, CUDA_TARGETS[0], id=p.id, marks=p.marks)
                                              for p in PORTABLE_EXAMPLES if p.values[1] in NVCC_EXAMPLES]
                         + [SM80])
def test_generated_cuda_compiles_with_nvcc(path, name, target, monkeypatch):
    """What the GPU would JIT at load time, compiled ahead by nvcc to a cubin for the arch."""
    from tvm.support import nvcc
    monkeypatch.setenv("PATH", str(Path(NVCC).parent) + ":" + __import__("os").environ["PATH"])
    _, src = cuda_build(path, name, target)
    tgt = build.resolve_target(target)
    with tgt:
        cubin = nvcc.compile_cuda(src, target_format="cubin", arch=build.cuda.arch(tgt), compiler="nvcc")
    assert len(cubin) > 1000


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
@pytest.mark.xdist_group("cuda-sm_80")
def test_the_census_reports_every_kernel_s_registers_and_spills(monkeypatch):
    """ptxas -v over the generated CUDA: a row per __global__ kernel of every PrimFunc."""
    from attndsl.schedules import cuda
    monkeypatch.setenv("PATH", str(Path(NVCC).parent) + ":" + __import__("os").environ["PATH"])
    funcs, src = cuda_build(EXAMPLES / "softmax.attn", "softmax_rpe", "sm_80")
    rows = cuda.census(src, build.resolve_target("sm_80"))
    names = [r.name for r in rows]
    assert all(any(n.startswith(f"{f}_kernel") for n in names) for f in funcs)
    assert all(r.registers > 0 and r.spill_stores >= 0 for r in rows)
    assert "| registers |" in cuda.census_table(rows)


def test_emit_stage_cuda_prints_the_cuda_source(capsys):
    path = str(EXAMPLES / "linear_elu.attn")
    assert cli.main(["emit", path, "--name", "linear_elu_causal", "--stage", "cuda"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("// linear_elu_causal: CUDA C for sm_90a")
    assert "__global__" in out and "linear_attention" in out
    assert cli.main(["emit", path, "--name", "linear_elu", "--stage", "cuda", "--target", "sm_80"]) == 0
    assert capsys.readouterr().out.startswith("// linear_elu: CUDA C for sm_80")


def test_emit_stage_tir_for_cuda_is_scheduled(capsys):
    path = str(EXAMPLES / "linear_elu.attn")
    assert cli.main(["emit", path, "--name", "linear_elu", "--stage", "tir", "--target", "cuda"]) == 0
    assert "blockIdx.x" in capsys.readouterr().out


def test_emit_stage_cuda_of_a_form_without_portable_kernels(capsys, no_portable_fft):
    path = str(EXAMPLES / "positions.attn")
    assert cli.main(["emit", path, "--name", "smooth_bias", "--stage", "cuda"]) == 1
    assert "not lowered for target cuda" in capsys.readouterr().err


# --- on a GPU -----------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU (torch.cuda.is_available() is False)")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kernel,mask", CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_gpu_matches_reference(kernel, mask, dtype):
    attn = compiled(kernel, mask, target="cuda").cuda()
    q, k, v = (t.cuda() for t in inputs(2, 2, 200, 8, 6, dtype, kernel))
    check_against_reference(attn, q, k, v, 10 * RTOL[dtype])


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", sorted(DECAYED))
def test_gpu_decayed_matches_reference(case, dtype):
    q, k, v = (t.cuda() for t in inputs(2, 2, 200, 8, 6, dtype))
    check_against_reference(decayed(case, target="cuda").cuda(), q, k, v, 10 * RTOL[dtype])


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("form,case", TABLE_CASES, ids=[f"{f}-{c}" for f, c in TABLE_CASES])
def test_gpu_softmax_and_banded_match_reference(form, case, dtype):
    q, k, v = (t.cuda() for t in inputs(2, 2, 300, 8, 6, dtype))
    check_with_table(WITH_TABLE[form](case, target="cuda").cuda(), q, k, v, 10 * RTOL[dtype])


@gpu
@pytest.mark.parametrize("case", sorted(SAMPLED))
def test_gpu_sampled_matches_the_cpu_kernels(case):
    """The same seed draws the same samples on both devices (a CPU generator)."""
    q, k, v = inputs(2, 2, 300, 8, 6, torch.float64)
    want = out_and_grads(sampled(case), q, k, v)
    got = out_and_grads(sampled(case, target="cuda").cuda(), q.cuda(), k.cuda(), v.cuda())
    for name, a, b in zip(("out", "dq", "dk", "dv"), want, got):
        assert_close(name, a, b.cpu(), 1e-9)


@gpu
@pytest.mark.parametrize("mask", ["full", "causal"])
def test_gpu_gradcheck_float64(mask):
    attn = compiled("elu1", mask, target="cuda", heads=1, head_dim=3, value_dim=2).cuda()
    q, k, v = (t.cuda().requires_grad_() for t in inputs(1, 1, 70, 3, 2, torch.float64, "elu1"))
    assert torch.autograd.gradcheck(attn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@gpu
def test_gpu_library_is_cached():
    a = attndsl.compile(spec("elu1", "causal"), heads=2, head_dim=8, target="cuda")
    b = attndsl.compile(spec("elu1", "causal"), heads=2, head_dim=8, target="cuda")
    assert "compiled" in a.explain() and "loaded from cache" in b.explain()
    q, k, v = (t.cuda() for t in inputs(1, 2, 100, 8, 8, torch.float32, "elu1"))
    torch.testing.assert_close(a(q, k, v), b(q, k, v))


def gpu_builds() -> list[tuple[str, object]]:
    """(label, build) for every library the GPU tests above load, in both dtypes where they run
    both: what `make gpu-bundle` compiles ahead (tools/gpu_bundle.py), so a GPU machine compiles
    nothing. A test added above that compiles another spec for CUDA belongs here too."""
    both = ("float32", "float64")
    out = [(f"{k}-{m}", lambda k=k, m=m: compiled(k, m, target="cuda"), both) for k, m in CASES]
    out += [(f"decayed {c}", lambda c=c: decayed(c, target="cuda"), both) for c in sorted(DECAYED)]
    out += [(f"{f} {c}", lambda f=f, c=c: WITH_TABLE[f](c, target="cuda"), both) for f, c in TABLE_CASES]
    out += [(f"sampled {c}", lambda c=c: sampled(c, target="cuda"), ("float64",)) for c in sorted(SAMPLED)]
    out += [(f"gradcheck elu1-{m}", lambda m=m: compiled("elu1", m, target="cuda", heads=1, head_dim=3,
                                                         value_dim=2), ("float64",)) for m in ("full", "causal")]
    out += [("cached elu1-causal", lambda: attndsl.compile(spec("elu1", "causal"), heads=2, head_dim=8,
                                                             target="cuda"), ("float32",))]
    path = EXAMPLES / "performer_causal.attn"
    out += [(f"run {b.name}", lambda b=b: attndsl.compile(str(path), b.name, heads=2, head_dim=32, target="cuda"),
             ("float32",))
            for b in attndsl.parse(path.read_text()).blocks]
    return [(label, lambda make=make, dtypes=dtypes: _build_all(make(), dtypes)) for label, make, dtypes in out]


def _build_all(attn, dtypes) -> None:
    for dtype in dtypes:
        attn.build(dtype)


# --- the portable kernels' knobs (schedules/knobs.py portable_*) through a tuning database ------------

def _record(db_folder, root, kernels, family, times: dict, target: str):
    """Commit `times` {knob label: seconds} for the portable `kernels` as if measured on `target`."""
    from test_tune import _record as record
    for kernel in kernels:
        record(db_folder, root, kernel, family, times, n=256, target=target, portable=True, P=9)


KNOB_CASES = [("elu1-causal", "kernel = elu1; mask = causal", "portable_linear", "chunk", 32),
              ("elu1-causal", "kernel = elu1; mask = causal", "portable_linear", "chunk", 128),
              ("alibi-full", "kernel = elu1; position = alibi", "portable_linear", "chunk", 128),
              ("clipped-full", "kernel = elu1; position = toeplitz(max_distance=40, init=normal)", "portable_linear",
               "chunk", 32),
              ("table-softmax", "position = toeplitz(max_distance=4, init=normal)", "portable_rows", "rows", 64),
              ("causal-softmax", "mask = causal", "portable_rows", "rows", 256),
              # one block holds every key (N = 300): the estimate is exact
              ("kde-one-block", "sampling = kde(buckets=4, block=512, samples=6, seed=1)", "portable_rows", "rows",
               64),
              ("table-fft", "kernel = elu1; position = toeplitz(max_distance=400, init=normal)", "portable_fft",
               "threads", 128),
              ("fastrpb-causal", "kernel = elu1; position = toeplitz(max_distance=400, init=normal); apply = values; "
               "mask = causal", "portable_fft", "threads", 512)]


@pytest.mark.parametrize("case,body,family,knob,value", KNOB_CASES,
                         ids=[f"{c[0]}-{c[3]}{c[4]}" for c in KNOB_CASES])
def test_every_portable_knob_choice_computes_the_same_attention(tmp_path, monkeypatch,
                                                                case, body, family, knob, value):
    """A record that makes the choice the best: compile() builds it, explain() names it, and it
    matches the reference forward and backward."""
    from attndsl.schedules import knobs
    monkeypatch.setenv("ATTNDSL_TUNING_DB", str(tmp_path))
    text = f"attention t {{ {body} }}"
    root = pipeline.run(attndsl.parse(text).block(None), 8, 6, forms=lowering.forms_for(PORTABLE_CPU)).root
    kernels = [k for k, f in lowering.tunable(root, portable=True).items() if f == family]
    assert kernels
    default = knobs.label(knobs.defaults(family))
    _record(tmp_path, root, kernels, family, {default: 2e-3, f"{knob}={value}": 1e-3}, "llvm")
    attn = attndsl.compile(text, heads=2, head_dim=8, value_dim=6, target=PORTABLE_CPU)
    assert f"{kernels[0]} {knob}={value}  (2.00x the defaults" in attn.explain()
    check_against_reference(attn, *inputs(1, 2, 300, 8, 6, torch.float64), RTOL[torch.float64])


def test_a_record_for_a_cuda_target_is_built_for_it(tmp_path, monkeypatch):
    """The lookup of CUDA kernels' knobs, without a GPU: a record for sm_80 picks chunk=128."""
    monkeypatch.setenv("ATTNDSL_TUNING_DB", str(tmp_path))
    text = "attention t { kernel = elu1; mask = causal }"
    root = pipeline.run(attndsl.parse(text).block(None), 8, 6).root
    kernels = list(lowering.tunable(root, portable=True))
    _record(tmp_path, root, kernels, "portable_linear", {"chunk=64": 3e-3, "chunk=128": 1e-3}, "sm_80")
    attn = attndsl.compile(text, heads=2, head_dim=8, value_dim=6, target="sm_80")
    assert f"{kernels[1]} chunk=128  (3.00x the defaults" in attn.explain()
    other = attndsl.compile(text, heads=2, head_dim=8, value_dim=6, target="nvidia/nvidia-h100")
    assert "default knobs (no better record" in other.explain()      # another GPU: not applied


@pytest.mark.skipif(HAS_GPU, reason="checks the message of a machine without a GPU")
def test_tune_for_cuda_without_a_gpu_says_where_to_run_it(tmp_path, capsys):
    path = str(EXAMPLES / "linear_elu.attn")
    assert cli.main(["tune", path, "--target", "cuda", "--db", str(tmp_path)]) == 2
    assert "no CUDA GPU here" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(HAS_GPU, reason="checks the message of a machine without a GPU")
def test_run_for_cuda_without_a_gpu_says_so(capsys):
    assert cli.main(["run", str(EXAMPLES / "linear_elu.attn"), "--target", "cuda", "--seq", "64"]) == 2
    assert "torch sees none here" in capsys.readouterr().err


@gpu
def test_run_for_cuda_checks_and_times_on_the_gpu(capsys):
    assert cli.main(["run", str(EXAMPLES / "performer_causal.attn"), "--target", "cuda", "--seq", "512",
                     "--heads", "2", "--head-dim", "32"]) == 0
    assert "ok" in capsys.readouterr().out


@pytest.mark.parametrize("body,family", [("kernel = elu1; mask = causal", "portable_linear"),
                                         ("kernel = elu1; position = toeplitz(max_distance=400)", "portable_fft")],
                         ids=["causal-chunk", "fft-threads"])
def test_the_tuner_builds_cuda_variants_with_meta_schedules_builder(body, family):
    """What `attndsl tune --target cuda` hands meta_schedule's LocalBuilder (worker processes):
    every knob choice of a forward kernel, scheduled and compiled for sm_80 (timing needs a GPU)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from attndsl.lowering import tune
    from attndsl.schedules import knobs
    root = pipeline.run(attndsl.parse(f"attention t {{ {body} }}").block(None), 16, 16).root
    kernels = lowering.tunable(root, portable=True)
    fwd = next(k for k in kernels if k.endswith("_fwd"))
    assert kernels[fwd] == family
    target = tvm.target.Target(build.resolve_target("sm_80"))
    inputs_ = [ms.builder.BuilderInput(tvm.IRModule({"main": lowering.lower(
        root, "float32", {fwd: c}, only={fwd}, portable=True)[fwd].with_attr("global_symbol", "main")}), target)
        for c in knobs.grid(family)]
    built = ms.builder.LocalBuilder(max_workers=1, f_build=tune._compile).build(inputs_)
    assert [b.error_msg for b in built] == [None] * len(inputs_)
    assert all(Path(b.artifact_path).stat().st_size > 0 for b in built)
