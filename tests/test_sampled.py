"""Sampled softmax attention (kde, uniform): the TVM kernels against a torch formula of the same
estimator for the same draws (forward and backward), exactness when the block covers the sequence,
unbiasedness over seeds, error shrinking with the samples, reproducibility, and the planner."""
from __future__ import annotations

import math

import pytest
import torch

import attndsl
from attndsl import ops, sampling
from attndsl.ast import Choice

from conftest import shared

KDE = "attention s {{ sampling = kde(buckets=8, block={block}, samples={samples}, seed=1) }}"
UNIFORM = "attention s {{ sampling = uniform(samples={samples}, seed=1){mask} }}"
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
def compiled(text: str, dk: int = 16, dv: int = 8) -> attndsl.Attention:
    return shared(text, heads=2, head_dim=dk, value_dim=dv)


SPECS = {
    "kde": (KDE.format(block=24, samples=40), False),
    "kde_no_samples": (KDE.format(block=16, samples=0), False),
    "kde_columns": ("attention s { sampling = kde(buckets=8, block=24, samples=40, seed=1, residual=columns) }",
                    False),
    "uniform": (UNIFORM.format(samples=50, mask=""), False),
    "uniform_causal": (UNIFORM.format(samples=50, mask="; mask = causal"), True),
}


def rows(x, idx):
    return x.gather(1, idx.long()[..., None].expand(-1, -1, x.shape[-1]))


def estimate(q, k, v, s: sampling.Samples, scale: float, causal: bool) -> torch.Tensor:
    """The estimator of lowering/cpu/sampled.py in plain torch: in bucket order, softmax over the visible
    block keys and the visible samples (scores + log-weights); returned in the caller's order."""
    N = q.shape[1]
    qs, ks, vs = rows(q, s.pq), rows(k, s.pk), rows(v, s.pk)
    g = torch.arange(N) // s.block
    block = scale * qs @ ks.transpose(1, 2)
    seen = g[:, None] == g[None, :]
    if causal:
        seen &= torch.arange(N)[None, :] <= torch.arange(N)[:, None]
    samp = scale * qs @ rows(k, s.si).transpose(1, 2) + s.lw[:, None, :]
    sseen = (s.sb[:, None, :] < g[None, :, None]) if causal else (s.sb[:, None, :] != g[None, :, None])
    scores = torch.cat([block.masked_fill(~seen, -math.inf), samp.masked_fill(~sseen, -math.inf)], -1)
    out = torch.softmax(scores, -1) @ torch.cat([vs, rows(v, s.si)], 1)
    return rows(out, torch.argsort(s.pq.long(), dim=-1))


def qkv(N, dtype=torch.float64, dk=16, dv=8, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(1, 2, N, d, generator=g, dtype=dtype) for d in (dk, dk, dv)]
    return [x.requires_grad_(grad) for x in t]


