"""Trident against the reference's (YuHengsss/Trident) handling of window sizes other than the model's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cliplab.dense.attention import last_block, prelast_tokens, value_attention
from cliplab.dense.trident import Trident


def _orthogonal_guide(images):                            # every token its own direction: A = identity
    h, w = images.shape[2] // 8, images.shape[3] // 8
    return torch.eye(h * w).expand(len(images), -1, -1).reshape(len(images), h, w, h * w)


def _reference_prelast(visual, images):
    """Tokens entering the last block as the reference's ``VisionTransformer.forward`` computes them:
    positions resized by ``interpolate_pos_encoding`` (``scale_factor = (h + 0.1) / g0``, bicubic)."""
    g0, g1 = visual.grid_size
    h, w = images.shape[2] // 8, images.shape[3] // 8
    pos = visual.positional_embedding
    patch = pos[1:].reshape(1, g0, g1, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((h + 0.1) / g0, (w + 0.1) / g1), mode="bicubic")
    pos = torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(h * w, -1)])
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(len(images), 1, -1), x], dim=1) + pos
    x = visual.ln_pre(x)
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)
    return x


def test_trident_resizes_positions_as_the_reference(tiny):
    """A 48 px window on a 32 px model: the last block sees the reference's positions (it used open_clip's)."""
    visual = tiny.model.visual
    x = torch.randn(2, 3, 48, 48)
    block = visual.transformer.resblocks[-1]
    with torch.no_grad():
        ours = Trident(guide=_orthogonal_guide).features(tiny, x).tokens.reshape(2, 36, -1)
        ref = last_block(block, _reference_prelast(visual, x), value_attention, residual=False, ffn=False)[:, 1:]
        sized, _ = prelast_tokens(visual, x, positions="size")
        old = last_block(block, sized, value_attention, residual=False, ffn=False)[:, 1:]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (ours - old).abs().max() > 1e-3
