"""Long-CLIP position stretching: kept rows, the interpolation, exact short captions, save and load."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from cliplab.errors import UsageError
from cliplab.surgery.long_positions import stretch_position_table, stretch_positions, stretched_length


def _reference_formula(p: torch.Tensor, keep: int) -> torch.Tensor:
    """The reference's ratio-4 loop, written out (beichenzbc/Long-CLIP model/longclip.py)."""
    length, dim = p.shape
    out = torch.zeros(4 * length - 3 * keep, dim)
    out[:keep] = p[:keep]
    for i in range(length - 1 - keep):
        out[4 * i + keep] = p[i + keep]
        out[4 * i + 1 + keep] = 3 * p[i + keep] / 4 + 1 * p[i + 1 + keep] / 4
        out[4 * i + 2 + keep] = 2 * p[i + keep] / 4 + 2 * p[i + 1 + keep] / 4
        out[4 * i + 3 + keep] = 1 * p[i + keep] / 4 + 3 * p[i + 1 + keep] / 4
    for r in range(4):
        out[4 * length - 3 * keep - 4 + r] = p[length - 1] + r * (p[length - 1] - p[length - 2]) / 4
    return out


def test_kept_rows_are_bit_identical_and_the_rest_is_the_reference_interpolation():
    torch.manual_seed(0)
    p = torch.randn(32, 16)
    out = stretch_position_table(p, stretched_length(32), keep=20)
    assert out.shape == (68, 16) and stretched_length(77) == 248
    assert torch.equal(out[:20], p[:20])
    assert torch.equal(out, _reference_formula(p, 20))             # bit for bit
    assert torch.equal(out[20::4][:12], p[20:32])                  # row 20 + 4k is P[20 + k]
    assert not torch.equal(out[21], p[21])


def test_any_new_length_is_linear_interpolation_then_linear_extrapolation():
    torch.manual_seed(1)
    p = torch.randn(12, 3, dtype=torch.float64)
    keep, new = 5, 30
    out = stretch_position_table(p, new, keep=keep).numpy()
    s = keep + (np.arange(keep, new) - keep) * (12 - keep) / (new - keep)       # where each new row reads
    inside = s <= 11
    for d in range(3):
        np.testing.assert_allclose(out[keep:][inside, d], np.interp(s[inside], np.arange(12), p[:, d].numpy()),
                                   rtol=0, atol=1e-12)
        slope = p[11, d] - p[10, d]
        np.testing.assert_allclose(out[keep:][~inside, d], p[11, d].item() + (s[~inside] - 11) * slope.item(),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs", [{"keep": 31}, {"keep": -1}])
def test_bad_keep_is_refused(kwargs):
    with pytest.raises(UsageError, match="keep"):
        stretch_position_table(torch.zeros(32, 4), 68, **kwargs)


def test_the_context_must_grow(tiny):
    with pytest.raises(UsageError, match="must exceed"):
        stretch_positions(tiny, tiny.context_length)


def test_stretched_backbone_has_the_new_context_everywhere_and_leaves_the_input_alone(tiny):
    before = tiny.model.positional_embedding.detach().clone()
    long = stretch_positions(tiny, keep=20)                          # tiny: 24 -> 20 + 4 * 4 = 36
    m = long.model
    assert long.context_length == 36 == m.context_length == long.model_cfg["text_cfg"]["context_length"]
    assert m.positional_embedding.shape == (36, before.shape[1]) and m.attn_mask.shape == (36, 36)
    assert torch.equal(m.attn_mask, torch.full((36, 36), float("-inf")).triu(1))
    assert long.tokenize(["a red star"]).shape == (1, 36)
    assert tiny.context_length == 24 and torch.equal(tiny.model.positional_embedding, before)
    assert tiny.model_cfg["text_cfg"]["context_length"] == 24


def test_short_captions_encode_exactly_as_before_and_long_ones_are_read_whole(tiny):
    # The text tower is causal and pools the end-of-text token: a caption whose end token sits
    # before position `keep` attends only to positions < keep, which the stretching keeps.
    long = stretch_positions(tiny, keep=20)
    short = ["a photo of a red star.", "two blue squares", "a circle"]
    assert int(tiny.tokenize(short).argmax(-1).max()) < 20
    for fast in (True, False):
        assert np.array_equal(long.encode_texts(short, fast=fast), tiny.encode_texts(short, fast=fast))
    # past the kept rows the features move (the equality above is not vacuous) ...
    mid = ["a large red circle at the top left and a small blue square at the bottom right of the green star"]
    assert 20 < int(tiny.tokenize(mid).argmax(-1)[0]) < 24
    assert not np.array_equal(long.encode_texts(mid), tiny.encode_texts(mid))
    # ... and a 30-token caption is cut at 24 by the original, read whole by the stretched model
    text = ["a picture of three shapes on a striped background with a red circle, a blue square, "
            "a green star and more"]
    with warnings.catch_warnings():              # the truncation warning is shown once per process
        warnings.simplefilter("ignore")
        cut = tiny.tokenize(text)
    whole = long.tokenize(text)
    n = int(whole.argmax(-1)[0]) + 1
    assert 24 < n <= 36 and torch.equal(cut[0, :23], whole[0, :23])
    np.testing.assert_allclose(long.encode_texts(text), long.encode_texts(text, fast=False), atol=1e-5)


def test_save_and_load_keep_the_context(tiny, tmp_path):
    import cliplab

    long = stretch_positions(tiny, 40, keep=10)
    texts = ["a red star", "a picture of three shapes on a striped background with a red circle, a blue "
                           "square, a green star and a yellow ring"]
    for out in (tmp_path / "folder", tmp_path / "weights.safetensors"):
        long.save(out)
        back = cliplab.load(out)
        assert back.context_length == 40 and back.model.attn_mask.shape == (40, 40)
        assert torch.equal(back.model.positional_embedding, long.model.positional_embedding)
        assert np.array_equal(back.encode_texts(texts), long.encode_texts(texts))