def kernels_and_estimator(attn, N, dtype, causal):
    """([out, dq, dk, dv] of the kernels, the same of `estimate` for the draws of the call), for
    random q, k, v (1, 2, N, ·) and a random output gradient."""
    q, k, v = qkv(N, dtype, grad=True)
    dout = torch.randn(1, 2, N, 8, dtype=dtype)
    out = attn(q, k, v)
    r = [x.reshape(2, N, -1) for x in (q, k, v)]
    s = sampling.draw(*r, attn.planned.root.sampling, attn.lsh_planes, attn.sampling_seed)
    want = estimate(*r, s, attn.scale, causal).reshape(1, 2, N, 8)
    return ([out, *torch.autograd.grad(out, (q, k, v), dout)],
            [want, *torch.autograd.grad(want, (q, k, v), dout)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("N", [1, 7, 33, 100, 129])
def test_kernels_compute_the_estimator(name, N, dtype):
    text, causal = SPECS[name]
    (out, *grads), (want, *want_grads) = kernels_and_estimator(compiled(text), N, dtype, causal)
    scale = want.abs().max().item() + 1e-30
    assert (out - want).abs().max().item() <= TOL[dtype] * scale
    for got, exp in zip(grads, want_grads):
        assert (got - exp).abs().max().item() <= TOL[dtype] * (exp.abs().max().item() + 1)


@pytest.mark.parametrize("name", list(SPECS))
def test_gradcheck(name):
    attn = compiled(SPECS[name][0])
    assert torch.autograd.gradcheck(attn, tuple(qkv(11, grad=True)))


@pytest.mark.parametrize("N", [5, 64, 200])
def test_kde_is_exact_when_the_block_covers_the_sequence(N):
    attn = compiled(KDE.format(block=256, samples=32))
    q, k, v = qkv(N, grad=True)
    out, ref = attn(q, k, v), attn.reference(q, k, v)
    assert (out - ref).abs().max().item() < 1e-12
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        assert (a - b).abs().max().item() < 1e-12


def sums(attn, q, k, v, choice, seed, blind=False):
    """The estimated numerator and normalizer, e^LSE·out and e^LSE, in the caller's row order.
    `blind`: forget which block holds each sample (a biased estimator, to show the test's power)."""
    s = sampling.draw(q, k, v, choice, attn.lsh_planes, seed)
    sb = torch.full_like(s.sb, -5) if blind else s.sb
    out, lse = ops.sampled_attention(q, k, v, s.pq, s.pk, s.si, s.lw, sb, attn._library("float64"),
                                     "sampled_attention3", s.block)
    return out * lse.exp()[..., None], lse.exp()


def largest_z(attn, q, k, v, want, blind=False, draws=2000):
    """max over entries of |mean − exact| / standard error, over `draws` seeds."""
    runs = [sums(attn, q, k, v, attn.planned.root.sampling, seed, blind) for seed in range(draws)]
    z = []
    for i, w in enumerate(want):
        x = torch.stack([r[i] for r in runs])
        z.append(((x.mean(0) - w) / (x.std(0) / math.sqrt(draws))).abs().max().item())
    return max(z)


@pytest.mark.parametrize("name", ["kde", "kde_columns", "uniform"])
def test_the_estimates_of_numerator_and_normalizer_are_unbiased(name):
    attn = compiled(SPECS[name][0])
    q, k, v = (x.reshape(2, 60, -1) * 0.5 for x in qkv(60))
    exact = torch.exp(attn.scale * q @ k.transpose(1, 2))
    want = (exact @ v, exact.sum(-1))
    # ~1000 entries, t with 1999 dof: P(any |z| > 5.5) < 1e-4 for an unbiased estimator
    assert largest_z(attn, q, k, v, want) < 5.5
    assert largest_z(attn, q, k, v, want, blind=True) > 5.5      # double-counted block keys: caught


@pytest.mark.parametrize("residual", ["values", "columns"])
def test_error_shrinks_as_samples_grow(residual):
    attn = compiled(SPECS["kde"][0])
    q, k, v = (x.reshape(2, 256, -1) for x in qkv(256))
    exact = torch.softmax(attn.scale * q @ k.transpose(1, 2), -1) @ v
    errors = []
    for samples in (8, 64, 512):
        choice = Choice("kde", (("buckets", 8), ("block", 24), ("samples", samples), ("seed", 1),
                                ("residual", residual)))
        errs = []
        for seed in range(8):
            num, den = sums(attn, q, k, v, choice, seed)
            errs.append(((num / den[..., None] - exact).norm() / exact.norm()).item())
        errors.append(sum(errs) / len(errs))
    assert errors[0] > 1.5 * errors[1] > 2.25 * errors[2], errors


def test_seeded_and_reproducible():
    attn = compiled(SPECS["kde"][0])
    q, k, v = qkv(100)
    first = attn(q, k, v)
    assert torch.equal(first, attn(q, k, v))
    attn.sampling_seed = 2
    try:
        assert not torch.equal(first, attn(q, k, v))
    finally:
        attn.sampling_seed = 1
    assert torch.equal(first, attn(q, k, v))


def test_gray_order_changes_one_bit_between_neighbours():
    codes = torch.arange(64)
    order = torch.argsort(sampling.gray_rank(codes, 6))
    flips = (order[1:] ^ order[:-1])
    assert all(bin(int(f)).count("1") == 1 for f in flips)
    assert torch.equal(sampling.gray_rank(codes ^ (codes >> 1), 6), codes)


def test_lsh_sorts_similar_rows_together():
    planes = sampling.hyperplanes(16, 16, seed=0)
    base = torch.randn(4, 1, 16)
    x = (base + 0.01 * torch.randn(4, 8, 16)).reshape(1, 32, 16)      # 4 tight clusters
    order = sampling.bucket_order(x, planes)[0]
    runs = (order // 8)[1:] != (order // 8)[:-1]
    assert runs.sum().item() == 3                                      # each cluster contiguous


def test_planner_and_explain():
    attn = compiled(SPECS["kde"][0])
    assert [d.form for d in attn.planned.decisions] == ["kde"]
    assert "form kde, causal=False" in attn.explain()
    with pytest.raises(attndsl.SpecError, match="does not apply"):
        attndsl.compile(SPECS["kde"][0], heads=2, head_dim=16, plan="quadratic")


def test_opcheck_and_bfloat16():
    attn = compiled(SPECS["uniform_causal"][0])
    q, k, v = (x.reshape(2, 40, -1).float() for x in qkv(40))
    s = sampling.draw(q, k, v, attn.planned.root.sampling, attn.lsh_planes, 1)
    torch.library.opcheck(ops.sampled_attention,
                          (q, k, v, *s.args(), attn._library("float32"), "sampled_attention3", s.block))
    out = attn(*(x.bfloat16() for x in qkv(40)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_cli_run_reports_an_estimate(tmp_path, capsys):
    from attndsl.cli import main
    path = tmp_path / "s.attn"
    path.write_text("attention s { sampling = uniform(samples=16) }\n")
    assert main(["run", str(path), "--seq", "64", "--heads", "2", "--head-dim", "16"]) == 0
    assert "estimate" in capsys.readouterr().out


@pytest.mark.parametrize("tile", [2, 8])
@pytest.mark.parametrize("name", ["kde", "uniform_causal"])
def test_every_tile_knob_choice_computes_the_estimator(name, tile, tmp_path, monkeypatch):
    """A tuning record that makes `tile` the best (the quadratic family's knob, shared with the
    exact softmax kernels): compile() builds it, explain() names it, and forward and backward still
    compute the estimator (N = 100: tiles of 16..128 rows leave a ragged tail)."""
    from attndsl import lowering, pipeline
    from attndsl.schedules import knobs
    from test_tune import _record
    monkeypatch.setenv("ATTNDSL_TUNING_DB", str(tmp_path))
    text, causal = SPECS[name]
    root = pipeline.run(attndsl.parse(text).block(None), 16, 8).root
    kernels = lowering.tunable(root)
    assert set(kernels.values()) == {"quadratic"} and len(kernels) == 2
    for kernel in kernels:
        _record(tmp_path, root, kernel, "quadratic", {knobs.label(knobs.defaults("quadratic")): 2e-3,
                                                      f"tile={tile}": 1e-3})
    attn = attndsl.compile(text, heads=2, head_dim=16, value_dim=8)
    assert all(f"{k} tile={tile}  (2.00x the defaults" in attn.explain() for k in kernels)
    mine, want = kernels_and_estimator(attn, 100, torch.float64, causal)
    torch.testing.assert_close(mine[0], want[0], rtol=1e-10, atol=1e-12)
    for got, exp in zip(mine[1:], want[1:]):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-11)
