"""Learnable scalars (`param a = 1.0`, `param c[heads] = 0.5`) in position(r) = EXPR: every form that
reads the tabulated term, and the decayed form of learned rates; in kernel(x) = EXPR: the feature-map
kernels that take their values. Against the reference, forward and backward (the params' gradients
included), gradchecks, training and state_dict, and the spec errors."""
from __future__ import annotations

import pytest
import torch
from conftest import RTOL, assert_close, assert_masked_matches_reference, shared_form

import attndsl
from attndsl.reference import alibi_slopes

pytestmark = pytest.mark.xdist_group("params")

KERPLE = "param a = 1.0; param c[heads] = 0.5; kernel = elu1; position(r) = -c * log(1 + a * abs(r))"
ALIBI = "param s[heads] = 0.1; position(r) = -s * abs(r); mask = causal"
DECAY = "param s[heads] = 0.1; kernel = elu1; position(r) = -s * abs(r); mask = causal"
# name -> (spec body, plan, the forms it runs)
SPECS = {
    "pairwise": (KERPLE, "pairwise", ["pairwise"]),
    "toeplitz_fft": (KERPLE, "toeplitz_fft", ["toeplitz_fft"]),
    "quadratic": (ALIBI, "auto", ["quadratic"]),
    "quadratic_window": ("param s[heads] = 0.1; param t = 0.3; position(r) = -s * abs(r) + t * cos(r); "
                         "mask = window(9)", "auto", ["quadratic"]),
    "banded_window": ("param s[heads] = 0.1; kernel = elu1; position(r) = -s * abs(r); mask = causal_window(9)",
                      "auto", ["banded"]),
    "decayed": (DECAY, "decayed", ["decayed"]),
    "decayed_favor": ("param s = 0.5; kernel = favor(features=8); position(r) = -exp(s) * abs(r) / 2 + 1; "
                      "mask = causal", "decayed", ["decayed"]),
    # kernel maps reading params: their own kernels (never fused into the linear ones)
    "map_prefix_sum": ("param a = 1.5; param c[heads] = 0.2; kernel(x) = elu(a * x) + 1 + c * x * x; "
                       "mask = causal", "auto", ["prefix_sum"]),
    "map_linear": ("param a[heads] = 0.7; kernel(x) = softplus(a * x) + 0.1", "auto", ["linear"]),
    "map_pairwise": ("param a = 0.8; param c[heads] = 0.5; kernel(x) = elu(a * x) + 1; "
                     "position(r) = -c * log(1 + abs(r))", "pairwise", ["pairwise"]),
}
B, H, N, D = 2, 2, 70, 8


def moved(attn):
    """The params away from their initial values (distinct per head)."""
    with torch.no_grad():
        for p in attn.spec_params.values():
            p.mul_(1.3).add_(0.05 * torch.arange(p.numel()).reshape(p.shape))


def module(name, target="llvm"):
    body, plan, forms = SPECS[name]
    return shared_form(("attention a { " + body + " }", plan, forms), heads=H, head_dim=D, init=moved,
                       target=target)


# float32 beside float64 where the table is read by a kernel a window changes or by softmax's;
# pairwise and toeplitz_fft read a tabulated term as any learned table (tests/test_position.py)
CASES = [(name, dtype) for name in SPECS for dtype in (torch.float32, torch.float64)
         if dtype == torch.float64 or name not in ("pairwise", "toeplitz_fft")]


