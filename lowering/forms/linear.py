"""linear and prefix_sum: a feature-map kernel without position terms.

    linear      S = Σ_j φk_j⊗[v_j, 1] once, out_i = φq_i·S / (φq_i·z + eps)   (two GEMMs)
    prefix_sum  the same with S_i = S_{i−1} + φk_i⊗[v_i, 1], one pass in time (causal)

CPU kernels: linear.py; portable: te_forms.py. An elementwise φ fused in (passes/fuse_maps.py) is
applied at the kernels' loads; a padded key (attndsl/padding.py) is read there as a point where φ
vanishes, so that it adds nothing.
"""
from __future__ import annotations

import functools

from attndsl.ir import LinearAttention

from ..costs import linear_cost
from ..form import Form, keys_out, knob, watched
from .feature_map import map_kernel_of, site_map


def _phi(node, dtype):
    """The fused φ and φ′ (None when the node takes precomputed features)."""
    if node.phi is None:
        return None, None
    from ..cpu import featuremap
    m = node.qf.shape[-1]
    return featuremap.elementwise_pair(map_kernel_of(node.phi, m, m, node.prescale), dtype)


def lower_cpu(node: LinearAttention, names, dtype, knobs):
    from ..cpu import linear
    m, d = node.qf.shape[-1], node.v.shape[-1]
    phi, dphi = _phi(node, dtype)
    return {names[0]: linear.linear_forward(names[0], m, d, dtype, node.causal, phi, knobs=knobs.get(names[0]),
                                            eps=node.eps),
            names[1]: linear.linear_backward(names[1], m, d, dtype, node.causal, phi, dphi,
                                             knobs=knobs.get(names[1]))}


def lower_portable(node: LinearAttention, names, dtype, knobs, gpu):
    from ..portable import te_forms
    m, d = node.qf.shape[-1], node.v.shape[-1]
    phi, dphi = _phi(node, dtype)
    cf, cb = knob(knobs, names, "portable_linear", "chunk")
    return {names[0]: te_forms.linear_forward(names[0], m, d, dtype, node.causal, phi, chunk=cf, eps=node.eps),
            names[1]: te_forms.linear_backward(names[1], m, d, dtype, node.causal, phi, dphi, chunk=cb)}


def decode_cpu(node: LinearAttention, name, dtype):
    from ..cpu import decode
    return decode.step_kernel(name, site_map(node), node.v.shape[-1], dtype, False, node.eps)


@functools.cache
def vanishing(phi, prescale: float) -> float | None:
    """Where the fused map φ(prescale·x) is 0 with a finite slope (padding.vanishing_point)."""
    import torch

    from attndsl.featuremaps import lookup
    from attndsl.padding import vanishing_point

    def values(x):
        t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        f = lookup(phi).apply(phi, prescale * t, None, "k")
        if not f.requires_grad:                  # a constant map
            return float(f), 0.0
        (df,) = torch.autograd.grad(f, t)
        return float(f.detach()), float(df)
    return vanishing_point(values)


_VANISHES: dict[tuple[str, str], bool] = {}     # (library, kernel) -> whether its φ is 0 at `vanishing`


def _vanishes_in(node, x: float, k, lib: str, name: str) -> bool:
    """Whether the compiled kernel's φ is exactly 0 at x too (its arithmetic is not torch's): one
    row whose key is x must leave the normalizer at eps. Probed once per library and kernel."""
    import torch

    from attndsl import ops
    if (lib, name) not in _VANISHES:
        m, d = k.shape[-1], node.v.shape[-1]
        with torch.no_grad():
            _, den = ops.fast.linear_attention(k.new_ones(1, 1, m), k.new_full((1, 1, m), x), k.new_ones(1, 1, d),
                                               k.new_zeros(1, 1), k.new_zeros(0, 0, dtype=torch.bool), lib, name)
        _VANISHES[lib, name] = bool(den.item() == torch.tensor(node.eps or 0.0, dtype=k.dtype).item())
    return _VANISHES[lib, name]


def _padded_keys(node, k, params, lib, name):
    """k and the `empty` rows under the call's key padding mask: features zeroed; raw keys of a
    fused φ set where φ vanishes (or a ValueError when it never does)."""
    if node.phi is None or params["pad"] is None:
        return keys_out(k, params)
    x = vanishing(node.phi, node.prescale)
    if x is None or not _vanishes_in(node, x, k, lib, name):
        raise ValueError(f"key_padding_mask: the feature map φ = {node.phi.name} is fused into the linear "
                         f"kernels, which leave a padded key out by reading it where φ is 0, and this φ is 0 at "
                         f"none of -inf, 0, inf, -1, 1 (as the kernels compute it); use a map that vanishes "
                         f"somewhere (e.g. relu(x) or exp(x) in it), or pad no key")
    return keys_out(k, params, x)


def run(node, args, lib, name, params):
    from attndsl import ops
    qf, kf, v = args
    kf, empty = _padded_keys(node, kf, params, lib, name)
    return watched(ops.fast.linear_attention(qf, kf, v, v.new_zeros(1, 1), empty, lib, name), params)   # no rates


FORMS = [
    Form("linear", LinearAttention, lambda n: not n.causal, linear_cost,
         "S = Σ_j φk_j⊗[v_j, 1] once, then out_i = φq_i·S (two GEMMs)",
         lower_cpu, lower_portable, run, "linear_attention", "linear", "portable_linear", probe="kernel = elu1"),
    Form("prefix_sum", LinearAttention, lambda n: n.causal, linear_cost,
         "running state S_i = S_{i−1} + φk_i⊗[v_i, 1], out_i = φq_i·S_i (one pass)",
         lower_cpu, lower_portable, run, "linear_attention", "linear", "portable_linear",
         probe="kernel = elu1; mask = causal", decode=decode_cpu),
]
