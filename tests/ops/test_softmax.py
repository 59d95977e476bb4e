"""The softmax kernels against float64 softmax and torch.softmax, and as an open_clip attention softmax.

Accuracy contract (module docstring of ``cliplab.ops.softmax``): relative error below 1e-6
for every output in float32's normal range; outputs below 2**-126 flush to zero, as in the
reference kernels, so there the absolute error is below 2**-125.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from cliplab.errors import UsageError  # noqa: E402
from cliplab.ops import attention_softmax  # noqa: E402
from cliplab.ops.softmax import ALGORITHMS, softmax  # noqa: E402

TINY = float(np.finfo(np.float32).tiny)      # 2**-126


def softmax64(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def assert_close_to_float64(y: np.ndarray, x: np.ndarray) -> None:
    ref = softmax64(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.isfinite(y).all()
    normal = ref >= TINY
    rel = np.abs(y[normal] - ref[normal]) / ref[normal]
    assert rel.max() < 1e-6, f"max relative error {rel.max():.3g}"
    assert (np.abs(y[~normal] - ref[~normal]) < 2 * TINY).all()
    np.testing.assert_allclose(y.astype(np.float64).sum(-1), 1.0, rtol=0, atol=2e-6)


def rows(kind: str, rng: np.random.Generator) -> np.ndarray:
    # lengths: shorter than one 16-lane vector, not multiples of 16, past the 256-element flush
    if kind == "random":
        return [rng.standard_normal((n_rows, n)).astype(np.float32) * scale
                for n_rows, n, scale in ((7, 5, 1), (5, 16, 3), (9, 100, 5), (4, 257, 10), (3, 1000, 20),
                                         (2, 5003, 4))]
    if kind == "constant":
        return [np.full((3, n), v, np.float32) for n, v in ((1, 0.0), (33, 7.5), (300, -1234.5), (4099, 88.0))]
    if kind == "pm1000":
        return [rng.uniform(-1000, 1000, (n_rows, n)).astype(np.float32)
                for n_rows, n in ((6, 10), (4, 777), (2, 4096))] + [
                np.array([[1000, -1000], [-1000, 1000], [1000, 1000], [-1000, -1000]], np.float32)]
    if kind == "single":
        return [np.array([[0.0], [1000.0], [-1000.0], [12345.6], [-1e5]], np.float32)]
    raise AssertionError(kind)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("kind", ["random", "constant", "pm1000", "single"])
def test_equals_float64_softmax(algorithm, kind):
    rng = np.random.default_rng(0)
    for x in rows(kind, rng):
        y = softmax(x, algorithm=algorithm)
        if kind == "single":
            np.testing.assert_array_equal(y, np.ones_like(x))
        else:
            assert_close_to_float64(y, x)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_long_row_keeps_the_accuracy(algorithm):
    """2**20 elements: float32 accumulators alone would lose the 1e-6 bound here."""
    x = np.random.default_rng(1).standard_normal((1, 1 << 20)).astype(np.float32) * 3
    assert_close_to_float64(softmax(x, algorithm=algorithm), x)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_large_magnitudes(algorithm):
    rng = np.random.default_rng(2)
    x = rng.uniform(-1e5, 1e5, (3, 500)).astype(np.float32)
    x[:, 7] = x.max(1) - 3.0                                   # a second non-negligible output
    assert_close_to_float64(softmax(x, algorithm=algorithm), x)
    if algorithm != "two-pass":                                # the three-pass variants take any finite input
        big = np.array([[3e38, -3e38, 3e38 - 2e31, 0.0]], np.float32)
        assert_close_to_float64(softmax(big, algorithm=algorithm), big)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_masked_entries_and_special_rows_like_torch(algorithm):
    inf, nan = float("inf"), float("nan")
    x = np.array([[0.0, -inf, 1.0, -inf],
                  [-inf, -inf, -inf, 5.0],
                  [-inf, -inf, -inf, -inf],        # fully masked: NaN, as torch
                  [nan, 0.0, 1.0, 2.0],            # NaN anywhere: NaN row, as torch
                  [inf, 0.0, 1.0, 2.0]], np.float32)  # +inf: NaN row, as torch
    y = softmax(x, algorithm=algorithm)
    expected = torch.softmax(torch.from_numpy(x), -1).numpy()
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    assert np.isnan(y[2:]).all()
    np.testing.assert_allclose(y[:2], expected[:2], rtol=1e-6, atol=0)
    assert (y[0, [1, 3]] == 0).all() and (y[1] == [0, 0, 0, 1]).all()
    masked = np.random.default_rng(3).standard_normal((20, 50)).astype(np.float32)
    masked[np.triu_indices(20, 1)] = -inf                      # a causal mask
    assert_close_to_float64(softmax(masked, algorithm=algorithm), masked)
    assert (softmax(masked, algorithm=algorithm)[np.triu_indices(20, 1)] == 0).all()


def test_axis_dtypes_and_out():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 40)).astype(np.float32)
    np.testing.assert_array_equal(softmax(x.T, axis=0), softmax(x).T)
    x3 = rng.standard_normal((2, 3, 9)).astype(np.float32)
    np.testing.assert_array_equal(softmax(x3, axis=1), np.moveaxis(softmax(np.moveaxis(x3, 1, -1)), -1, 1))
    y64 = softmax(x.astype(np.float64))                        # converted to float32, computed there
    assert y64.dtype == np.float32
    np.testing.assert_array_equal(y64, softmax(x))
    ints = softmax(np.array([[0, 1, 2]]))
    assert_close_to_float64(ints, np.array([[0, 1, 2]], np.float32))
    out = np.full_like(x, 7.0)
    assert softmax(x, out=out) is out
    np.testing.assert_array_equal(out, softmax(x))
    out_t = np.empty_like(x.T)
    np.testing.assert_array_equal(softmax(x.T, axis=0, out=out_t), softmax(x).T)


def test_empty_arrays():
    for shape in [(0, 5), (3, 0), (0,), (2, 0, 4)]:
        y = softmax(np.empty(shape, np.float32))
        assert y.shape == shape and y.dtype == np.float32


@pytest.mark.parametrize("bad, match", [
    (np.array([[1 + 2j, 0]]), "real numbers"),
    (np.array([["a", "b"]]), "real numbers"),
    (np.array([[True, False]]), "real numbers"),
    (np.array([object(), object()]), "real numbers"),
    (np.float32(3.0), "at least one axis"),
])
def test_bad_input_is_refused(bad, match):
    with pytest.raises(UsageError, match=match):
        softmax(bad)


def test_bad_arguments_are_refused():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(UsageError, match="axis"):
        softmax(x, axis=2)
    with pytest.raises(UsageError, match="algorithm"):
        softmax(x, algorithm="one-pass")
    with pytest.raises(UsageError, match="out must be"):
        softmax(x, out=np.zeros((2, 3), np.float64))
    with pytest.raises(UsageError, match="out must be"):
        softmax(x, out=np.zeros((3, 2), np.float32))
    with pytest.raises(UsageError, match="floating torch tensor"):
        attention_softmax(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(UsageError, match="floating torch tensor"):
        attention_softmax(x)


class KernelAttention(torch.nn.Module):
    """``nn.MultiheadAttention`` (self-attention, packed in_proj) recomputed with :func:`attention_softmax`."""

    def __init__(self, mha: torch.nn.MultiheadAttention, algorithm: str):
        super().__init__()
        self.mha, self.algorithm = mha, algorithm
        self.batch_first = mha.batch_first

    def forward(self, q_x, k_x, v_x, need_weights=False, attn_mask=None):
        mha = self.mha
        x = q_x if self.batch_first else q_x.transpose(0, 1)                 # (B, T, W)
        B, T, W = x.shape
        H = mha.num_heads
        q, k, v = torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, T, H, W // H).transpose(1, 2) for t in (q, k, v))   # (B, H, T, d)
        scores = (q * (W // H) ** -0.5) @ k.transpose(-2, -1)                 # (B, H, T, T)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(attn_mask, float("-inf"))
            scores = scores + attn_mask
        o = attention_softmax(scores, algorithm=self.algorithm) @ v          # (B, H, T, d)
        o = mha.out_proj(o.transpose(1, 2).reshape(B, T, W))
        return (o if self.batch_first else o.transpose(0, 1)), None


@pytest.fixture(scope="module")
def tiny_clip():
    from _tiny import make_model

    model = make_model().eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = torch.randint(1, 49407, (3, 24), generator=torch.Generator().manual_seed(1))
    texts[:, 10:] = 0                                                           # padding after EOT
    texts[:, 9] = 49407
    with torch.no_grad():
        return model, images, texts, model.encode_image(images), model.encode_text(texts)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_open_clip_towers_with_the_kernel_softmax(algorithm, tiny_clip):
    """Every attention of both towers (the text one under its causal -inf mask) through the kernel."""
    model, images, texts, ref_img, ref_txt = tiny_clip
    with torch.no_grad():
        blocks = [*model.visual.transformer.resblocks, *model.transformer.resblocks]
        originals = [blk.attn for blk in blocks]
        try:
            for blk in blocks:
                blk.attn = KernelAttention(blk.attn, algorithm)
            img, txt = model.encode_image(images), model.encode_text(texts)
        finally:
            for blk, attn in zip(blocks, originals):
                blk.attn = attn
    torch.testing.assert_close(img, ref_img, rtol=0, atol=1e-5)
    torch.testing.assert_close(txt, ref_txt, rtol=0, atol=1e-5)


def test_attention_softmax_keeps_dtype_and_shape():
    s = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    p = attention_softmax(s)
    assert p.dtype == torch.float64 and p.shape == s.shape
    torch.testing.assert_close(p, torch.softmax(s, -1), rtol=1e-6, atol=1e-7)
