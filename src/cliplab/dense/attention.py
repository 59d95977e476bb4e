"""Last-block attention variants on open_clip ViT towers, as functions of (q, k, v).

The training-free segmentation methods of :mod:`cliplab.dense` all run blocks 1..L-1 of
the vision tower unchanged and replace the attention of block L.  Notation (per head,
``s = d_head ** -0.5``, tokens ``x`` with the class token first, ``h = LN1(x)``,
``q, k, v = in_proj(h)``, ``W_o`` the output projection):

=================  =====================================  ========================
variant            attention output ``o``                  used by
=================  =====================================  ========================
vanilla            ``softmax(s q kᵀ) v``                   CLIP itself
value              ``v`` (identity attention)              MaskCLIP
qq_kk              ``(softmax(s q qᵀ) + softmax(s k kᵀ)) v``  SCLIP
qq                 ``softmax(s q qᵀ) v``                   ClearCLIP
=================  =====================================  ========================

then ``z = x + W_o o`` (``residual``) or ``z = W_o o``, then ``z += MLP(LN2(z))`` (``ffn``)
and ``ln_post``, ``proj``.  :func:`last_block` computes this for one variant;
:func:`prelast_tokens` runs the tower up to the last block with the positional
embedding interpolated (bicubic) to the input's patch grid.

Functions here take and return torch tensors; they are the shared machinery of the
dense methods, not a public boundary (features leave :func:`cliplab.dense.segment` as
NumPy).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UsageError

__all__ = ["ATTENTIONS", "vanilla_attention", "value_attention", "qq_kk_attention", "qq_attention",
           "qq_kk_weights", "check_tower", "interpolate_positions", "prelast_tokens", "qkv", "last_block",
           "project_tokens"]


def vanilla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(s q kᵀ) v`` per head: q, k, v (B, H, T, d) -> (B, H, T, d)."""
    return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1) @ v


