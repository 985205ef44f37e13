"""Sampled softmax attention (kde, uniform): the TVM kernels against a torch formula of the same
estimator for the same draws (forward and backward), exactness when the block or the heavy keys
cover the sequence, unbiasedness (or the documented bias of tail=mean) over seeds, error shrinking
with the samples, an error below 1 where importance sampling's is not, reproducibility, and the
planner."""
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


KDE_WITH = "attention s {{ sampling = kde(buckets=8, block=24, samples=40, seed=1, {}) }}"
SPECS = {
    "kde": (KDE.format(block=24, samples=40), False),          # columns, tail=mean, 20 heavy keys
    "kde_no_samples": (KDE.format(block=16, samples=0), False),
    "kde_sampled": (KDE_WITH.format("heavy=0, tail=sampled, residual=values"), False),    # the paper's
    "kde_heavy_sampled": (KDE_WITH.format("tail=sampled"), False),
    "kde_mean_values": (KDE_WITH.format("heavy=8, residual=values"), False),
    "uniform": (UNIFORM.format(samples=50, mask=""), False),
    "uniform_causal": (UNIFORM.format(samples=50, mask="; mask = causal"), True),
}


def estimate(q, k, v, s: sampling.Samples, scale: float, causal: bool) -> torch.Tensor:
    """The estimator of lowering/cpu/sampled.py in plain torch: in bucket order, softmax over the visible
    block keys and the visible samples (scores + log-weights); returned in the caller's order."""
    N = q.shape[1]
    qs, ks, vs = sampling.rows_of(q, s.pq), sampling.rows_of(k, s.pk), sampling.rows_of(v, s.pk)
    g = torch.arange(N) // s.block
    block = scale * qs @ ks.transpose(1, 2)
    seen = g[:, None] == g[None, :]
    if causal:
        seen &= torch.arange(N)[None, :] <= torch.arange(N)[:, None]
    samp = scale * qs @ sampling.rows_of(k, s.si).transpose(1, 2) + s.lw[:, None, :]
    sseen = (s.sb[:, None, :] < g[None, :, None]) if causal else (s.sb[:, None, :] != g[None, :, None])
    scores = torch.cat([block.masked_fill(~seen, -math.inf), samp.masked_fill(~sseen, -math.inf)], -1)
    out = torch.softmax(scores, -1) @ torch.cat([vs, s.vs], 1)
    return sampling.rows_of(out, torch.argsort(s.pq.long(), dim=-1))


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
    `blind`: forget which block holds each sample (double-counted keys, to show the test's power)."""
    s = sampling.draw(q, k, v, choice, attn.lsh_planes, seed)
    sb = torch.full_like(s.sb, -5) if blind else s.sb
    out, lse = ops.sampled_attention(q, k, v, s.pq, s.pk, s.si, s.lw, sb, s.vs, q.new_zeros(q.shape[:2]),
                                     attn._library("float64"), "sampled_attention3", s.block)
    return out * lse.exp()[..., None], lse.exp()


def largest_z(attn, q, k, v, want, blind=False, draws=2000):
    """max over entries of |mean − exact| / standard error, over `draws` seeds."""
    runs = [sums(attn, q, k, v, attn.planned.root.sampling, seed, blind) for seed in range(draws)]
    z = []
    for i, w in enumerate(want):
        x = torch.stack([r[i] for r in runs])
        z.append(((x.mean(0) - w) / (x.std(0) / math.sqrt(draws))).abs().max().item())
    return max(z)


@pytest.mark.parametrize("name", ["kde_sampled", "kde_heavy_sampled", "uniform"])
def test_the_estimates_of_numerator_and_normalizer_are_unbiased(name):
    attn = compiled(SPECS[name][0])
    q, k, v = (x.reshape(2, 60, -1) * 0.5 for x in qkv(60))
    exact = torch.exp(attn.scale * q @ k.transpose(1, 2))
    want = (exact @ v, exact.sum(-1))
    # ~1000 entries, t with 1999 dof: P(any |z| > 5.5) < 1e-4 for an unbiased estimator
    assert largest_z(attn, q, k, v, want) < 5.5
    assert largest_z(attn, q, k, v, want, blind=True) > 5.5      # double-counted block keys: caught


def test_the_mean_tail_has_its_documented_bias():
    """tail=mean: E[normalizer] = Σ_j e^{s·q·k_j} (unbiased); E[numerator] = Σ_{j exact} e^{s·q·k_j} v_j
    + (the tail's mass)·v̄, v̄ the mean of the non-heavy values (residual=values: the heavy keys and
    the blocks are the same for every seed)."""
    attn = compiled(SPECS["kde_mean_values"][0])
    q, k, v = (x.reshape(2, 60, -1) * 0.5 for x in qkv(60))
    s = sampling.draw(q, k, v, attn.planned.root.sampling, attn.lsh_planes, 0)
    g = lambda order: torch.argsort(order.long(), dim=-1) // s.block       # each row's block
    exact_keys = g(s.pq)[:, :, None] == g(s.pk)[:, None, :]
    heavy = torch.zeros(2, 60, dtype=torch.bool).scatter_(1, s.si[:, :8].long(), True)
    exact_keys |= heavy[:, None, :]
    vbar = v[~heavy].reshape(2, 52, -1).mean(1, keepdim=True)
    e = torch.exp(attn.scale * q @ k.transpose(1, 2))
    want = ((e * exact_keys) @ v + (e * ~exact_keys).sum(-1, keepdim=True) * vbar, e.sum(-1))
    assert largest_z(attn, q, k, v, want) < 5.5
    unbiased = (e @ v, e.sum(-1))                   # the numerator is biased: the test can tell
    assert largest_z(attn, q, k, v, unbiased) > 5.5


def test_heavy_keys_are_exact():
    attn = compiled("attention s { sampling = kde(buckets=8, block=1, samples=64, heavy=64, seed=1) }")
    q, k, v = qkv(64, grad=True)
    out, ref = attn(q, k, v), attn.reference(q, k, v)
    assert (out - ref).abs().max().item() < 1e-12
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        assert (a - b).abs().max().item() < 1e-12


def test_the_mean_tail_stays_below_zeros_error_where_importance_sampling_does_not():
    """Flat attention (i.i.d. Gaussian q, k, v, N = 2048, budget 32 keys a query): the exact output
    is small, sampled values are not; a convex combination with the mean value stays close."""
    q, k, v = qkv(2048, dtype=torch.float32, dk=32, dv=32)
    exact = torch.softmax(q @ k.transpose(-1, -2) / 32 ** 0.5, -1) @ v
    errors = {}
    for tail in ("mean", "sampled"):
        attn = shared(f"attention s {{ sampling = kde(buckets=8, block=16, samples=16, tail={tail}) }}",
                      heads=2, head_dim=32)
        with torch.no_grad():
            errors[tail] = ((attn(q, k, v) - exact).norm() / exact.norm()).item()
    assert errors["mean"] < 0.9 and errors["sampled"] > 2, errors


@pytest.mark.parametrize("residual", ["values", "columns"])
def test_error_shrinks_as_samples_grow(residual):
    """Importance sampling (tail=sampled) is consistent: its error shrinks like 1/√samples."""
    attn = compiled(SPECS["kde"][0])
    q, k, v = (x.reshape(2, 256, -1) for x in qkv(256))
    exact = torch.softmax(attn.scale * q @ k.transpose(1, 2), -1) @ v
    errors = []
    for samples in (8, 64, 512):
        choice = Choice("kde", (("buckets", 8), ("block", 24), ("samples", samples), ("seed", 1),
                                ("heavy", 0), ("tail", "sampled"), ("residual", residual)))
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
    """8 tight clusters, rows interleaved (row i in cluster i % 8), 2 buckets: the finer hash orders
    each bucket, so every cluster is one run; by bucket alone they stay interleaved."""
    planes = sampling.hyperplanes(2, 16, seed=0)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 8, 16, generator=g)
    x = (base + 1e-3 * torch.randn(8, 8, 16, generator=g)).reshape(1, 64, 16)
    runs = lambda order: ((order % 8)[1:] != (order % 8)[:-1]).sum().item()
    assert runs(sampling.bucket_order(x, planes, 1)[0]) == 7           # each cluster contiguous
    assert runs(sampling.bucket_order(x, planes[:, :1], 1)[0]) > 7


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
                          (q, k, v, *s.args(), q.new_zeros(q.shape[:2]), attn._library("float32"),
                           "sampled_attention3", s.block))
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


def test_the_mean_tail_sums_large_values_without_overflow():
    """8192 values near 5e34 of one sign sum past float32's range (v̄ is summed in float64); the
    kernels only ever add block + samples of them."""
    attn = shared("attention s { sampling = kde(buckets=8, block=16, samples=32) }", heads=1, head_dim=8)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 8192, 8, generator=g) for _ in range(2))
    v = 5e34 * (1 + 0.1 * torch.randn(1, 1, 8192, 8, generator=g))
    with torch.no_grad():
        out = attn(q, k, v)
    ref = attn.reference(q.double(), k.double(), v.double())
    assert torch.isfinite(out).all() and ((out.double() - ref).norm() / ref.norm()).item() < 0.01
