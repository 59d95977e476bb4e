"""Trident: splice window features before global aggregation, with guided affinities.

Shi, Dong, Xu, "Harnessing Vision Foundation Models for High-Performance, Training-Free
Open Vocabulary Segmentation" (Trident), ICCV 2025, arXiv:2411.09219; reference code
YuHengsss/Trident (``trident.py``; ``open_clip/transformer.py`` ``custom_attn``,
``guidance_attn``).

Algorithm:

1. Per window, guide tokens ``D`` (DINO ViT-B/16 in the reference): ``S = cos(D_i, D_j)``,
   ``S' = gamma (S - beta mean S)``, entries below 0 set to -inf, ``A = softmax(S')``, shared
   by all heads (``beta`` 1.2, ``gamma`` 3).
2. CLIP's last block per window: ``o = W_o (A v)`` with ``v`` from ``LN1(x)``; no residual, no FFN.
3. Window tokens are spliced into one grid per image, overlaps averaged ("splice then segment").
4. Global aggregation over the whole image: the same affinity, computed from the guide's
   tokens of the whole image, ``F <- G F`` (the reference uses SAM ViT-B attention here).
5. ``ln_post``, ``proj``, cosine with the queries, logit scale 40.

The guide is pluggable (``guide=``): ``None`` uses the CLIP tower's own tokens entering its
last block (no extra model needed); a :class:`~cliplab.models.Backbone` uses that model's
tokens the same way; any callable ``images (B, 3, H, W) -> tokens (B, h, w, C)`` (a timm
DINO ViT's patch tokens, for instance) plugs in as it is.  DINO and SAM weights are not
bundled (no hub access here): pass them as a guide where you have them.

Deviations: SAM's mask refinement and SAM-attention aggregation are not implemented (step 4
uses the guide affinity of step 1 on the whole image); guide tokens are resized (bilinear) to
CLIP's patch grid, whereas the reference resizes CLIP's values to the guide's grid; the mean
in ``S'`` is taken per window (the reference's batch holds one window, so they agree there);
each token's own similarity is kept so that no row of ``S'`` is all -inf.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validation import check_number
from . import DENSE_METHODS
from .attention import prelast_tokens, project_tokens, qkv
from .base import DenseFeatures, DenseMethod

__all__ = ["Trident", "guided_affinity"]


def guided_affinity(tokens: torch.Tensor, *, beta: float = 1.2, gamma: float = 3.0) -> torch.Tensor:
    """Trident's affinity from guide tokens (B, N, C): softmax of ``gamma (S - beta mean S)``, negatives -inf.

    Returns (B, N, N) row-stochastic weights.
    """
    t = F.normalize(tokens.float(), dim=-1)
    s = t @ t.transpose(1, 2)                                                   # (B, N, N)
    s = (s - beta * s.mean(dim=(1, 2), keepdim=True)) * gamma
    eye = torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)
    s = s.masked_fill((s < 0) & ~eye, float("-inf"))
    return torch.softmax(s, dim=-1)


@DENSE_METHODS.register("trident", help="Trident: guided attention per window, spliced, then global aggregation")
class Trident(DenseMethod):
    """Trident (see the module docstring).

    Parameters
    ----------
    guide : None, Backbone or callable, default=None
        Token source of the affinities (see the module docstring).
    beta, gamma : float, default=1.2, 3.0
        Affinity offset and sharpness.
    """

    logit_scale = 40.0
    splice = True

    def __init__(self, *, guide=None, beta: float = 1.2, gamma: float = 3.0):
        self.guide = guide
        self.beta = check_number("beta", beta)
        self.gamma = check_number("gamma", gamma, minimum=0, strict_minimum=True)

    def _guide_tokens(self, backbone, images: torch.Tensor, grid) -> torch.Tensor:
        """Guide tokens (B, h*w, C) on CLIP's patch grid ``grid``."""
        if self.guide is None or hasattr(self.guide, "model"):
            source = backbone if self.guide is None else self.guide
            x, g = prelast_tokens(source.model.visual, images.to(source.device))
            tok = x[:, 1:].reshape(len(images), *g, -1)                         # (B, h', w', C)
        else:
            tok = self.guide(images)                                            # (B, h', w', C)
        if tuple(tok.shape[1:3]) != tuple(grid):
            tok = F.interpolate(tok.permute(0, 3, 1, 2).float(), size=tuple(grid), mode="bilinear",
                                align_corners=False).permute(0, 2, 3, 1)
        return tok.reshape(len(images), grid[0] * grid[1], -1).to(images.device)

    def features(self, backbone, images: torch.Tensor) -> DenseFeatures:
        visual = backbone.model.visual
        block = visual.transformer.resblocks[-1]
        x, grid = prelast_tokens(visual, images)                                # (B, 1 + N, W)
        _, _, v = qkv(block, x)                                                 # (B, H, T, d)
        v = v[:, :, 1:]                                                         # drop the class token
        a = guided_affinity(self._guide_tokens(backbone, images, grid), beta=self.beta, gamma=self.gamma)
        o = (a[:, None].to(v.dtype) @ v).transpose(1, 2).reshape(len(images), -1, x.shape[-1])  # (B, N, W)
        o = block.ls_1(block.attn.out_proj(o))
        return DenseFeatures(o.reshape(len(images), *grid, -1))                 # width W: spliced, then aggregated

    def aggregate(self, grid: torch.Tensor, image: torch.Tensor, backbone) -> torch.Tensor:
        h, w, W = grid.shape
        g = guided_affinity(self._guide_tokens(backbone, image[None], (h, w)), beta=self.beta, gamma=self.gamma)
        tokens = g[0].to(grid.dtype) @ grid.reshape(h * w, W)                  # (N, W)
        return project_tokens(backbone.model.visual, tokens).reshape(h, w, -1)  # (h, w, D)
