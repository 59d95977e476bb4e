"""MaskCLIP: the value path of CLIP's last block, with optional key smoothing and prompt denoising.

Zhou, Loy, Dai, "Extract Free Dense Labels from CLIP", ECCV 2022, arXiv:2112.01071;
reference code chongzhou96/MaskCLIP (``mmseg/models/backbones/vit.py`` ``return_qkv``,
``mmseg/models/decode_heads/maskclip_head.py`` ``refine_output``); OpenCLIP port in
wysoczanska/clip_dinoiser ``models/maskclip/maskclip.py`` (``extract_v``).

Algorithm (last block only)::

    z = x + W_o v;  z += MLP(LN2(z))               (identity attention; residual and FFN kept)
    f = ln_post(z) @ proj;  logits = 100 * cos(f, t_c)

Optional refinements (off by default, as in the reference configs; commented values
``pd_thresh=0.5``, ``ks_thresh=1.0``):

- prompt denoising: a class whose softmax(100 * cos) probability stays below ``pd_thresh``
  at every patch of the window gets cosine -100;
- key smoothing: patches whose top probability is below ``ks_thresh`` take
  ``K Kᵀ p``, the key-similarity-weighted sum of every patch's probabilities, where ``K``
  are the last block's keys after ``W_o`` (as the reference computes them, for all heads
  together) L2-normalised along the patch axis (the reference's ``F.normalize(k, p=2)``
  on (B, N, W) normalises dim 1, the patches; kept as it is).

Deviations: refinements run per window (the reference runs on whole images); after key
smoothing the refined probabilities are returned as ``log(p) / 100`` so that the shared
softmax reproduces them (the reference argmaxes the unnormalised ``K Kᵀ p`` directly: same
argmax).  Parity on a random-weight ViT-B-16-quickgelu: the features equal the OpenCLIP
port's ``extract_v`` exactly; ``refine_output`` of the reference, run on the same cosines
and keys, agrees to 1e-5 (probabilities) with the same argmax everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validation import check_number
from . import DENSE_METHODS
from .attention import last_block, prelast_tokens, project_tokens, qkv, value_attention
from .base import DenseFeatures, LastBlockMethod

__all__ = ["MaskCLIP", "refine_maskclip"]

_REF_SCALE = 100.0  # the reference's fixed softmax temperature in both refinements


def refine_maskclip(logits: torch.Tensor, keys: torch.Tensor | None, *, pd_thresh: float = 0.0,
                    ks_thresh: float = 0.0) -> torch.Tensor:
    """MaskCLIP's ``refine_output``: prompt denoising, then key smoothing.

    Parameters
    ----------
    logits : Tensor (B, Q, h, w)
        Cosine logits.
    keys : Tensor (B, h*w, W) or None
        Last-block keys of the patches (after ``W_o``); needed for key smoothing.
    pd_thresh, ks_thresh : float
        0 disables the step.

    Returns
    -------
    Tensor (B, Q, h, w)
        Refined logits (in cosine units: ``log(p) / 100`` after key smoothing).
    """
    out = logits.clone()
    B, Q, h, w = out.shape
    if pd_thresh > 0:
        peak = torch.softmax(out * _REF_SCALE, dim=1).reshape(B, Q, -1).max(dim=-1).values   # (B, Q)
        out[(peak < pd_thresh)[:, :, None, None].expand(B, Q, h, w)] = -100.0
    if ks_thresh > 0 and keys is not None:
        p = torch.softmax(out * _REF_SCALE, dim=1).reshape(B, Q, -1).transpose(1, 2)      # (B, N, Q)
        k = F.normalize(keys, p=2, dim=1)                                                   # (B, N, W)
        smoothed = (k @ k.transpose(1, 2)) @ p                                              # (B, N, Q)
        low = p.max(dim=-1, keepdim=True).values < ks_thresh
        p = torch.where(low, smoothed, p)
        out = (p.clamp_min(1e-12).log() / _REF_SCALE).transpose(1, 2).reshape(B, Q, h, w)
    return out


@DENSE_METHODS.register("maskclip", help="MaskCLIP: value path of the last block (+ key smoothing, prompt denoising)")
class MaskCLIP(LastBlockMethod):
    """MaskCLIP (see the module docstring).

    Parameters
    ----------
    ks_thresh : float, default=0.0
        Key-smoothing threshold (0: off; the paper's value is 1.0).
    pd_thresh : float, default=0.0
        Prompt-denoising threshold (0: off; the paper's value is 0.5).
    """

    attention = staticmethod(value_attention)
    residual = True
    ffn = True
    logit_scale = 100.0

    def __init__(self, *, ks_thresh: float = 0.0, pd_thresh: float = 0.0):
        self.ks_thresh = check_number("ks_thresh", ks_thresh, minimum=0)
        self.pd_thresh = check_number("pd_thresh", pd_thresh, minimum=0, maximum=1)

    def features(self, backbone, images: torch.Tensor) -> DenseFeatures:
        visual = backbone.model.visual
        block = visual.transformer.resblocks[-1]
        x, grid = prelast_tokens(visual, images)
        z = last_block(block, x, value_attention, residual=True, ffn=True)
        tokens = project_tokens(visual, z[:, 1:]).reshape(len(images), *grid, -1)   # (B, h, w, D)
        extras = {}
        if self.ks_thresh > 0:
            _, k, _ = qkv(block, x)                                                  # (B, H, T, d)
            k = k.transpose(1, 2).reshape(x.shape)                                   # (B, T, W)
            extras["keys"] = F.linear(k, block.attn.out_proj.weight, block.attn.out_proj.bias)[:, 1:]
        return DenseFeatures(tokens, extras)

    def refine(self, logits: torch.Tensor, feats: DenseFeatures) -> torch.Tensor:
        if self.pd_thresh <= 0 and self.ks_thresh <= 0:
            return logits
        return refine_maskclip(logits, feats.extras.get("keys"), pd_thresh=self.pd_thresh,
                               ks_thresh=self.ks_thresh)
