"""The TVM kernels as PyTorch operators (torch.library), with autograd and fake tensors.

Each op names its compiled library by key (see `register_library`) and its kernels by the IR
node they lower (`<op><index>`, + `_fwd`/`_bwd`). Tensors are (BH, N, width), contiguous.
"""
from __future__ import annotations

import torch
from torch import Tensor

_LIBRARIES: dict[str, object] = {}


def register_library(key: str, lib) -> None:
    from .lowering import fftlib
    fftlib.register()            # the Toeplitz kernels call back into the library FFT
    _LIBRARIES[key] = lib


def _kernel(lib: str, name: str):
    return _LIBRARIES[lib][name]


# --- φ(x) ------------------------------------------------------------------------------------------

@torch.library.custom_op("attndsl::feature_map", mutates_args=())
def feature_map(x: Tensor, w: Tensor, wt: Tensor, lib: str, node: str, width: int) -> Tensor:
    """φ(x): x (BH, N, Dk), w = W' (width, Dk), wt = W'ᵀ -> (BH, N, width)."""
    out = x.new_empty(x.shape[0], x.shape[1], width)
    _kernel(lib, node + "_fwd")(x, wt, out)
    return out


@feature_map.register_fake
def _(x, w, wt, lib, node, width):
    return x.new_empty(x.shape[0], x.shape[1], width)


@torch.library.custom_op("attndsl::feature_map_backward", mutates_args=())
def feature_map_backward(x: Tensor, w: Tensor, wt: Tensor, f: Tensor, df: Tensor, lib: str,
                         node: str) -> Tensor:
    """dx from dφ (BH, N, width)."""
    dx = torch.empty_like(x)
    _kernel(lib, node + "_bwd")(x, w, wt, f, df.contiguous(), dx)
    return dx


@feature_map_backward.register_fake
def _(x, w, wt, f, df, lib, node):
    return torch.empty_like(x)


def _feature_map_setup(ctx, inputs, output):
    x, w, wt, lib, node, _ = inputs
    ctx.save_for_backward(x, w, wt, output)
    ctx.lib, ctx.node = lib, node


def _feature_map_grad(ctx, df):
    x, w, wt, f = ctx.saved_tensors
    return feature_map_backward(x, w, wt, f, df, ctx.lib, ctx.node), None, None, None, None, None


feature_map.register_autograd(_feature_map_grad, setup_context=_feature_map_setup)


# --- linear attention: out_i = φq_i·Σ_{j∈M(i)} φk_j v_jᵀ / φq_i·Σ_{j∈M(i)} φk_j ------------------

@torch.library.custom_op("attndsl::linear_attention", mutates_args=())
def linear_attention(qf: Tensor, kf: Tensor, v: Tensor, lib: str, node: str,
                     tab: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out (BH, N, Dv), den (BH, N)) from φq, φk (BH, N, M) and v (BH, N, Dv). `tab` (H, 2): the
    per-head decay rates (a_earlier, a_later) of the decayed form, which weights each pair by
    e^(−a·|i−j|), a_earlier for j ≤ i and a_later for j > i (non-causal)."""
    out = torch.empty_like(v)
    den = v.new_empty(v.shape[0], v.shape[1])
    _kernel(lib, node + "_fwd")(qf, kf, v, _no_table(v) if tab is None else tab, out, den)
    return out, den


def _no_table(like: Tensor) -> Tensor:
    return like.new_zeros(1, 1)


@linear_attention.register_fake
def _(qf, kf, v, lib, node, tab=None):
    return torch.empty_like(v), v.new_empty(v.shape[0], v.shape[1])


@torch.library.custom_op("attndsl::linear_attention_backward", mutates_args=())
def linear_attention_backward(qf: Tensor, kf: Tensor, v: Tensor, out: Tensor, den: Tensor,
                              dout: Tensor, lib: str, node: str,
                              tab: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dφq, dφk, dv) from dout (the decay slopes get no gradient: they are not parameters)."""
    dqf, dkf, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(v)
    _kernel(lib, node + "_bwd")(qf, kf, v, _no_table(v) if tab is None else tab, out, den,
                                dout.contiguous(), dqf, dkf, dv)
    return dqf, dkf, dv


@linear_attention_backward.register_fake
def _(qf, kf, v, out, den, dout, lib, node, tab=None):
    return torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(v)


def _linear_setup(ctx, inputs, output):
    qf, kf, v, lib, node, tab = inputs
    ctx.save_for_backward(qf, kf, v, *output, tab)
    ctx.lib, ctx.node = lib, node


def _linear_grad(ctx, dout, dden):
    # den is an internal output (never returned to users), so its gradient is not propagated
    qf, kf, v, out, den, tab = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    grads = linear_attention_backward(qf, kf, v, out, den, dout, ctx.lib, ctx.node, tab)
    return (*grads, None, None, None)


linear_attention.register_autograd(_linear_grad, setup_context=_linear_setup)


