"""Passes as Before/Expected pairs, idempotence, the verifier, and the IR dump flag."""
import pytest

from attndsl import parse, pipeline
from attndsl.ir import (Biased, Dot, ExpDot, FeatureMap, Input, LinearAttention, Masked, Normalize,
                        Position, Scale, SoftmaxAttention, format_ir)
from attndsl.passes import fold_scale, fuse_maps, fuse_softmax, linearize, plan
from attndsl.rewrite import rewrite
from attndsl.verify import IRVerificationError, verify
from attndsl.ast import Choice

RELU = Choice("relu")
q, k, v = Input("q", 8), Input("k", 8), Input("v", 4)


def fmap(x, role, prescale=1.0):
    return FeatureMap(x, RELU, role, 8, prescale)


def test_fold_scale():
    before = fmap(Scale(Scale(q, 2.0), 0.5), "q")
    expected = fmap(q, "q", prescale=1.0)
    assert rewrite(before, fold_scale.RULES) == expected


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_linearize(causal):
    scores = Dot(fmap(q, "q"), fmap(k, "k"))
    before = Normalize(Masked(scores) if causal else scores, v)
    expected = LinearAttention(fmap(q, "q"), fmap(k, "k"), v, causal=causal)
    after = rewrite(before, linearize.RULES)
    assert after == expected
    assert rewrite(after, linearize.RULES) == after              # idempotent


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("biased", [False, True], ids=["plain", "alibi"])
def test_fuse_softmax(causal, biased):
    b = Position(Choice("alibi", (("slope", 0.5),)))
    scores = ExpDot(q, k, 0.25)
    scores = Biased(scores, b) if biased else scores
    before = Normalize(Masked(scores) if causal else scores, v)
    expected = SoftmaxAttention(q, k, v, b if biased else None, causal, 0.25)
    after = rewrite(before, fuse_softmax.RULES)
    assert after == expected
    assert rewrite(after, fuse_softmax.RULES) == after           # idempotent
    verify(after)
    assert rewrite(Normalize(Dot(fmap(q, "q"), fmap(k, "k")), v), fuse_softmax.RULES).op == "normalize"


def test_fuse_maps_folds_elementwise_maps_into_the_kernel():
    before = LinearAttention(fmap(q, "q", 0.5), fmap(k, "k", 0.5), v, causal=True)
    expected = LinearAttention(q, k, v, causal=True, phi=RELU, prescale=0.5)
    after = rewrite(before, fuse_maps.RULES)
    assert after == expected
    assert rewrite(after, fuse_maps.RULES) == after              # idempotent
    verify(after)


def test_fuse_maps_leaves_projected_and_mismatched_maps_alone():
    favor = Choice("favor", (("features", 8), ("orthogonal", True), ("stabilize", True), ("seed", 0)))
    projected = LinearAttention(FeatureMap(q, favor, "q", 8), FeatureMap(k, favor, "k", 8), v, False)
    mismatched = LinearAttention(fmap(q, "q", 0.5), fmap(k, "k", 1.0), v, causal=False)
    for before in (projected, mismatched):
        assert rewrite(before, fuse_maps.RULES) == before


def test_plan_picks_prefix_sum_for_causal_and_linear_otherwise():
    for causal, form in [(True, "prefix_sum"), (False, "linear")]:
        root, decisions = plan.choose(LinearAttention(fmap(q, "q"), fmap(k, "k"), v, causal))
        assert root.form == form and decisions[0].form == form
        assert plan.choose(root)[0] == root                        # idempotent: nothing left


def test_plan_refuses_a_form_that_does_not_apply():
    from attndsl import SpecError
    with pytest.raises(SpecError, match="does not apply"):
        plan.choose(LinearAttention(fmap(q, "q"), fmap(k, "k"), v, causal=False), "prefix_sum")
    with pytest.raises(SpecError, match="did you mean 'linear'"):
        plan.choose(LinearAttention(fmap(q, "q"), fmap(k, "k"), v, causal=False), "linaer")


def test_verifier_rejects_mismatched_feature_widths():
    bad = LinearAttention(fmap(q, "q"), FeatureMap(k, RELU, "k", 16), v, causal=False)
    with pytest.raises(IRVerificationError, match="linear_attention"):
        verify(bad)


def test_pipeline_stages_in_order_and_verified():
    spec = parse("attention a { kernel = favor(features=16) \n mask = causal }").block()
    planned = pipeline.run(spec, 8, 4)
    assert [n for n, _ in planned.stages] == ["ir", "fold_scale", "linearize", "fuse_softmax", "fuse_maps", "plan"]
    assert isinstance(planned.stage("ir"), Normalize)
    assert isinstance(planned.root, LinearAttention) and planned.root.form == "prefix_sum"
    text = format_ir(planned.root)
    assert "feature_map" in text and "form=prefix_sum" in text and text.endswith("return %5")


def test_dump_ir_flag_prints_every_pass(monkeypatch, capsys):
    monkeypatch.setenv("ATTNDSL_DUMP_IR", "1")
    pipeline.run(parse("attention a { kernel = relu }").block(), 8, 8)
    err = capsys.readouterr().err
    for stage in ("ir", "fold_scale", "linearize", "fuse_softmax", "fuse_maps", "plan"):
        assert f"IR after {stage}" in err


def test_the_executor_program_reads_an_equal_subtree_built_twice_as_one_step():
    """postorder dedups by value: a parent whose children are equal but distinct objects reads the
    one step both stand for."""
    from attndsl.ir import Add, Input
    from attndsl.module import program
    a, b = Input("v", 8), Input("v", 8)
    assert a == b and a is not b
    steps = program(Add(a, b))
    assert len(steps) == 2 and steps[-1].args == (0, 0)
