"""Surgery identities of the last-block attention variants on a tiny random open_clip ViT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cliplab.dense.attention import (interpolate_positions, last_block, prelast_tokens, project_tokens, qkv,
                                     qq_attention, qq_kk_weights, value_attention, vanilla_attention)
from cliplab.dense.base import DenseFeatures
from cliplab.errors import UsageError


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.randn(2, 3, 32, 32)


def test_vanilla_path_equals_model_visual_tokens(tiny, images):
    from cliplab.dense import DENSE_METHODS

    visual = tiny.model.visual
    with torch.no_grad():
        visual.output_tokens = True
        try:
            _, tokens = visual(images)                                       # (B, T, W) after ln_post
        finally:
            visual.output_tokens = False
        ours = DENSE_METHODS.get("vanilla")().features(tiny, images)
    assert isinstance(ours, DenseFeatures) and ours.tokens.shape == (2, 4, 4, tiny.embed_dim)
    torch.testing.assert_close(ours.tokens.reshape(2, 16, -1), tokens @ visual.proj, atol=1e-5, rtol=0)


def test_identity_attention_reproduces_the_value_path(tiny, images):
    visual = tiny.model.visual
    block = visual.transformer.resblocks[-1]
    with torch.no_grad():
        x, _ = prelast_tokens(visual, images)                                 # (B, T, W)
        T, W = x.shape[1:]
        eye = torch.eye(T)
        identity = last_block(block, x, lambda q, k, v, s: eye @ v)
        value = last_block(block, x, value_attention)
        # the value path by hand: v = ln_1(x) W_v + b_v, then W_o, residual, FFN
        wv, bv = block.attn.in_proj_weight[2 * W:], block.attn.in_proj_bias[2 * W:]
        z = x + block.attn.out_proj(F.linear(block.ln_1(x), wv, bv))
        z = z + block.mlp(block.ln_2(z))
    torch.testing.assert_close(identity, value, atol=1e-6, rtol=0)
    torch.testing.assert_close(value, z, atol=1e-5, rtol=0)


def test_vanilla_last_block_is_the_block(tiny, images):
    visual = tiny.model.visual
    block = visual.transformer.resblocks[-1]
    with torch.no_grad():
        x, _ = prelast_tokens(visual, images)
        torch.testing.assert_close(last_block(block, x, vanilla_attention), block(x), atol=1e-5, rtol=0)


def test_sclip_attention_rows_sum_to_two(tiny, images):
    visual = tiny.model.visual
    with torch.no_grad():
        x, _ = prelast_tokens(visual, images)
        q, k, _ = qkv(visual.transformer.resblocks[-1], x)
        a = qq_kk_weights(q, k, q.shape[-1] ** -0.5)                          # (B, H, T, T)
    assert a.shape == (2, q.shape[1], 17, 17)
    torch.testing.assert_close(a.sum(-1), torch.full(a.shape[:-1], 2.0), atol=1e-5, rtol=0)
    assert (a >= 0).all()


def test_clearclip_block_is_torch_attention_with_queries_as_keys(tiny, images):
    """softmax(s q qᵀ) v then W_o, no residual/FFN == PyTorch's MHA with the key weights set to the query weights."""
    visual = tiny.model.visual
    block = visual.transformer.resblocks[-1]
    attn = block.attn
    W = attn.embed_dim
    with torch.no_grad():
        x, _ = prelast_tokens(visual, images)
        ours = last_block(block, x, qq_attention, residual=False, ffn=False)
        w, b = attn.in_proj_weight, attn.in_proj_bias
        w_qqv = torch.cat([w[:W], w[:W], w[2 * W:]])
        b_qqv = torch.cat([b[:W], b[:W], b[2 * W:]])
        h = block.ln_1(x).transpose(0, 1)                                     # (T, B, W)
        ref, _ = F.multi_head_attention_forward(h, h, h, W, attn.num_heads, w_qqv, b_qqv, None, None, False, 0.0,
                                                attn.out_proj.weight, attn.out_proj.bias, need_weights=False)
    torch.testing.assert_close(ours, ref.transpose(0, 1), atol=1e-5, rtol=0)


def test_positions_interpolate_only_where_the_grid_differs(tiny):
    visual = tiny.model.visual
    assert interpolate_positions(visual, visual.grid_size) is visual.positional_embedding
    pos = interpolate_positions(visual, (6, 8))
    assert pos.shape == (1 + 48, visual.positional_embedding.shape[1])
    torch.testing.assert_close(pos[0], visual.positional_embedding[0])
    with torch.no_grad():                                                     # a 48x64 input runs
        x, grid = prelast_tokens(visual, torch.zeros(1, 3, 48, 64))
        assert grid == (6, 8) and project_tokens(visual, x).shape == (1, 49, 32)
    with pytest.raises(UsageError, match="multiple of the patch size"):
        prelast_tokens(visual, torch.zeros(1, 3, 30, 32))


def test_scale_mode_interpolates_positions_as_dino_does(tiny):
    """SCLIP/ClearCLIP's interpolate_pos_encoding: scale_factor (h + 0.1) / g0, bicubic."""
    visual = tiny.model.visual
    g0, g1 = visual.grid_size
    patch = visual.positional_embedding[1:].reshape(1, g0, g1, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(patch, scale_factor=((6 + 0.1) / g0, (8 + 0.1) / g1), mode="bicubic")
    ours = interpolate_positions(visual, (6, 8), mode="scale")[1:]
    torch.testing.assert_close(ours, ref.permute(0, 2, 3, 1).reshape(48, -1))
    assert not torch.allclose(ours, interpolate_positions(visual, (6, 8))[1:])