@pytest.mark.parametrize("name, dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
def test_every_form_learns_the_params(name, dtype):
    assert_learns(module(name), dtype)


def test_learned_rates_on_the_portable_kernels():
    assert_learns(module("decayed", attndsl.Target("llvm", kernels="portable")), torch.float64)


def assert_learns(attn, dtype, mask=None):
    """attn against its reference in `dtype` (with the key padding mask `mask`): forward, dq, dk,
    dv and every param's gradient."""
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    ref = attn.reference(q64, k64, v64, key_padding_mask=mask)
    qc, kc, vc = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out = attn(qc, kc, vc, key_padding_mask=mask)
    assert_close("out", ref, out, RTOL[dtype])
    g = torch.randn_like(ref)
    params = list(attn.spec_params.values())
    want = torch.autograd.grad(ref, [q64, k64, v64, *params], g)
    got = torch.autograd.grad(out, [qc, kc, vc, *params], g.to(dtype))
    for what, a, b in zip(["dq", "dk", "dv", *attn.spec_params], want, got):
        assert torch.isfinite(b).all() and b.abs().sum() > 0, what
        assert_close(what, a, b, 20 * RTOL[dtype])


@pytest.mark.parametrize("name", ["pairwise", "quadratic", "banded_window", "decayed", "map_prefix_sum",
                                  "map_pairwise"])
def test_gradcheck(name):
    attn = module(name)
    q, k, v = (torch.randn(1, H, 11, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    names = list(attn.spec_params)
    values = [attn.spec_params[n].detach().double().clone().requires_grad_() for n in names]

    def f(q, k, v, *ps):
        return torch.func.functional_call(attn, {f"spec_params.{n}": p for n, p in zip(names, ps)}, (q, k, v))
    assert torch.autograd.gradcheck(f, (q, k, v, *values), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_learned_rates_run_the_decayed_form_with_a_padding_mask_and_decoding():
    attn = module("decayed")
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1, N - 20:] = True
    mask[0, 5:9] = True
    assert_masked_matches_reference(attn, q, k, v, mask, torch.float32)
    with torch.no_grad():
        full = attn(q, k, v)
        state, steps = attn.initial_state(B, dtype=torch.float64), []
        for t in range(N):
            out, state = attn.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
            steps.append(out)
    assert_close("decoded", full, torch.cat(steps, 2), 1e-12)
    # steep slopes: rows past b1's last kept key lie e^−40 from it, computed from the state there
    steep = attndsl.compile("attention a { " + DECAY + " }", heads=H, head_dim=D, plan="decayed", dtype=None)
    with torch.no_grad():
        steep.spec_params["s"].copy_(torch.tensor([1.0, 0.8]))
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1, 30:] = True
    assert_learns(steep, torch.float32, mask)


def test_learned_rates_turning_negative_leave_the_decayed_form():
    auto = attndsl.compile("attention a { " + DECAY + " }", heads=H, head_dim=D)
    assert "decayed" in auto.explain(n=4096)
    assert not any("decayed" in p.forms for p in attndsl.compile(
        "attention a { " + DECAY.replace("; mask = causal", "") + " }", heads=H, head_dim=D).plans)
    q, k, v = (torch.randn(1, H, 300, D, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        auto.spec_params["s"].copy_(torch.tensor([0.2, -0.01]))   # head 1's weights grow with distance
        with pytest.warns(UserWarning, match="grow with distance"):
            out = auto(q, k, v)
        assert_close("out", auto.reference(q, k, v), out, 1e-12)
        with pytest.raises(ValueError, match="grow with distance"):
            auto.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], auto.initial_state(1, dtype=torch.float64))
        forced = attndsl.compile("attention a { " + DECAY + " }", heads=H, head_dim=D, plan="decayed", dtype=None)
        forced.spec_params["s"].copy_(torch.tensor([0.2, -0.01]))
        with pytest.raises(ValueError, match="keep the rate positive"):
            forced(q, k, v)


def test_a_training_step_moves_the_params_and_the_state_dict_keeps_them():
    attn = attndsl.compile("attention a { " + ALIBI + " }", heads=H, head_dim=D)
    assert set(dict(attn.named_parameters())) == {"spec_params.s"} and attn.spec_params["s"].shape == (H,)
    with torch.no_grad():                                   # ALiBi's slopes as the starting point
        attn.spec_params["s"].copy_(alibi_slopes(H))
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    before = attn(q, k, v).detach()
    opt = torch.optim.SGD(attn.parameters(), lr=0.5)
    attn(q, k, v).square().mean().backward()
    opt.step()
    assert not torch.equal(attn.spec_params["s"].detach(), alibi_slopes(H).float())
    after = attn(q, k, v).detach()
    assert not torch.allclose(before, after)
    fresh = attndsl.compile("attention a { " + ALIBI + " }", heads=H, head_dim=D)
    fresh.load_state_dict(attn.state_dict())
    torch.testing.assert_close(fresh(q, k, v), after)


def test_explain_and_the_mlir_target():
    attn = module("toeplitz_fft")
    assert "tabulated" in attn.explain()
    with pytest.raises(attndsl.SpecError, match="takes no param"):
        attndsl.compile("attention a { " + ALIBI + " }", heads=H, head_dim=D, target="mlir-cpu")


def test_check_finite_checks_the_params():
    attn = attndsl.compile("attention a { " + ALIBI + " }", heads=H, head_dim=D, check_finite=True, dtype=None)
    with torch.no_grad():
        attn.spec_params["s"][1] = float("nan")
    with pytest.raises(ValueError, match="param s contains NaN"):
        attn(*(torch.randn(1, H, 5, D) for _ in range(3)))


@pytest.mark.parametrize("body, message", [
    ("param a = 1; kernel(x) = b * x", "unknown variable 'b' in a kernel map"),
    ("param a = 1; position(r) = -b * abs(r)", "unknown variable 'b' in a position map"),
    ("param a = 1", "param 'a' is declared but not used"),
    ("param a = 1; position = alibi", "param 'a' is declared but not used"),
    ("param a[tokens] = 1; position(r) = a * r", r"unknown param shape '\[tokens\]'"),
    ("param exp = 1; position(r) = r", "a param cannot be named 'exp'"),
    ("param r = 1; position(r) = r", "a param cannot be named 'r'"),
    ("param a = 1; param a = 2; position(r) = a * r", "duplicate param 'a'"),
    ("param a = x; position(r) = a * r", "param 'a' must be a number"),
    ("param a = 0; position(r) = log(a * abs(r))", "position.r. is not finite at r = 0"),
])
def test_spec_errors(body, message):
    with pytest.raises(attndsl.SpecError, match=message):
        attndsl.parse("attention a { " + body + " }")


def test_the_error_points_at_the_param():
    with pytest.raises(attndsl.SpecError) as e:
        attndsl.parse("attention a {\n    param width[tokens] = 1\n    position(r) = width * r\n}", "m.attn")
    text = str(e.value)
    assert "m.attn:2:16" in text and "^^^^^^^^" in text


def test_kernel_maps_with_params_run_their_own_kernels_under_a_mask_and_grouped_heads(monkeypatch):
    """A map reading params runs the param_map kernels, not fused into the linear ones; a padded
    key's NaN reaches no param's gradient; grouped heads (one kv head) read each query head's
    params."""
    from attndsl import ops
    attn = module("map_prefix_sum")
    assert "phi=" not in attn.explain(n=256) and "feature_map" in attn.explain(n=256)
    calls, real = [], ops.fast.param_map
    monkeypatch.setattr(ops.fast, "param_map", lambda *a: (calls.append(a[1].shape), real(*a))[1])
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1, N - 20:] = True
    assert_learns(attn, torch.float32, mask)
    assert calls == [(H, 2), (H, 2)]                 # q's map and k's, their (H, P) values
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    clean = attn(q, k, v, key_padding_mask=mask)
    k[1, :, N - 5] = float("nan")
    qc = q.clone().requires_grad_()
    out = attn(qc, k, v, key_padding_mask=mask)
    assert torch.equal(out, clean)
    out.sum().backward()
    assert torch.isfinite(qc.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in attn.spec_params.values())
    attn.zero_grad()
    q1, k1, v1 = (t.double() for t in (q, k[:, :1].nan_to_num(), v[:, :1]))
    assert_close("grouped", attn.reference(q1, k1, v1), attn(q1.float(), k1.float(), v1.float()),
                 RTOL[torch.float32])


@pytest.mark.parametrize("target, message", [
    ("portable", "CPU kernels only"), ("mlir-cpu", "takes no param")])
def test_kernel_maps_with_params_need_the_cpu_kernels(target, message):
    body = "attention a { param a = 1.5; kernel(x) = elu(a * x) + 1 }"
    where = attndsl.Target("llvm", kernels="portable") if target == "portable" else target
    with pytest.raises(attndsl.SpecError, match=message):
        attndsl.compile(body, heads=H, head_dim=D, target=where)


def test_kernel_maps_with_params_do_not_decode_and_read_at_most_four():
    attn = module("map_prefix_sum")
    with pytest.raises(attndsl.SpecError, match="cannot be decoded token by token"):
        attn.initial_state(1)
    with pytest.raises(attndsl.SpecError, match="a kernel map reads at most 4 params; this one reads 5"):
        attndsl.parse("attention a { param a = 1; param b = 1; param c = 1; param d = 1; param e = 1; "
                      "kernel(x) = a * b * c * d * e * x * x }")


def test_a_map_reading_params_under_torch_compile_and_opcheck():
    from attndsl import ops
    attn = attndsl.compile("attention a { param a[heads] = 0.7; kernel(x) = elu(a * x) + 1; mask = causal }",
                           heads=H, head_dim=D)
    q, k, v = (torch.randn(1, H, 33, D) for _ in range(3))
    out = torch.compile(attn, fullgraph=True, dynamic=True)(q, k, v)
    assert_close("out", attn(q, k, v), out, 1e-6)
    out.sum().backward()
    traced = attn.spec_params["a"].grad.clone()
    attn.zero_grad()
    attn(q, k, v).sum().backward()
    assert_close("da", attn.spec_params["a"].grad, traced, 1e-6)
    x = torch.randn(2 * H, 9, D, dtype=torch.float64, requires_grad=True)
    prm = torch.rand(H, 1, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.param_map, (x, prm, attn._library("float64"), "feature_map1"))
