"""Bad tensors and unsupported forms get clear errors that say what to do."""
import dataclasses

import pytest
import torch

import attndsl
from attndsl import SpecError

ATTN = None


def attn():
    global ATTN
    if ATTN is None:
        ATTN = attndsl.compile("attention a { kernel = elu1 }", heads=2, head_dim=8, value_dim=4)
    return ATTN


def qkv(B=1, H=2, N=5, Dk=8, Dv=4, dtype=torch.float32):
    return torch.randn(B, H, N, Dk, dtype=dtype), torch.randn(B, H, N, Dk, dtype=dtype), \
        torch.randn(B, H, N, Dv, dtype=dtype)


BAD = {
    "3d": (lambda q, k, v: (q[0], k, v), ValueError, "must be 4-d"),
    "heads": (lambda q, k, v: (q[:, :1], k, v), ValueError, "heads=2"),
    "head_dim": (lambda q, k, v: (q[..., :4], k, v), ValueError, "head_dim=8"),
    "value_dim": (lambda q, k, v: (q, k, v[..., :2]), ValueError, "value_dim=4"),
    "seq_mismatch": (lambda q, k, v: (q, k[:, :, :3], v), ValueError, "expected"),
    "int_dtype": (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, "supported: float32"),
    "mixed_dtype": (lambda q, k, v: (q, k.double(), v), TypeError, "share a dtype"),
    "not_tensor": (lambda q, k, v: (q.tolist(), k, v), TypeError, "torch.Tensor"),
    "empty_seq": (lambda q, k, v: (q[:, :, :0], k[:, :, :0], v[:, :, :0]), ValueError, "length is 0"),
    "seq_first": (lambda q, k, v: (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)), ValueError,
                  r"q has shape \(1, 5, 2, 8\): dimension 1 must be heads \(2\).*pass q.transpose\(1, 2\)"),
    "v_seq_first": (lambda q, k, v: (q, k, v.transpose(1, 2)), ValueError, r"pass v.transpose\(1, 2\)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tensors(case):
    make, exc, msg = BAD[case]
    with pytest.raises(exc, match=msg):
        attn()(*make(*qkv()))


def test_nan_policy():
    q, k, v = qkv()
    q[0, 0, 0, 0] = float("nan")
    assert torch.isnan(attn()(q, k, v)).any()                  # default: propagate, like SDPA
    strict = attndsl.compile("attention a { kernel = elu1 }", heads=2, head_dim=8, value_dim=4,
                             check_finite=True)
    with pytest.raises(ValueError, match="NaN or Inf"):
        strict(q, k, v)


def test_an_empty_batch_gives_an_empty_output_and_gradients():
    q, k, v = (t[:0].requires_grad_(True) for t in qkv())
    out = attn()(q, k, v)
    assert out.shape == (0, 2, 5, 4) and out.dtype == torch.float32
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    half = attn()(*(t.detach().bfloat16() for t in (q, k, v)))
    assert half.shape == (0, 2, 5, 4) and half.dtype == torch.bfloat16


def test_check_finite_covers_the_position_table():
    strict = attndsl.compile("attention t { kernel = elu1; position = toeplitz(max_distance=3) }",
                             heads=2, head_dim=8, value_dim=4, check_finite=True)
    q, k, v = qkv()
    assert torch.isfinite(strict(q, k, v)).all()
    with torch.no_grad():
        strict.position_table[1, 2] = float("inf")
    with pytest.raises(ValueError, match="position_table contains NaN or Inf"):
        strict(q, k, v)


def test_a_form_without_kernels_is_a_located_spec_error(monkeypatch):
    from attndsl import lowering
    monkeypatch.setitem(lowering.FORMS, "kde", dataclasses.replace(lowering.FORMS["kde"], cpu=None))
    with pytest.raises(SpecError, match="sampled_attention form .kde. is not lowered to TVM") as e:
        attndsl.compile("attention s { sampling = kde(samples=8) }", heads=1, head_dim=8)
    assert "<spec>:" in str(e.value) and "^" in str(e.value)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="heads must be a positive int"):
        attndsl.compile("attention a { kernel = relu }", heads=0, head_dim=8)
    with pytest.raises(SpecError, match="no spec file"):
        attndsl.compile("missing.attn", heads=1, head_dim=8)
    with pytest.raises(SpecError, match="pass name="):
        attndsl.compile("attention a { kernel = relu }\nattention b { kernel = relu }",
                        heads=1, head_dim=8)
