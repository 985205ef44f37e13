"""Re-run the probes that once found hangs and silent wrong answers; print one verdict each.

    python tools/probe_trust.py [--only NAME] [--timeout 180]

Every probe runs in its own process with a timeout (a hang is a verdict, not a stuck run) and
answers one of: right (within the dtype's tolerance of the float64 reference, NaN exactly where the
reference has it), refused (a clear error: its first line is shown), HANG, or WRONG. The compile
cache is a fresh temporary directory shared by the probes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PROBES: dict = {}


def probe(fn):
    PROBES[fn.__name__] = fn
    return fn


# --- helpers (run inside the probe's process) --------------------------------------------------------

def _qkv(n=64, d=16, b=1, h=2, dtype=None, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype or torch.float32) for _ in range(3)]


def _compare(attn, q, k, v, tol=1e-3):
    """'right' when out matches the float64 reference row by row (NaN where it has NaN), else WRONG."""
    import torch
    out = attn(q, k, v)
    ref = attn.reference(q.double(), k.double(), v.double())
    if not torch.equal(torch.isnan(out), torch.isnan(ref)):
        return f"WRONG: NaN in {int(torch.isnan(out).any(-1).sum())} rows, reference in {int(torch.isnan(ref).any(-1).sum())}"
    fin = torch.isfinite(ref).all(-1)
    o, r = out.double()[fin], ref[fin]
    err = ((o - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-300)).max().item() if o.numel() else 0.0
    return f"right (worst row {err:.1e})" if err <= tol else f"WRONG: worst row error {err:.3g}"


def _spec(body, **kw):
    import attndsl
    return attndsl.compile(f"attention p {{ {body} }}", **{"heads": 2, "head_dim": 16, **kw})


# --- hangs -----------------------------------------------------------------------------------------

@probe
def forked_dataloader():
    import torch
    from torch.utils.data import DataLoader
    attn = _spec("kernel = elu1; mask = causal")
    q, k, v = _qkv(300)
    attn(q, k, v)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            q, k, v = _qkv(300, seed=i)
            return torch.tensor(float(_compare(attn, q, k, v).startswith("right")))
    got = torch.cat(list(DataLoader(Rows(), batch_size=2, num_workers=2)))
    return "right (4 forked workers)" if got.all() else "WRONG in a worker"


@probe
def nested_exp_compiles():
    t = time.time()
    _spec("kernel(x) = exp(exp(exp(x)))")
    return f"right (compiled in {time.time() - t:.1f} s)"


@probe
def nested_sigmoid_compiles():
    t = time.time()
    _spec("kernel(x) = sigmoid(sigmoid(sigmoid(x)))")
    return f"right (compiled in {time.time() - t:.1f} s)"


@probe
def favor_16385_features():
    _spec("kernel = favor(features=16385)")
    return "WRONG: accepted"


# --- silent wrong answers ---------------------------------------------------------------------------

@probe
def fft_growing_bias_f32():
    return _compare(_spec("kernel = elu1; position(r) = -r"), *_qkv(512))


@probe
def fft_abs_bias_relu_causal_f32():
    return _compare(_spec("kernel = relu; position(r) = 0.05 * abs(r); mask = causal", plan="toeplitz_fft"),
                    *_qkv(512))


def _grown_table():
    """A full-range learned table grown to 0.02·|r|, on the Toeplitz-FFT form."""
    import torch
    attn = _spec("kernel = elu1; position = toeplitz(max_distance=512)", plan="toeplitz_fft")
    with torch.no_grad():
        attn.position_table.copy_(0.02 * (torch.arange(1025) - 512).abs().float().expand(2, -1))
    return attn


@probe
def fft_learned_table_grown_f32():
    return _compare(_grown_table(), *_qkv(512))


@probe
def fft_learned_table_grown_f64():
    import torch
    return _compare(_grown_table(), *_qkv(512, dtype=torch.float64), tol=1e-9)


def _nan_q(body):
    import torch
    attn = _spec(body)
    q, k, v = (t.requires_grad_() for t in _qkv())
    with torch.no_grad():
        q[0, 0, 5, 3] = float("nan")
    verdict = _compare(attn, q, k, v)
    attn(q, k, v).sum().backward()
    if not torch.isnan(q.grad[0, 0, 5]).any():
        return "WRONG: the NaN row's gradient is finite"
    return verdict


@probe
def nan_relu():
    return _nan_q("kernel = relu")


@probe
def nan_relu_user():
    return _nan_q("kernel(x) = relu(x)")


@probe
def nan_max_user():
    return _nan_q("kernel(x) = max(x, 0)")


def _nan_causal(body, where, i):
    attn = _spec(body)
    q, k, v = _qkv()
    where(q, k, v)[0, 0, i, 2] = float("nan")
    return _compare(attn, q, k, v)


@probe
def nan_v40_prefix_sum():
    return _nan_causal("kernel = elu1; mask = causal", lambda q, k, v: v, 40)


@probe
def nan_v40_quadratic():
    return _nan_causal("mask = causal", lambda q, k, v: v, 40)


@probe
def nan_v40_decayed():
    return _nan_causal("kernel = elu1; position = alibi; mask = causal", lambda q, k, v: v, 40)


@probe
def nan_k10_alibi_causal():
    return _nan_causal("kernel = elu1; position = alibi; mask = causal", lambda q, k, v: k, 10)


def _favor_keys(scale_at0=None, aligned_at=None):
    import torch
    from attndsl.featuremaps import random_projection
    attn = _spec("kernel = favor(features=16, seed=0); mask = causal", heads=1, head_dim=256)
    q, k, v = _qkv(64, 256, h=1)
    if scale_at0:
        k[0, 0, 0] *= scale_at0
    if aligned_at is not None:
        k[0, 0, aligned_at] = random_projection(16, 256, 0, True).float()[0] / 256 ** -0.25
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _compare(attn, q, k, v)


@probe
def favor_huge_later_key():
    return _favor_keys(aligned_at=40)


@probe
def favor_large_key_at_0():
    return _favor_keys(scale_at0=5)


@probe
def relu_vanishing_rows():
    attn = _spec("kernel = relu; mask = causal")
    q, k, v = _qkv()
    q[:, :, ::3] = -q[:, :, ::3].abs()
    return _compare(attn, q, k, v)


@probe
def relu_alibi_language_model():
    """A 2-layer causal LM, relu + alibi, 60 Adam steps on random tokens: the loss stays finite."""
    import torch
    from torch import nn
    torch.manual_seed(0)
    attns = [_spec("kernel = relu; position = alibi; mask = causal", heads=4, head_dim=16) for _ in range(2)]

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(50, 64), nn.Linear(64, 50)
            self.qkv = nn.ModuleList(nn.Linear(64, 192) for _ in attns)

        def forward(self, x):
            h = self.emb(x)
            for lin, attn in zip(self.qkv, attns):
                q, k, v = (t.reshape(x.shape[0], -1, 4, 16).transpose(1, 2) for t in lin(h).chunk(3, -1))
                h = h + attn(q, k, v).transpose(1, 2).reshape(h.shape)
            return self.out(h)
    lm = LM()
    opt = torch.optim.Adam(lm.parameters(), lr=3e-2)
    for step in range(60):
        x = torch.randint(0, 50, (8, 65))
        loss = nn.functional.cross_entropy(lm(x[:, :-1]).reshape(-1, 50), x[:, 1:].reshape(-1))
        if not torch.isfinite(loss):
            return f"WRONG: loss {loss.item()} at step {step}"
        opt.zero_grad()
        loss.backward()
        opt.step()
    return f"right (60 steps, final loss {loss.item():.2f})"


@probe
def from_torch_alibi_at_twice_the_length():
    import math
    import torch
    import attndsl
    slopes = torch.tensor([2 ** (-8 * (h + 1) / 4) for h in range(4)])

    def alibi(q, k, v):
        n = q.shape[2]
        r = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs().float()
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) - slopes[:, None, None] * r, -1) @ v
    attn = attndsl.from_torch(alibi, _qkv(128, h=4)).compile()
    q, k, v = _qkv(256, h=4)
    with torch.no_grad():
        err = ((attn(q, k, v) - alibi(q, k, v)).abs().max()).item()
    return f"right (max abs error {err:.1e} at N=256)" if err < 1e-4 else f"WRONG: {err:.3g}"


@probe
def from_torch_epsilon():
    import torch
    import torch.nn.functional as F
    import attndsl

    def linear(q, k, v):
        fq, fk = F.relu(q), F.relu(k)
        return (fq @ (fk.transpose(-1, -2) @ v)) / (fq @ fk.sum(-2, keepdim=True).transpose(-1, -2) + 1e-6)
    attn = attndsl.from_torch(linear, _qkv(32)).compile()
    q, k, v = _qkv(64)
    q[:, :, ::4] = -q[:, :, ::4].abs()
    with torch.no_grad():
        out, ref = attn(q, k, v), linear(q, k, v)
    ok = torch.isfinite(out).all() and torch.allclose(out, ref, atol=1e-5)
    return "right (eps imported)" if ok else "WRONG"


@probe
def banded_table_above_88_nats():
    import torch
    attn = _spec("kernel = elu1; position = toeplitz(max_distance=8); mask = causal", plan="banded")
    with torch.no_grad():
        attn.position_table.copy_(100 + torch.randn_like(attn.position_table))
    return _compare(attn, *_qkv(64))


# --- process boundaries, the cache -------------------------------------------------------------------

@probe
def torch_save_then_load_in_a_fresh_process():
    import torch
    attn = _spec("kernel = elu1; mask = causal")
    path = os.path.join(os.environ["ATTNDSL_CACHE_DIR"], "m.pt")
    torch.save(attn, path)
    code = (f"import torch; m = torch.load({path!r}, weights_only=False); "
            f"q = torch.randn(1, 2, 30, 16); print(float((m(q, q, q) - m.reference(q, q, q)).abs().max()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return f"right (error {float(out.stdout):.1e})" if out.returncode == 0 else "WRONG: " + out.stderr[-200:]


@probe
def cache_hit_after_a_comment():
    """The same spec with a comment above it, compiled in a fresh process: a cache hit (a build of
    this spec takes 5 s or more; a hit 0.1-0.2 s on a quiet machine)."""
    text = "attention p { kernel = elu1; mask = causal }"
    _spec("kernel = elu1; mask = causal")
    code = ("import time, attndsl; t = time.time(); "
            f"attndsl.compile({('# a comment' + chr(10) + chr(10) + text)!r}, heads=2, head_dim=16); "
            "print(time.time() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    took = float(out.stdout)
    return f"right (cache hit in {took:.2f} s)" if took < 3.0 else f"WRONG: recompiled ({took:.1f} s)"


@probe
def damaged_tuning_database():
    import warnings
    db = os.path.join(os.environ["ATTNDSL_CACHE_DIR"], "tuning")
    os.makedirs(db, exist_ok=True)
    with open(os.path.join(db, "database_tuning_record.json"), "w") as f:
        f.write("garbage line\n")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        attn = _spec("kernel = elu1; mask = causal", head_dim=32)
    named = any("database_tuning_record.json" in str(x.message) for x in w)
    return ("right (warned, compiled) " if named else "WRONG: not warned ") + _compare(attn, *_qkv(d=32))


# --- clear errors -------------------------------------------------------------------------------------

@probe
def empty_batch():
    import torch
    out = _spec("kernel = elu1")(*(torch.randn(0, 2, 8, 16) for _ in range(3)))
    return f"right (shape {tuple(out.shape)})"


@probe
def bnhd_layout():
    import torch
    _spec("kernel = elu1")(*(torch.randn(1, 8, 2, 16) for _ in range(3)))
    return "WRONG: accepted"


@probe
def position_not_finite():
    _spec("kernel = elu1; position(r) = log(cos(r / 100))")
    return "WRONG: accepted"


@probe
def samples_1e9():
    _spec("sampling = uniform(samples=1000000000)")
    return "WRONG: accepted"


@probe
def alibi_slope_1e300():
    _spec("kernel = elu1; position = alibi(slope=1e300)")
    return "WRONG: accepted"


@probe
def huge_head_dim():
    _spec("kernel = elu1", head_dim=10 ** 6)
    return "WRONG: accepted"


@probe
def cli_bad_arguments():
    out = subprocess.run([sys.executable, "-m", "attndsl.cli", "run", "examples/linear_elu.attn", "--heads", "-1"],
                         capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    if out.returncode == 2 and len(lines) == 1:
        return "refused: " + lines[0][:150]
    return f"WRONG: exit {out.returncode}, {len(lines)} lines"


# --- the driver --------------------------------------------------------------------------------------

def run_one(name: str) -> str:
    try:
        return PROBES[name]()
    except Exception as e:                       # a clear error is a verdict: refused
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"refused: {type(e).__name__}: {first[:160]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run one probe")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds before a probe counts as a hang")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child)))
        return 0
    names = [args.only] if args.only else list(PROBES)
    env = {**os.environ, "ATTNDSL_CACHE_DIR": os.environ.get("ATTNDSL_CACHE_DIR") or tempfile.mkdtemp(prefix="probe-")}
    counts: dict = {}
    for i, name in enumerate(names, 1):
        t = time.time()
        try:
            out = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True,
                                 env=env, timeout=args.timeout)
            verdict = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else (
                "WRONG: crashed: " + out.stderr.strip()[-200:])
        except subprocess.TimeoutExpired:
            verdict = f"HANG (> {args.timeout:.0f} s)"
        kind = verdict.split(" ")[0].rstrip(":")
        counts[kind] = counts.get(kind, 0) + 1
        print(f"[{i:2}/{len(names)}] {name:40} {time.time() - t:6.1f} s  {verdict}", flush=True)
    print("\n" + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return 0 if set(counts) <= {"right", "refused"} else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