def value_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity attention (MaskCLIP's value path): returns ``v`` (B, H, T, d)."""
    return v


def qq_kk_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """SCLIP's correlative attention ``softmax(s q qᵀ) + softmax(s k kᵀ)``: (B, H, T, T), rows sum to 2."""
    return (torch.softmax((q @ q.transpose(-2, -1)) * scale, dim=-1)
            + torch.softmax((k @ k.transpose(-2, -1)) * scale, dim=-1))


def qq_kk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SCLIP: ``(softmax(s q qᵀ) + softmax(s k kᵀ)) v`` (B, H, T, d)."""
    return qq_kk_weights(q, k, scale) @ v


def qq_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """ClearCLIP: ``softmax(s q qᵀ) v`` (B, H, T, d)."""
    return torch.softmax((q @ q.transpose(-2, -1)) * scale, dim=-1) @ v


#: The variants by name (see the module table).
ATTENTIONS: dict[str, Callable] = {"vanilla": vanilla_attention, "value": value_attention,
                                   "qq_kk": qq_kk_attention, "qq": qq_attention}


def check_tower(visual) -> None:
    """Raise :class:`UsageError` unless ``visual`` is an open_clip ViT whose last block these functions can run.

    Needed: ``conv1``, ``class_embedding``, ``positional_embedding``, ``transformer.resblocks``
    ending in a block with ``nn.MultiheadAttention`` (``in_proj_weight``), ``ln_post``, ``proj``;
    no attentional pooler and no final LayerNorm after pooling.
    """
    needed = ("conv1", "class_embedding", "positional_embedding", "transformer", "ln_post")
    missing = [n for n in needed if not hasattr(visual, n)]
    if missing:
        raise UsageError(f"dense methods need an open_clip VisionTransformer tower; {type(visual).__name__} "
                         f"has no {', '.join(missing)}")
    block = visual.transformer.resblocks[-1]
    if getattr(getattr(block, "attn", None), "in_proj_weight", None) is None or hasattr(block, "ln_attn"):
        raise UsageError("dense methods need the standard open_clip attention block "
                         "(nn.MultiheadAttention with a packed in_proj); this tower has another block type")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
        raise UsageError("dense methods do not support towers with an attentional pooler or a LayerNorm "
                         "after pooling")


def interpolate_positions(visual, grid: tuple[int, int], *, mode: str = "size") -> torch.Tensor:
    """The positional embedding (1 + h*w, W) for a patch grid ``(h, w)``.

    The patch part is resized bicubically (``align_corners=False``) from the tower's own grid
    when the grids differ; the class-token position is kept.  At the tower's grid the
    embedding is returned as it is.

    ``mode="size"`` resizes to ``size=(h, w)`` (open_clip's ``resize_pos_embed``, MaskCLIP,
    CLIP-DINOiser); ``mode="scale"`` passes ``scale_factor=((h + 0.1) / g0, (w + 0.1) / g1)``
    instead, DINO's ``interpolate_pos_encoding`` as SCLIP and ClearCLIP copy it (the sampling
    positions differ slightly: features differ by about 1e-2 on a random ViT-B/16);
    ``mode="bilinear"`` resizes to ``size=(h, w)`` bilinearly (CLIP Surgery and ExCEL).
    """
    pos = visual.positional_embedding                                   # (1 + g0*g1, W)
    g0, g1 = visual.grid_size
    if tuple(grid) == (g0, g1):
        return pos
    cls, patch = pos[:1], pos[1:]
    patch = patch.reshape(1, g0, g1, -1).permute(0, 3, 1, 2)            # (1, W, g0, g1)
    if mode == "scale":
        patch = F.interpolate(patch.float(), scale_factor=((grid[0] + 0.1) / g0, (grid[1] + 0.1) / g1),
                              mode="bicubic", align_corners=False)
    else:
        patch = F.interpolate(patch.float(), size=tuple(grid), mode="bilinear" if mode == "bilinear" else "bicubic",
                              align_corners=False)
    patch = patch.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)  # (h*w, W)
    return torch.cat([cls, patch])


def _run_blocks(visual, x: torch.Tensor, blocks) -> torch.Tensor:
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    for blk in blocks:
        x = blk(x)
    return x if batch_first else x.transpose(0, 1)


def prelast_tokens(visual, images: torch.Tensor, *, upto: int = -1,
                   positions: str = "size") -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens entering block ``upto`` (default: the last one): (B, 1 + h*w, W) and the grid ``(h, w)``.

    As open_clip's ``VisionTransformer`` computes them (patch embedding, class token,
    positions interpolated by :func:`interpolate_positions` with ``mode=positions``, ``ln_pre``,
    blocks), for any
    input whose sides are multiples of the patch size.
    """
    B, _, H, W = images.shape
    ph, pw = visual.patch_size if isinstance(visual.patch_size, tuple) else (visual.patch_size,) * 2
    if H % ph or W % pw:
        raise UsageError(f"input {H}x{W} is not a multiple of the patch size {ph}x{pw}")
    grid = (H // ph, W // pw)
    x = visual.conv1(images.to(visual.conv1.weight.dtype))              # (B, W, h, w)
    x = x.reshape(B, x.shape[1], -1).permute(0, 2, 1)                   # (B, h*w, W)
    cls = visual.class_embedding.to(x.dtype).expand(B, 1, -1)
    x = torch.cat([cls, x], dim=1) + interpolate_positions(visual, grid, mode=positions).to(x.dtype)  # (B, T, W)
    x = visual.patch_dropout(x)
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    return _run_blocks(visual, x, blocks[:len(blocks) + upto if upto < 0 else upto]), grid


def qkv(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head q, k, v (B, H, T, d) of ``block`` on tokens ``x`` (B, T, W): ``in_proj(LN1(x))``."""
    attn = block.attn
    B, T, W = x.shape
    n = attn.num_heads
    y = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)   # (B, T, 3W)
    q, k, v = y.reshape(B, T, 3, n, W // n).permute(2, 0, 3, 1, 4)      # 3 x (B, H, T, d)
    return q, k, v


def last_block(block, x: torch.Tensor, attention: Callable, *, residual: bool = True,
               ffn: bool = True) -> torch.Tensor:
    """One transformer block with its attention replaced: (B, T, W) -> (B, T, W).

    ``z = [x +] ls_1(W_o attention(q, k, v))``, then ``z += ls_2(MLP(LN2(z)))`` when ``ffn``.
    With :func:`vanilla_attention`, ``residual`` and ``ffn`` this is the block itself.
    """
    B, T, W = x.shape
    q, k, v = qkv(block, x)
    scale = q.shape[-1] ** -0.5
    o = attention(q, k, v, scale).transpose(1, 2).reshape(B, T, W)      # (B, T, W)
    o = block.ls_1(block.attn.out_proj(o))
    z = x + o if residual else o
    if ffn:
        z = z + block.ls_2(block.mlp(block.ln_2(z)))
    return z


def project_tokens(visual, x: torch.Tensor) -> torch.Tensor:
    """``ln_post(x) @ proj``: (B, T, W) -> (B, T, D) (no projection: width W)."""
    x = visual.ln_post(x)
    return x @ visual.proj if getattr(visual, "proj", None) is not None else x
