"""The TVM kernels as PyTorch operators (torch.library), with autograd and fake tensors.

Each op of the kernel ABI (lowering/abi.py) becomes two custom ops, generated here: attndsl::<op>
(its outputs) and attndsl::<op>_backward (the gradients of its inputs), with fake tensors and the
autograd formula that joins them; eager calls reach the same implementations without torch's
dispatcher (`fast`: directly without gradients, through an autograd.Function with them). An op
names its compiled library by key (`register_library`) and its kernels by the IR node they lower
(`<op><index>`, + `_fwd`/`_bwd`). Tensors are (BH, N, width), contiguous; the value is the first
output, the others (den, lse) are internal.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .lowering.abi import OPS, Op, scalar_values

_LIBRARIES: dict[str, object] = {}


def register_library(key: str, lib) -> None:
    from .lowering.fft import packed
    packed.register()            # the Toeplitz kernels call back into the library FFT
    _LIBRARIES[key] = lib
    for k in [k for k in _KERNELS if k[0] == key]:        # a rebuilt library: look its kernels up again
        del _KERNELS[k]


_KERNELS: dict[tuple[str, str], object] = {}      # (library key, kernel name) -> its function


def _kernel(lib: str, name: str):
    fn = _KERNELS.get((lib, name))
    if fn is None:
        fn = _KERNELS[lib, name] = _LIBRARIES[lib][name]
    return fn


def _schema(names: list[str], attrs: tuple[str, ...], returns: int) -> str:
    args = [f"Tensor {n}" for n in names] + ["str lib", "str node"] + [f"int {a}" for a in attrs]
    out = "Tensor" if returns == 1 else "(" + ", ".join(["Tensor"] * returns) + ")"
    return f"({', '.join(args)}) -> {out}"


def _one_or_tuple(xs: list):
    return xs[0] if len(xs) == 1 else tuple(xs)


def _define(op: Op):
    """attndsl::<op> and attndsl::<op>_backward from the ABI record, joined by autograd."""
    n_in, saved = len(op.inputs), [name for name, _ in op.outputs] if op.saves else []
    grads = [name for name, _ in op.grads if name in op.inputs]
    reads = op.reads or op.inputs
    fwd_args = (*op.inputs, "lib", "node", *op.attrs)
    bwd_names = [*op.inputs, *saved, "dout"]
    bwd_args = (*bwd_names, "lib", "node", *op.attrs)
    bwd_reads = [*op.kernel_inputs, *saved]

    def outputs(t: dict) -> list:
        return [alloc(t) for _, alloc in op.outputs]

    def forward_impl(*args):
        t = dict(zip(fwd_args, args))
        outs = outputs(t)
        n = t[op.inputs[0]].shape[1]
        _kernel(t["lib"], t["node"] + "_fwd")(*(t[x] for x in reads), *outs, *scalar_values(op, n, t))
        if op.empty and t["empty"].numel():      # rows with no key (padding.py): 0, and a finite backward
            rows = t["empty"].view(-1).nonzero().flatten()       # written row by row, not a pass over out
            outs[0].view(-1, outs[0].shape[-1]).index_fill_(0, rows, 0)
            outs[1].view(-1).index_fill_(0, rows, 1)
        return _one_or_tuple(outs)

    def forward_fake(*args):
        return _one_or_tuple(outputs(dict(zip(fwd_args, args))))

    def backward_impl(*args):
        t = dict(zip(bwd_args, args))
        bufs = {("d" + name if name in op.inputs else name): alloc(t) for name, alloc in op.grads}
        n = t[op.inputs[0]].shape[1]
        dout = t["dout"]
        if op.empty and t["empty"].numel():      # an empty row's out is 0 whatever its inputs
            dout = dout.masked_fill(t["empty"][..., None], 0)
        _kernel(t["lib"], t["node"] + "_bwd")(*(t[x] for x in bwd_reads), dout.contiguous(),
                                              *bufs.values(), *scalar_values(op, n, t))
        return folded(t, bufs)

    def folded(t: dict, bufs: dict):
        if op.fold is not None:
            bufs.update(op.fold({**t, **bufs}) or {})
        return _one_or_tuple([bufs["d" + name] for name in grads])

    def backward_fake(*args):
        t = dict(zip(bwd_args, args))
        return folded(t, {("d" + name if name in op.inputs else name): alloc(t) for name, alloc in op.grads})

    fwd = torch.library.custom_op(f"attndsl::{op.name}", forward_impl, mutates_args=(),
                                  schema=_schema(list(op.inputs), op.attrs, len(op.outputs)))
    fwd.register_fake(forward_fake)
    bwd = torch.library.custom_op(f"attndsl::{op.name}_backward", backward_impl, mutates_args=(),
                                  schema=_schema(bwd_names, op.attrs, len(grads)))
    bwd.register_fake(backward_fake)

    def setup(ctx, inputs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        ctx.save_for_backward(*inputs[:n_in], *(outputs if op.saves else ()))
        ctx.rest = inputs[n_in:]                 # lib, node, attributes

    def backward(ctx, *douts):
        # the internal outputs (den, lse) are never returned to users: their gradients are not propagated
        saved_t = ctx.saved_tensors
        dout = douts[0]
        if dout is None:
            dout = op.outputs[0][1](dict(zip(fwd_args, saved_t[:n_in] + ctx.rest))).zero_()
        g = bwd(*saved_t, dout, *ctx.rest)
        g = dict(zip(grads, g if isinstance(g, tuple) else (g,)))
        return (*(g.get(name) for name in op.inputs), *(None for _ in ctx.rest))

    fwd.register_autograd(backward, setup_context=setup)
    fwd.__doc__ = op.doc

    class Eager(torch.autograd.Function):
        """The same forward and backward as the custom ops, for eager calls that need gradients:
        torch's dispatcher is skipped for both (an autograd node, no op records)."""

        @staticmethod
        def forward(ctx, *args):
            output = forward_impl(*args)
            outs = output if isinstance(output, tuple) else (output,)
            setup(ctx, args, output)
            ctx.mark_non_differentiable(*outs[1:])
            return output

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, *douts):                 # douts materialized: zeros for unused outputs
            g = backward_impl(*ctx.saved_tensors, douts[0], *ctx.rest)
            g = dict(zip(grads, g if isinstance(g, tuple) else (g,)))
            return (*(g.get(name) for name in op.inputs), *(None for _ in ctx.rest))

    return fwd, bwd, forward_impl, Eager.apply


def _dispatch(op_fn, impl, eager_grad):
    """op_fn where torch.compile traces it; else, an eager call, its implementation directly
    without gradients, or through a plain autograd.Function with them: both skip torch's
    dispatcher (~30 µs a site without gradients, 30–80 µs a site forward and backward)."""
    def call(*args):
        if torch.compiler.is_compiling():
            return op_fn(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return eager_grad(*args)
        return impl(*args)
    call.__doc__ = op_fn.__doc__
    return call


# attndsl::<op> as ops.<op> (what torch.compile traces and opcheck checks); ops.fast.<op>, what the
# form runners call
fast = SimpleNamespace()
for _op in OPS.values():
    _fwd, _bwd, _impl, _eager = _define(_op)
    globals()[_op.name], globals()[_op.name + "_backward"] = _fwd, _bwd
    setattr(fast, _op.name, _dispatch(_fwd, _impl, _eager))