# --- relative positions: Toeplitz-FFT (lowering/toeplitz.py) or banded (lowering/banded.py) ----------
# Both forms' kernels share one signature; the trailing FFT length is read by the FFT kernels only.

def _fft_len(n: int) -> int:
    from .lowering.costs import fft_length
    return fft_length(n)


@torch.library.custom_op("attndsl::toeplitz_attention", mutates_args=())
def toeplitz_attention(qf: Tensor, kf: Tensor, v: Tensor, tab: Tensor, lib: str,
                       node: str) -> tuple[Tensor, Tensor]:
    """(out (BH, N, Dv), den (BH, N)) of Σ_j c(i−j)(φq_i·φk_j) v_j / Σ_j c(i−j)(φq_i·φk_j), c = exp(b),
    b from the position parameters tab (H, P)."""
    out = torch.empty_like(v)
    den = v.new_empty(v.shape[0], v.shape[1])
    _kernel(lib, node + "_fwd")(qf, kf, v, tab, out, den, _fft_len(v.shape[1]))
    return out, den


@toeplitz_attention.register_fake
def _(qf, kf, v, tab, lib, node):
    return torch.empty_like(v), v.new_empty(v.shape[0], v.shape[1])


@torch.library.custom_op("attndsl::toeplitz_attention_backward", mutates_args=())
def toeplitz_attention_backward(qf: Tensor, kf: Tensor, v: Tensor, tab: Tensor, out: Tensor, den: Tensor,
                                dout: Tensor, lib: str, node: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dφq, dφk, dv, dtab) from dout; dtab is zero for positions without parameters."""
    dqf, dkf, dv, dtab = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(v), torch.zeros_like(tab)
    _kernel(lib, node + "_bwd")(qf, kf, v, tab, out, den, dout.contiguous(), dqf, dkf, dv, dtab,
                                _fft_len(v.shape[1]))
    return dqf, dkf, dv, dtab


@toeplitz_attention_backward.register_fake
def _(qf, kf, v, tab, out, den, dout, lib, node):
    return torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(v), torch.empty_like(tab)


def _toeplitz_setup(ctx, inputs, output):
    qf, kf, v, tab, lib, node = inputs
    ctx.save_for_backward(qf, kf, v, tab, *output)
    ctx.lib, ctx.node = lib, node


def _toeplitz_grad(ctx, dout, dden):
    qf, kf, v, tab, out, den = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    return (*toeplitz_attention_backward(qf, kf, v, tab, out, den, dout, ctx.lib, ctx.node), None, None)


toeplitz_attention.register_autograd(_toeplitz_grad, setup_context=_toeplitz_setup)


@torch.library.custom_op("attndsl::toeplitz_values", mutates_args=())
def toeplitz_values(v: Tensor, tab: Tensor, lib: str, node: str) -> Tensor:
    """Σ_j b(i−j) v_j (BH, N, Dv) (FastRPB), b from tab (H, P)."""
    y = torch.empty_like(v)
    _kernel(lib, node + "_fwd")(v, tab, y, _fft_len(v.shape[1]))
    return y


@toeplitz_values.register_fake
def _(v, tab, lib, node):
    return torch.empty_like(v)


@torch.library.custom_op("attndsl::toeplitz_values_backward", mutates_args=())
def toeplitz_values_backward(v: Tensor, tab: Tensor, dy: Tensor, lib: str, node: str) -> tuple[Tensor, Tensor]:
    """(dv, dtab) from dy."""
    dv, dtab = torch.empty_like(v), torch.zeros_like(tab)
    _kernel(lib, node + "_bwd")(v, tab, dy.contiguous(), dv, dtab, _fft_len(v.shape[1]))
    return dv, dtab


@toeplitz_values_backward.register_fake
def _(v, tab, dy, lib, node):
    return torch.empty_like(v), torch.empty_like(tab)


def _values_setup(ctx, inputs, output):
    v, tab, lib, node = inputs
    ctx.save_for_backward(v, tab)
    ctx.lib, ctx.node = lib, node


def _values_grad(ctx, dy):
    v, tab = ctx.saved_tensors
    return (*toeplitz_values_backward(v, tab, dy, ctx.lib, ctx.node), None, None)


toeplitz_values.register_autograd(_values_grad, setup_context=_values_setup)


# --- softmax, the quadratic form (lowering/quadratic.py) ---------------------------------------------

@torch.library.custom_op("attndsl::softmax_attention", mutates_args=())
def softmax_attention(q: Tensor, k: Tensor, v: Tensor, tab: Tensor, lib: str,
                      node: str) -> tuple[Tensor, Tensor]:
    """(out (BH, N, Dv), lse (BH, N)): softmax(s·q·kᵀ + b) v, flash-style, with b(i − j) from the
    position parameters tab (H, P) (a (1, 1) dummy without a position term); lse is the row
    log-sum-exp the backward recomputes the weights from."""
    out = v.new_empty(v.shape[0], v.shape[1], v.shape[2])
    lse = v.new_empty(v.shape[0], v.shape[1])
    _kernel(lib, node + "_fwd")(q, k, v, tab, out, lse)
    return out, lse


@softmax_attention.register_fake
def _(q, k, v, tab, lib, node):
    return v.new_empty(v.shape[0], v.shape[1], v.shape[2]), v.new_empty(v.shape[0], v.shape[1])


@torch.library.custom_op("attndsl::softmax_attention_backward", mutates_args=())
def softmax_attention_backward(q: Tensor, k: Tensor, v: Tensor, tab: Tensor, out: Tensor, lse: Tensor,
                               dout: Tensor, lib: str, node: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dtab) from dout; dtab is zero unless the position is a learned table."""
    dq, dk, dv, dtab = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.zeros_like(tab)
    _kernel(lib, node + "_bwd")(q, k, v, tab, out, lse, dout.contiguous(), dq, dk, dv, dtab)
    return dq, dk, dv, dtab


