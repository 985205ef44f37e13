"""The CPU build skips passes that leave our kernels unchanged (lowering/build.py)."""
from __future__ import annotations

import pytest
import tvm

from attndsl import lowering, pipeline
from attndsl.lowering import build
from attndsl.parse import parse

# one spec per CPU form (the planner's choice at these dims, or forced)
SPECS = {
    "toeplitz_fft": ("kernel = elu1; position = toeplitz(max_distance=64); mask = causal", "toeplitz_fft"),
    "prefix_sum": ("kernel = elu1; mask = causal", "auto"),
    "quadratic": ("kernel = softmax; position = alibi; mask = causal", "auto"),
    "banded": ("kernel = elu1; position = toeplitz(max_distance=8)", "banded"),
    "pairwise": ("kernel = elu1; position = alibi", "pairwise"),
    "kde": ("sampling = kde(buckets=4, block=16, samples=8, seed=0)", "auto"),
    "values_fft": ("kernel = favor(features=16); position = toeplitz(max_distance=64); apply = values", "auto"),
}


@pytest.mark.parametrize("form", SPECS)
def test_skipped_passes_change_nothing(form):
    """The lowered TIR (the S-TIR pipeline, before code generation) is the same with and without
    build.CPU_SKIPPED_PASSES: a kernel that starts to need one must build with it again."""
    text, plan = SPECS[form]
    root = pipeline.run(parse(f"attention t {{ {text} }}").block(None), 8, 4, plan_name=plan).root
    funcs = lowering.lower(root, "float32", only={name for name in lowering.tunable(root) if name.endswith("_fwd")}
                           or None)
    target = tvm.target.Target(build.resolve_target("llvm"))

    def lowered(ctx):
        with ctx, target:
            # tvm.compile's steps before code generation (tvm/tirx/build.py)
            mod = tvm.tirx.transform.BindTarget(target.with_host(target))(tvm.IRModule(funcs))
            mod = tvm.tirx.get_tir_pipeline("default")[0](mod)
        return {gv.name_hint: f.script() for gv, f in mod.functions.items()}
    full = lowered(tvm.transform.PassContext.current())
    assert lowered(build.cpu_pass_context()) == full
