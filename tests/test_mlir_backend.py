"""target="mlir-cpu": the planned IR lowered from the attn dialect to linalg by MLIR rewrite
patterns, bufferized, compiled by MLIR's ExecutionEngine, and checked against the §2 reference
and the TVM backend on every example spec."""
import functools
from pathlib import Path

import psutil
import pytest
import torch
from conftest import RTOL, assert_close
from torch_mlir import ir

import attndsl
from attndsl import parse, pipeline
from attndsl.cli import main
from attndsl.mlir import backend, dialect, linalg

EXAMPLES = Path(__file__).parent.parent / "examples"
HEADS, HEAD_DIM, VALUE_DIM = 2, 8, 4

# forms and maps the examples do not show
EXTRA = """
attention exp_shift_values { kernel = exp_shift; position = toeplitz(max_distance=8); apply = values }
attention favor_plain { kernel = favor(features=16, orthogonal=false, stabilize=false, seed=2) }
attention alibi_slope_full { kernel = elu1; position = alibi(slope=0.25) }
attention geometric_user { kernel = relu; position(r) = -0.1 * abs(r) + 0.05 * r }
attention softmax_user_causal { position(r) = 0.3 * cos(r / 4); mask = causal; scale = 0.2 }
attention table_fft { kernel = elu1; position = toeplitz(max_distance=40, init=normal); mask = causal }
attention kde_columns { sampling = kde(buckets=4, block=8, samples=16, residual=columns) }
"""
# every example but those with params, which mlir-cpu refuses (tests/test_params.py)
SOURCES = {b.name: (str(path), b.name) for path in sorted(EXAMPLES.glob("*.attn"))
           for b in parse(path.read_text()).blocks if not b.params}
SOURCES.update({b.name: (EXTRA, b.name) for b in parse(EXTRA).blocks})
SAMPLED = {n for n, (src, name) in SOURCES.items()
           if parse(src if "{" in src else Path(src).read_text()).block(name).sampling.name != "none"}


@functools.cache
def modules(name: str):
    """The same spec on both backends, with the same (random, non-zero) position table."""
    src, block = SOURCES[name]
    mlir = attndsl.compile(src, block, heads=HEADS, head_dim=HEAD_DIM, value_dim=VALUE_DIM, target="mlir-cpu")
    tvm = attndsl.compile(src, block, heads=HEADS, head_dim=HEAD_DIM, value_dim=VALUE_DIM, dtype=None)
    if mlir.position_table is not None:
        with torch.no_grad():
            mlir.position_table.normal_(0, 0.5)
            tvm.position_table.copy_(mlir.position_table)
    return mlir, tvm


def inputs(n: int, dtype, batch: int = 2):
    """q, k around +0.5 (so no relu row of φq·φk is all zeros, whose 0/0 both backends share), v."""
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(batch, HEADS, n, d, generator=g, dtype=dtype) for d in (HEAD_DIM, HEAD_DIM, VALUE_DIM))
    return q + 0.5, k + 0.5, v


# float64 for every spec; float32, whose lowering differs only in the element type, for one spec
# of each form (decayed, banded, FFT scores and values, prefix_sum, quadratic, sampled)
F32 = ("alibi_linear", "clipped_table", "smooth_bias", "fastrpb", "performer_causal", "softmax_rpe", "kdeformer")
CASES = [(n, torch.float64) for n in SOURCES] + [(n, torch.float32) for n in F32]


@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{str(d)[-2:]}" for n, d in CASES])
def test_matches_reference_and_tvm(name, dtype):
    """Both backends agree; exact forms also equal §2 (sampled ones estimate it, from the same
    samples on both backends)."""
    mlir, tvm = modules(name)
    q, k, v = inputs(37, dtype)
    with torch.no_grad():
        out, tvm_out = mlir(q, k, v), tvm(q, k, v)
    assert out.dtype == dtype and out.shape == (2, HEADS, 37, VALUE_DIM)
    assert_close(f"{name} mlir vs tvm", tvm_out, out, 2 * RTOL[dtype])
    if name not in SAMPLED:
        assert_close(f"{name} mlir vs §2", mlir.reference(q.double(), k.double(), v.double()), out, RTOL[dtype])


def test_kde_is_exact_when_its_block_covers_the_sequence():
    mlir = attndsl.compile("attention s { sampling = kde(buckets=4, block=64, samples=8, seed=1) }",
                           heads=HEADS, head_dim=HEAD_DIM, value_dim=VALUE_DIM, target="mlir-cpu")
    q, k, v = inputs(50, torch.float64)
    with torch.no_grad():
        out = mlir(q, k, v)
    assert_close("kde block ≥ N", mlir.reference(q, k, v), out, RTOL[torch.float64])


@pytest.mark.parametrize("name", ["linear_elu_causal", "alibi_linear", "smooth_bias", "softmax_user_causal"])
def test_every_length_from_one_build(name):
    mlir, _ = modules(name)
    for n in (1, 2, 5, 64):
        q, k, v = inputs(n, torch.float32, batch=1)
        with torch.no_grad():
            out = mlir(q, k, v)
        assert_close(f"{name} N={n}", mlir.reference(q.double(), k.double(), v.double()), out, RTOL[torch.float32])


def test_no_attn_op_survives_the_rewrite():
    spec = parse(Path(EXAMPLES / "positions.attn").read_text()).block("alibi_linear")
    root = pipeline.run(spec, HEAD_DIM, HEAD_DIM).root
    text = str(linalg.lower({"alibi_linear": root}, backend.params(spec, HEADS, HEAD_DIM)))
    assert "attn." not in text
    assert "linalg.generic" in text and "scf.for" in text        # the decayed recurrence
    with ir.Context():
        assert ir.Module.parse(text).operation.verify()          # plain upstream dialects


def test_forward_only_says_so():
    mlir, _ = modules("linear_elu")
    q, k, v = inputs(8, torch.float32)
    with pytest.raises(RuntimeError, match="no_grad"):
        mlir(q.requires_grad_(), k, v)


@pytest.mark.parametrize("name", ["clipped_table", "performer_causal"])
def test_no_memory_growth_over_1000_calls(name):
    mlir, _ = modules(name)
    q, k, v = inputs(64, torch.float32)
    proc = psutil.Process()
    with torch.no_grad():
        for _ in range(50):
            mlir(q, k, v)
        before = proc.memory_info().rss
        for _ in range(1000):
            mlir(q, k, v)
        grown = proc.memory_info().rss - before
    # a leak of the (B·H, N, N) scores or the (B·H, M, D) states would be ≥ 64 KB a call
    assert grown < 8 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB over 1000 calls"


def test_emit_linalg(capsys):
    assert main(["emit", str(EXAMPLES / "positions.attn"), "--stage", "linalg", "--heads", "2",
                 "--head-dim", "8"]) == 0
    out = capsys.readouterr().out
    blocks = out.split("// block ")[1:]
    assert [b.split("\n")[0] for b in blocks] == [b.name for b in parse((EXAMPLES / "positions.attn").read_text()).blocks]
    with ir.Context():
        for b in blocks:
            module = ir.Module.parse(b.split("\n", 1)[1])
            assert "attn." not in str(module) and f"@run_{b.split(chr(10))[0]}" in str(module)


def test_explain_names_the_backend():
    mlir, _ = modules("performer_rpe")
    text = mlir.explain()
    assert "target mlir-cpu" in text and "dense Toeplitz product" in text