@softmax_attention_backward.register_fake
def _(q, k, v, tab, out, lse, dout, lib, node):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(tab)


def _softmax_setup(ctx, inputs, output):
    q, k, v, tab, lib, node = inputs
    ctx.save_for_backward(q, k, v, tab, *output)
    ctx.lib, ctx.node = lib, node


def _softmax_grad(ctx, dout, dlse):
    # lse is an internal output (never returned to users), so its gradient is not propagated
    q, k, v, tab, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    return (*softmax_attention_backward(q, k, v, tab, out, lse, dout, ctx.lib, ctx.node), None, None)


softmax_attention.register_autograd(_softmax_grad, setup_context=_softmax_setup)


# --- sampled softmax, KDEformer and uniform (lowering/sampled.py) ---------------------------------------

@torch.library.custom_op("attndsl::sampled_attention", mutates_args=())
def sampled_attention(q: Tensor, k: Tensor, v: Tensor, pq: Tensor, pk: Tensor, si: Tensor, lw: Tensor,
                      sb: Tensor, lib: str, node: str, block: int) -> tuple[Tensor, Tensor]:
    """(out (BH, N, Dv), lse (BH, N)) of the sampled estimate of softmax attention: rows visited in
    the order pq (queries), pk (keys) (BH, N) int32 and cut into blocks of `block`; each query sees
    its block's keys exactly and the sampled rows si (BH, S) int32 of k, v with log-weights lw
    (BH, S), unless its block holds them (sb (BH, S) int32, the sample's block)."""
    out = torch.empty_like(v)
    lse = v.new_empty(v.shape[0], v.shape[1])
    _kernel(lib, node + "_fwd")(q, k, v, pq, pk, si, lw, sb, out, lse, block)
    return out, lse


@sampled_attention.register_fake
def _(q, k, v, pq, pk, si, lw, sb, lib, node, block):
    return torch.empty_like(v), v.new_empty(v.shape[0], v.shape[1])


@torch.library.custom_op("attndsl::sampled_attention_backward", mutates_args=())
def sampled_attention_backward(q: Tensor, k: Tensor, v: Tensor, pq: Tensor, pk: Tensor, si: Tensor,
                               lw: Tensor, sb: Tensor, out: Tensor, lse: Tensor, dout: Tensor, lib: str,
                               node: str, block: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dlw) from dout, for the same blocks and samples."""
    dq, dk, dv, dlw = (torch.empty_like(t) for t in (q, k, v, lw))
    BH, S = si.shape
    dks, dvs = k.new_empty(BH, S, k.shape[2]), v.new_empty(BH, S, v.shape[2])
    _kernel(lib, node + "_bwd")(q, k, v, pq, pk, si, lw, sb, out, lse, dout.contiguous(),
                                dq, dk, dv, dks, dvs, dlw, block)
    rows = (si.long() + k.shape[1] * torch.arange(BH, device=si.device)[:, None]).reshape(-1)  # samples repeat: add
    dk.view(-1, k.shape[2]).index_add_(0, rows, dks.view(-1, k.shape[2]))
    dv.view(-1, v.shape[2]).index_add_(0, rows, dvs.view(-1, v.shape[2]))
    return dq, dk, dv, dlw


@sampled_attention_backward.register_fake
def _(q, k, v, pq, pk, si, lw, sb, out, lse, dout, lib, node, block):
    return tuple(torch.empty_like(t) for t in (q, k, v, lw))


def _sampled_setup(ctx, inputs, output):
    q, k, v, pq, pk, si, lw, sb, lib, node, block = inputs
    ctx.save_for_backward(q, k, v, pq, pk, si, lw, sb, *output)
    ctx.lib, ctx.node, ctx.block = lib, node, block


def _sampled_grad(ctx, dout, dlse):
    q, k, v, pq, pk, si, lw, sb, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dlw = sampled_attention_backward(q, k, v, pq, pk, si, lw, sb, out, lse, dout,
                                                 ctx.lib, ctx.node, ctx.block)
    return dq, dk, dv, None, None, None, dlw, None, None, None, None


sampled_attention.register_autograd(_sampled_grad, setup_context=_sampled_setup)
