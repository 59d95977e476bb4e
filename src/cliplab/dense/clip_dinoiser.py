"""CLIP-DINOiser: MaskCLIP features pooled with learned patch correlations, plus a background head.

Wysoczańska, Siméoni, Ramamonjisoa, Bursuc, Trzciński, Pérez, "CLIP-DINOiser: Teaching CLIP
a few DINO tricks for open-vocabulary semantic segmentation", ECCV 2024, arXiv:2312.12359;
reference code wysoczanska/clip_dinoiser (``models/clip_dinoiser/clip_dinoiser.py``
``CLIP_DINOiser.forward_pass``, ``forward``, ``DinoCLIP.compute_weighted_pool``,
``get_dino_corrs``; ``train.py`` ``do_train``; ``configs/clip_dinoiser.yaml``).  The
background target follows FOUND (Siméoni et al., CVPR 2023, valeoai/FOUND ``bkg_seg.py``
``compute_img_bkg_seg``).

Model (two convolutions over a frozen CLIP; ``F`` are MaskCLIP's patch features (B, D, h, w)
after ``ln_post`` and ``proj``, ``X`` the output of ``ln_2`` in block ``feats_idx`` (-3), patch
tokens only, (B, W, h, w))::

    P = obj_proj(X)                  Conv2d(W -> 256, 3x3, replicate padding)
    C = P̂ᵀ P̂                          cosine of the L2-normalised columns, (B, hw, h, w)
    C[C < gamma] = 0                 gamma = 0.2
    F'_j = Σ_i C_ji F_i / (Σ_i C_ji + 1e-6)                  correlation pooling
    b = bkg_decoder(X / ‖X‖)         Conv2d(W -> 1, 1x1); sigmoid(b) > 0.5 is "foreground"
    logits = cos(F'_j, t_c)          then CLIP's softmax(100 ·)

With ``apply_found=True`` (the reference's VOC / COCO-Object setting; class 0 must then
be the background), patches whose top class probability is below ``delta`` (0.99) and whose
``sigmoid(b) <= 0.5`` get background probability 1.

Training (only the two convolutions; the CLIP model stays frozen)::

    L = BCEwithlogits(max(C, 0), 1[C_guide >= gamma]) + BCEwithlogits(b, 1[saliency > 0.5])

``C`` is used as logits as it is (cosines clamped at 0, as the reference does); ``C_guide``
is the cosine of the guide's last-block value features (DINO ViT-B/16 in the reference);
the saliency target is FOUND's.  The reference trains with AdamW (5e-5 for ``obj_proj``,
1e-2 for ``bkg_decoder``) on 1,000 ImageNet images at 448 px, batch 16, 100 epochs.

The guide is pluggable (``guide=``, see :func:`make_guide`): a
:class:`~cliplab.models.Backbone` (its last block's values, keys and class-token
attention), a timm ViT (DINO weights plug in as ``"timm:vit_base_patch16_224.dino"`` where
timm finds them; its last block's ``qkv`` is hooked as the reference hooks DINO's), a cliplab
model spec, or any callable ``images (B, 3, H, W) -> tokens (B, h, w, C)`` (correlations only).
Without a guide the CLIP model guides itself.

Without trained heads (``head=None``) the method is the reference's teacher, ``DinoCLIP``:
MaskCLIP features pooled with the guide's own thresholded correlations.

Deviations from the reference:

- The saliency target is FOUND's training-free background discovery on the guide
  (background seed = the patch least attended by the class token, heads weighted by their
  attention sparsity; background = key cosine to the seed > 0.3; saliency = the rest), not
  the trained FOUND decoder's prediction (its weights are DINO ViT-S/8 specific); a
  ``saliency`` callable (FOUND's own, for instance) replaces it.
- cliplab's one Trainer trains the heads: one learning rate for both convolutions with
  warm-up and cosine decay (the reference: two rates, a step decay at 5k steps); no
  flip/colour augmentation.
- Guide features are computed on CLIP's patch grid (the image is resized to the guide's
  patch size times CLIP's grid, or the guide's tokens are resized bilinearly to it); the
  reference feeds DINO and CLIP the same 448 px image with equal patch sizes, so the grids agree.
- The background step works per window and on the logits (probabilities written back as
  ``log(p) / 100``, as :func:`~cliplab.dense.maskclip.refine_maskclip` does), which the
  shared softmax renormalises: same argmax as the reference.

Parity on a random-weight ViT-B-16 (the reference's ``forward_pass`` and ``forward`` run
unmodified outside this repository): see ``docs/segmentation.md``.
"""

from __future__ import annotations

import abc
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DataError, UsageError
from ..train.losses import Objective
from ..validation import check_number, check_positive_int
from . import DENSE_METHODS
from .attention import _run_blocks, last_block, prelast_tokens, project_tokens, qkv, value_attention, \
    vanilla_attention
from .base import DenseFeatures, DenseMethod

logger = logging.getLogger(__name__)

__all__ = ["CLIPDinoiser", "DinoiserHeads", "ClipDinoiserObjective", "SceneImages", "Guide", "make_guide",
           "clip_dinoiser_features", "correlation_pool", "guide_correlations", "found_background",
           "train_clip_dinoiser", "save_heads", "load_heads"]

HEADS_FILE, CONFIG_FILE = "heads.safetensors", "heads.json"
FORMAT = 1
_REF_SCALE = 100.0   # the reference's softmax temperature (MaskClipHead.cls_seg)


# --------------------------------------------------------------------------------------- heads
class DinoiserHeads(nn.Module):
    """The two trainable convolutions of CLIP-DINOiser.

    Parameters
    ----------
    in_size : int
        Channels of the CLIP features ``X`` the heads read (the tower width; the embedding
        size with ``feats_idx="final"``).
    in_dim : int, default=256
        Channels of the correlation projection.
    conv_kernel : int, default=3
    feats_idx : int or "final", default=-3
        The block whose ``ln_2`` output the heads read (``"final"``: MaskCLIP's features).
    gamma : float, default=0.2
        Correlations below it are set to 0 (training targets and pooling).
    """

    def __init__(self, in_size: int, *, in_dim: int = 256, conv_kernel: int = 3, feats_idx=-3,
                 gamma: float = 0.2):
        super().__init__()
        self.config = {"in_size": int(in_size), "in_dim": int(in_dim), "conv_kernel": int(conv_kernel),
                       "feats_idx": feats_idx, "gamma": float(gamma)}
        self.in_dim = in_dim
        self.bkg_decoder = nn.Conv2d(in_size, 1, (1, 1))
        self.obj_proj = nn.Conv2d(in_size, in_dim, (conv_kernel, conv_kernel), padding=conv_kernel // 2,
                                  padding_mode="replicate")

    @property
    def feats_idx(self):
        return self.config["feats_idx"]

    @property
    def gamma(self) -> float:
        return self.config["gamma"]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Background logits (B, 1, h, w) and patch correlations (B, h*w, h, w) of features ``x`` (B, W, h, w).

        The reference's ``forward_pass`` after the CLIP features: correlations are cosines
        of ``obj_proj(x)``; the background head reads ``x`` L2-normalised over channels.
        """
        B, _, h, w = x.shape
        p = self.obj_proj(x).reshape(B, self.in_dim, -1)
        p = p / p.norm(dim=1, keepdim=True)
        corrs = torch.matmul(p.permute(0, 2, 1), p).reshape(B, h * w, h, w)
        bkg = self.bkg_decoder(x / x.norm(dim=1, keepdim=True))
        return bkg, corrs


def correlation_pool(features: torch.Tensor, corrs: torch.Tensor) -> torch.Tensor:
    """``F'_j = Σ_i C_ji F_i / (Σ_i C_ji + 1e-6)``: features (B, D, h, w), corrs (B, N, h', w') -> (B, D, h', w').

    Features on another grid than the correlations are resized bilinearly first (the
    reference's ``compute_weighted_pool``).
    """
    B = features.shape[0]
    h, w = corrs.shape[-2:]
    if tuple(features.shape[-2:]) != (h, w):
        features = F.interpolate(features, size=(h, w), mode="bilinear", align_corners=False)
    pooled = torch.einsum("bnij,bcij->bcn", corrs, features)                     # (B, D, N)
    pooled = pooled / (corrs.flatten(-2, -1).sum(dim=-1)[:, None] + 1e-6)
    return pooled.reshape(B, -1, h, w)


# ------------------------------------------------------------------------------ CLIP features
def _block_index(visual, feats_idx) -> int:
    n = len(visual.transformer.resblocks)
    if isinstance(feats_idx, bool) or not isinstance(feats_idx, (int, np.integer)) or not -n <= feats_idx < n:
        raise UsageError(f"feats_idx must be a block index in [-{n}, {n}) of this {n}-block tower or 'final'; "
                         f"got {feats_idx!r}")
    return int(feats_idx) % n


def clip_dinoiser_features(backbone, images: torch.Tensor, feats_idx=-3):
    """MaskCLIP features and the heads' input features of preprocessed windows ``images`` (B, 3, H, W).

    Returns
    -------
    features : Tensor (B, D, h, w)
        MaskCLIP's patch features after ``ln_post`` and ``proj`` (not normalised).
    inner : Tensor (B, W, h, w)
        ``ln_2`` output of block ``feats_idx`` in the unchanged forward pass, patch tokens
        (``feats_idx="final"``: ``features`` again).
    """
    visual = backbone.model.visual
    blocks = visual.transformer.resblocks
    B = len(images)
    if feats_idx == "final":
        x, grid = prelast_tokens(visual, images)
        inner = None
    else:
        b = _block_index(visual, feats_idx)
        x, grid = prelast_tokens(visual, images, upto=b)                        # tokens entering block b
        y = last_block(blocks[b], x, vanilla_attention, residual=True, ffn=False)
        inner = blocks[b].ln_2(y)[:, 1:]                                       # (B, h*w, W)
        x = _run_blocks(visual, x, blocks[b:len(blocks) - 1])                   # tokens entering the last block
    z = last_block(blocks[-1], x, value_attention, residual=True, ffn=True)
    feats = project_tokens(visual, z[:, 1:]).reshape(B, *grid, -1).permute(0, 3, 1, 2)   # (B, D, h, w)
    if inner is None:
        return feats, feats
    return feats, inner.reshape(B, *grid, -1).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------ guides
@dataclass
class GuideSignals:
    """What a guide gives, on CLIP's patch grid (N = h*w patches).

    values : Tensor (B, N, C)      correlation features (the last block's values)
    keys : Tensor (B, N, H, d)     the last block's keys per head (FOUND), or None
    cls_attention : Tensor (B, H, N)  the class token's attention to the patches (FOUND), or None
    """

    values: torch.Tensor
    keys: torch.Tensor | None = None
    cls_attention: torch.Tensor | None = None


def _renormalise(images: torch.Tensor, mean, std, mean_to, std_to) -> torch.Tensor:
    m0, s0 = torch.as_tensor(mean).view(1, 3, 1, 1), torch.as_tensor(std).view(1, 3, 1, 1)
    m1, s1 = torch.as_tensor(mean_to).view(1, 3, 1, 1), torch.as_tensor(std_to).view(1, 3, 1, 1)
    return ((images.float() * s0.to(images.device) + m0.to(images.device)) - m1.to(images.device)) / s1.to(
        images.device)


def _to_grid(t: torch.Tensor, src, grid) -> torch.Tensor:
    """(B, h'*w', C) on grid ``src`` -> (B, h*w, C) on ``grid`` (bilinear)."""
    if tuple(src) == tuple(grid):
        return t
    B, _, C = t.shape
    t = t.reshape(B, *src, C).permute(0, 3, 1, 2).float()
    t = F.interpolate(t, size=tuple(grid), mode="bilinear", align_corners=False)
    return t.permute(0, 2, 3, 1).reshape(B, grid[0] * grid[1], C)


def _qkv_signals(q, k, v, scale, prefix: int, src, grid) -> GuideSignals:
    """Signals from one block's per-head q, k, v (B, H, T, d) with ``prefix`` leading non-patch tokens."""
    B, H, T, d = q.shape
    attn = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)             # (B, H, T, T)
    cls = attn[:, :, 0, prefix:].transpose(1, 2)                               # (B, N', H)
    keys = k[:, :, prefix:].transpose(1, 2).reshape(B, -1, H * d)              # (B, N', H*d)
    values = v[:, :, prefix:].transpose(1, 2).reshape(B, -1, H * d)
    values, keys, cls = (_to_grid(t, src, grid) for t in (values, keys, cls))
    return GuideSignals(values.float(), keys.reshape(B, -1, H, d).float(), cls.transpose(1, 2).float())


class Guide(abc.ABC):
    """A token source for CLIP-DINOiser's targets; subclasses implement :meth:`signals`."""

    @abc.abstractmethod
    def signals(self, images: torch.Tensor, mean, std, grid) -> GuideSignals:
        """Signals of ``images`` (B, 3, H, W), normalised with ``mean``/``std``, on the patch ``grid`` (h, w)."""


class BackboneGuide(Guide):
    """An open_clip ViT :class:`~cliplab.models.Backbone`: its last block's values, keys and attention."""

    def __init__(self, backbone):
        from .attention import check_tower

        check_tower(backbone.model.visual)
        self.backbone = backbone

    def __repr__(self) -> str:
        return f"BackboneGuide({getattr(self.backbone, 'name', '?')})"

    def signals(self, images, mean, std, grid) -> GuideSignals:
        bb = self.backbone
        visual = bb.model.visual
        cfg = bb.preprocess_cfg
        x = _renormalise(images, mean, std, cfg.get("mean", mean), cfg.get("std", std))
        p = visual.patch_size[0] if isinstance(visual.patch_size, tuple) else int(visual.patch_size)
        size = (grid[0] * p, grid[1] * p)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        tokens, src = prelast_tokens(visual, x.to(bb.device))
        q, k, v = qkv(visual.transformer.resblocks[-1], tokens)
        return _qkv_signals(q, k, v, q.shape[-1] ** -0.5, 1, src, grid)


class TimmGuide(Guide):
    """A timm ViT (``blocks[-1].attn.qkv`` hooked, as the reference hooks DINO's last block)."""

    def __init__(self, model):
        if not (hasattr(model, "blocks") and hasattr(model, "patch_embed")):
            raise UsageError(f"a timm guide must be a timm VisionTransformer; got {type(model).__name__}")
        self.model = model.eval()
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))

    def __repr__(self) -> str:
        return f"TimmGuide({type(self.model).__name__})"

    def signals(self, images, mean, std, grid) -> GuideSignals:
        m = self.model
        x = _renormalise(images, mean, std, self.mean, self.std)
        ps = m.patch_embed.patch_size
        ps = ps if isinstance(ps, (tuple, list)) else (ps, ps)
        if getattr(m, "dynamic_img_size", False):
            size = (grid[0] * ps[0], grid[1] * ps[1])
        else:
            size = tuple(m.patch_embed.img_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        store = {}
        attn = m.blocks[-1].attn
        hook = attn.qkv.register_forward_hook(lambda mod, inp, out: store.__setitem__("qkv", out))
        try:
            m.forward_features(x.to(next(m.parameters()).device))
        finally:
            hook.remove()
        B, T, C3 = store["qkv"].shape
        H = attn.num_heads
        q, k, v = store["qkv"].reshape(B, T, 3, H, C3 // 3 // H).permute(2, 0, 3, 1, 4)  # (B, H, T, d)
        q, k = getattr(attn, "q_norm", nn.Identity())(q), getattr(attn, "k_norm", nn.Identity())(k)
        prefix = int(getattr(m, "num_prefix_tokens", 1))
        src = (size[0] // ps[0], size[1] // ps[1])
        return _qkv_signals(q, k, v, float(attn.scale), prefix, src, grid)


class CallableGuide(Guide):
    """Any callable ``images (B, 3, H, W) -> tokens (B, h, w, C)``; correlations only (no FOUND target)."""

    def __init__(self, fn):
        self.fn = fn

    def __repr__(self) -> str:
        return f"CallableGuide({getattr(self.fn, '__name__', type(self.fn).__name__)})"

    def signals(self, images, mean, std, grid) -> GuideSignals:
        tok = self.fn(images)
        B, h, w, C = tok.shape
        return GuideSignals(_to_grid(tok.reshape(B, h * w, C).float(), (h, w), grid).to(images.device))


def make_guide(guide, backbone=None) -> Guide:
    """A :class:`Guide` from what a user passes as ``guide=``.

    ``None``: ``backbone`` itself; a Backbone; a timm ViT module; ``"timm:NAME"`` (timm's
    ``create_model(NAME, pretrained=True)``: the weights come from timm's cache, e.g.
    ``"timm:vit_base_patch16_224.dino"``, or are fetched by timm); another string: a cliplab
    model spec (:func:`cliplab.load`); a :class:`Guide`; any callable images -> tokens (B, h, w, C).
    """
    if isinstance(guide, Guide):
        return guide
    if guide is None:
        if backbone is None:
            raise UsageError("no guide and no backbone to guide itself")
        return BackboneGuide(backbone)
    if isinstance(guide, str):
        if guide.startswith("timm:"):
            try:
                import timm
            except ImportError:
                raise UsageError("timm guides need the timm package (pip install timm)") from None
            try:
                model = timm.create_model(guide[len("timm:"):], pretrained=True)
            except Exception as e:    # timm raises many kinds (unknown name, no weights offline)
                raise UsageError(f"could not create the timm guide {guide!r}: {e}") from None
            return TimmGuide(model)
        from ..models.loading import load

        return BackboneGuide(load(guide))
    if all(hasattr(guide, a) for a in ("model", "encode_images", "preprocess_cfg")):
        return BackboneGuide(guide)
    if isinstance(guide, nn.Module) and hasattr(guide, "blocks") and hasattr(guide, "patch_embed"):
        return TimmGuide(guide)
    if callable(guide):
        return CallableGuide(guide)
    raise UsageError(f"guide must be a Backbone, a timm ViT, 'timm:NAME', a model spec or a callable; "
                     f"got {type(guide).__name__}")


def guide_correlations(values: torch.Tensor, gamma: float | None = 0.2) -> torch.Tensor:
    """The reference's ``get_dino_corrs``: patch cosines of ``values`` (B, N, C) -> (B, N, N), < ``gamma`` set to 0."""
    v = values / values.norm(dim=-1, keepdim=True)
    corrs = v @ v.transpose(1, 2)
    if gamma is not None:
        corrs = corrs.masked_fill(corrs < gamma, 0.0)
    return corrs


def found_background(cls_attention: torch.Tensor, keys: torch.Tensor, *, th_bkg: float = 0.3,
                     epsilon: float = 1e-10) -> torch.Tensor:
    """FOUND's background discovery (``compute_img_bkg_seg``): (B, N) bool, True on the background.

    Parameters
    ----------
    cls_attention : Tensor (B, H, N)
        The class token's attention to the patches, per head.
    keys : Tensor (B, N, H, d)
        The same block's keys.
    th_bkg : float, default=0.3
        Key-cosine threshold to the background seed.

    Heads are weighted by ``beta = log(Σ_h Q_h / Q_h)`` where ``Q_h`` is the fraction of
    patches head ``h`` attends above the image's mean attention (CroW sparsity weighting);
    the seed is the patch with the least weighted attention.
    """
    B, H, N = cls_attention.shape
    att = cls_attention
    threshold = att.reshape(B, -1).mean(dim=1)
    Q = (att > threshold[:, None, None]).sum(dim=2) / N                        # (B, H)
    beta = torch.log((Q + epsilon).sum(dim=1)[:, None] / (Q + epsilon))        # (B, H)
    descs = F.normalize((keys * beta[:, None, :, None]).reshape(B, N, -1), dim=-1, p=2)
    cos = descs @ descs.transpose(1, 2)                                        # (B, N, N)
    seed = (att * beta[:, :, None]).sum(dim=1).argmin(dim=-1)                  # (B,)
    return cos[torch.arange(B), seed] > th_bkg


# -------------------------------------------------------------------------------- the method
def _norm_stats(backbone):
    cfg = backbone.preprocess_cfg
    return (tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
            tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))))


@DENSE_METHODS.register("clip-dinoiser",
                        help="CLIP-DINOiser: MaskCLIP features pooled with learned (or guide) patch correlations")
class CLIPDinoiser(DenseMethod):
    """CLIP-DINOiser (see the module docstring).

    Parameters
    ----------
    head : path, DinoiserHeads or None, default=None
        Trained heads (a folder written by :func:`save_heads` / :func:`train_clip_dinoiser`).
        ``None``: pool with the guide's correlations instead (the reference's ``DinoCLIP``).
    guide : see :func:`make_guide`, default=None
        Used only without ``head`` (correlations) or for ``apply_found`` without ``head``.
    gamma : float, optional
        Correlation threshold (default: the heads' own, else 0.2).
    delta : float, default=0.99
        ``apply_found``: top probability below which a patch counts as uncertain.
    apply_found : bool, default=False
        Uncertain patches the background head (or, without heads, FOUND's discovery on the
        guide) calls background get class 0 (which must be the background class).
    """

    logit_scale = 100.0

    def __init__(self, *, head=None, guide=None, gamma: float | None = None, delta: float = 0.99,
                 apply_found: bool = False):
        if head is not None and not isinstance(head, DinoiserHeads):
            head = load_heads(head)
        self.head = head
        self.guide = guide
        self.gamma = check_number("gamma", head.gamma if gamma is None and head is not None
                                  else 0.2 if gamma is None else gamma, minimum=-1, maximum=1)
        self.delta = check_number("delta", delta, minimum=0, maximum=1)
        self.apply_found = bool(apply_found)
        self._guide = None

    def prepare(self, backbone) -> None:
        super().prepare(backbone)
        if self.head is not None:
            if self.head.feats_idx != "final":
                _block_index(backbone.model.visual, self.head.feats_idx)
            width = backbone.model.visual.transformer.width if self.head.feats_idx != "final" else backbone.embed_dim
            if width != self.head.config["in_size"]:
                raise UsageError(f"the CLIP-DINOiser heads read {self.head.config['in_size']} channels; this model "
                                 f"gives {width}: train heads for it")
            self.head.to(backbone.device).eval()
        elif self._guide is None or self.guide is None:     # no guide: this backbone guides itself
            self._guide = make_guide(self.guide, backbone)

    def features(self, backbone, images: torch.Tensor) -> DenseFeatures:
        if self.head is None and self._guide is None:
            self.prepare(backbone)
        if self.head is not None:
            feats, inner = clip_dinoiser_features(backbone, images, self.head.feats_idx)
            bkg, corrs = self.head(inner.to(next(self.head.parameters()).dtype))
            foreground = torch.sigmoid(bkg[:, 0]) > 0.5                             # (B, h, w)
        else:
            feats, _ = clip_dinoiser_features(backbone, images, "final")
            B, _, h, w = feats.shape
            mean, std = _norm_stats(backbone)
            sig = self._guide.signals(images, mean, std, (h, w))
            corrs = guide_correlations(sig.values, None).reshape(B, h * w, h, w)
            foreground = None
            if self.apply_found:
                if sig.cls_attention is None:
                    raise UsageError("apply_found without trained heads needs a guide with attention (a Backbone "
                                     "or a timm ViT), not a token callable")
                foreground = ~found_background(sig.cls_attention, sig.keys).reshape(B, h, w)
        corrs = corrs.masked_fill(corrs < self.gamma, 0.0) if self.gamma is not None else corrs
        pooled = correlation_pool(feats.to(corrs.dtype), corrs)                     # (B, D, h, w)
        extras = {"foreground": foreground} if self.apply_found else {}
        return DenseFeatures(pooled.permute(0, 2, 3, 1), extras)

    def refine(self, logits: torch.Tensor, feats: DenseFeatures) -> torch.Tensor:
        if not self.apply_found:
            return logits
        p = torch.softmax(logits * _REF_SCALE, dim=1)                             # (B, Q, h, w)
        owner = feats.extras.get("query_owner")
        background = (torch.arange(p.shape[1]) == 0) if owner is None else torch.as_tensor(owner) == 0
        uncertain = p.max(dim=1).values < self.delta                               # (B, h, w)
        set_bkg = uncertain & ~feats.extras["foreground"].to(p.device)
        p = p.permute(0, 2, 3, 1).clone()                                          # (B, h, w, Q)
        rows = p[set_bkg]
        rows[:, background.to(p.device)] = 1.0
        p[set_bkg] = rows
        return p.permute(0, 3, 1, 2).clamp_min(1e-12).log() / _REF_SCALE


# ---------------------------------------------------------------------------------- training
class ClipDinoiserObjective(Objective):
    """The reference's two BCE losses, with targets from a guide on the fly (for cliplab's Trainer).

    The model the Trainer trains is a :class:`DinoiserHeads`; the frozen CLIP ``backbone``
    and the guide live here (not as submodules: they are neither trained nor checkpointed).

    Parameters
    ----------
    backbone : Backbone
    guide : Guide
    saliency : callable, optional
        ``images (B, 3, H, W) -> (B, h', w')`` foreground probabilities replacing FOUND's
        discovery on the guide (FOUND's own decoder, for instance).
    """

    needs_captions = False
    name = "clip-dinoiser"

    def __init__(self, backbone, guide: Guide, *, feats_idx=-3, gamma: float = 0.2, saliency=None,
                 precomputed: bool = False, **kw):
        super().__init__(**kw)
        self._ctx = (backbone, guide, saliency)                                   # not submodules: never trained
        self.feats_idx, self.gamma = feats_idx, gamma
        self.needs_targets = bool(precomputed)

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> dict:
        """Frozen inputs and targets of preprocessed ``images`` (B, 3, H, W).

        ``inner`` (B, W, h, w): the heads' input; ``corr_target`` (B, N, N) bool: guide
        cosine >= gamma; ``fg_target`` (B, h, w) bool: FOUND's foreground (absent for a
        token-callable guide without ``saliency``).
        """
        backbone, guide, saliency = self._ctx
        images = images.to(backbone.device)
        _, inner = clip_dinoiser_features(backbone, images, self.feats_idx)
        B, _, h, w = inner.shape
        mean, std = _norm_stats(backbone)
        sig = guide.signals(images, mean, std, (h, w))
        out = {"inner": inner.float(), "corr_target": guide_correlations(sig.values, self.gamma) > 0}
        if saliency is not None:
            sal = saliency(images).float()[:, None]
            out["fg_target"] = F.interpolate(sal, size=(h, w), mode="bilinear", align_corners=False)[:, 0] > 0.5
        elif sig.cls_attention is not None:
            out["fg_target"] = ~found_background(sig.cls_attention, sig.keys).reshape(B, h, w)
        return out

    def forward_model(self, model: DinoiserHeads, batch) -> dict:
        t = batch.targets if batch.targets is not None else self.targets(batch.images)
        device = batch.images.device
        bkg, corrs = model(t["inner"].to(device).float())
        return {"bkg": bkg, "corrs": corrs, "corr_target": t["corr_target"].to(device),
                "fg_target": t["fg_target"].to(device) if "fg_target" in t else None}

    def forward(self, outputs: dict, batch=None) -> dict:
        corrs = outputs["corrs"].clamp_min(0.0)                                      # pred_corrs[pred_corrs < 0] = 0
        terms = {"corr": F.binary_cross_entropy_with_logits(
            corrs.flatten(-2, -1), outputs["corr_target"].float())}
        if outputs["fg_target"] is not None:
            terms["bkg"] = F.binary_cross_entropy_with_logits(
                outputs["bkg"][:, 0].flatten(-2, -1), outputs["fg_target"].float().flatten(-2, -1))
        return terms


class SceneImages(torch.utils.data.Dataset):
    """Images only (no captions) at ``size`` px: a list of arrays, or dense ShapesWorld scenes (``shapes:seg``).

    Parameters
    ----------
    images : sequence of uint8 arrays (H, W, 3), optional
        Resized (bicubic) to ``size``; default: ``n`` scenes of :func:`~cliplab.data.shapes.dense.dense_world`'s
        ``split``, rendered on first use.
    size : int
    n : int, default=512
    split : str, default="train"
    seed : int, default=0
    """

    def __init__(self, images=None, *, size: int, n: int = 512, split: str = "train", seed: int = 0):
        self.size = check_positive_int("size", size)
        self.images = list(images) if images is not None else None
        self.n = len(self.images) if self.images is not None else check_positive_int("n", n)
        self.split, self.seed = split, seed
        self._world = None
        self._cache: dict = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i not in self._cache:
            if self.images is not None:
                img = self.images[i]
            else:
                from ..data.shapes.dense import dense_scene, dense_world

                if self._world is None:
                    self._world = dense_world(seed=self.seed)
                img = dense_scene(self._world, self.split, i).image
            from PIL import Image

            pil = Image.fromarray(np.asarray(img, np.uint8)).convert("RGB")
            self._cache[i] = np.asarray(pil.resize((self.size, self.size), Image.BICUBIC), np.uint8)
        return self._cache[i], None


class _Precomputed(torch.utils.data.Dataset):
    """Training items with the objective's frozen inputs and targets computed once (no augmentation)."""

    def __init__(self, train_set, objective: ClipDinoiserObjective, preprocess_cfg: dict, *, chunk: int = 32,
                 progress=None):
        from .._progress import progress_bar
        from ..models.transforms import images_to_tensor

        self.images, self.targets = [], []
        with progress_bar(total=len(train_set), progress=progress, desc="clip-dinoiser targets",
                          unit="image") as bar:
            for s in range(0, len(train_set), chunk):
                imgs = [train_set[i][0] for i in range(s, min(s + chunk, len(train_set)))]
                t = objective.targets(images_to_tensor(imgs, None, preprocess_cfg))
                for j in range(len(imgs)):
                    self.targets.append({k: v[j].cpu().numpy() for k, v in t.items()})
                self.images += imgs
                bar.update(len(imgs))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], None, {"targets": self.targets[i]}


def train_clip_dinoiser(backbone, guide=None, *, images=None, steps: int = 300, batch_size: int = 16,
                        lr: float = 1e-3, warmup_steps: int = 20, weight_decay: float = 0.0, seed: int = 0,
                        feats_idx=-3, in_dim: int = 256, gamma: float = 0.2, saliency=None, precompute: bool = True,
                        out=None, progress: bool | None = None) -> DinoiserHeads:
    """Train CLIP-DINOiser's heads over a frozen ``backbone`` with cliplab's Trainer.

    Parameters
    ----------
    backbone : Backbone
        An open_clip ViT; stays frozen.
    guide : see :func:`make_guide`, default=None (the backbone guides itself)
    images : Dataset or sequence of uint8 arrays, optional
        Training images; default 512 dense ShapesWorld scenes (``shapes:seg`` train split)
        at the model's input size.  A dataset must yield ``(image, captions)`` items.
    steps, batch_size, lr, warmup_steps, weight_decay, seed
        The Trainer's schedule (AdamW, warm-up then cosine).
    feats_idx, in_dim, gamma
        Heads' options (see :class:`DinoiserHeads`).
    saliency : callable, optional
        Foreground probabilities replacing FOUND's discovery (see :class:`ClipDinoiserObjective`).
    precompute : bool, default=True
        Compute the frozen CLIP features and the guide's targets once per image before
        training (items are not augmented, so every epoch would recompute the same);
        ``False`` computes them in every step.
    out : path, optional
        Folder for the heads (``heads.safetensors`` + ``heads.json``) and the run's
        ``metrics.jsonl``; default a temporary folder, removed afterwards.

    Returns
    -------
    DinoiserHeads
        Trained, in eval mode.

    Raises
    ------
    UsageError
        A tower the heads cannot read; bad options.
    """
    import tempfile

    from ..train import TrainConfig, Trainer
    from ..validation import check_backbone
    from .attention import check_tower

    check_backbone("backbone", backbone)
    visual = backbone.model.visual
    check_tower(visual)
    if feats_idx != "final":
        _block_index(visual, feats_idx)
    guide = make_guide(guide, backbone)
    in_size = visual.transformer.width if feats_idx != "final" else backbone.embed_dim
    torch.manual_seed(seed)
    heads = DinoiserHeads(in_size, in_dim=in_dim, feats_idx=feats_idx, gamma=gamma)
    if images is None:
        train_set = SceneImages(size=backbone.image_size, seed=seed)
    elif isinstance(images, torch.utils.data.Dataset):
        train_set = images
    else:
        train_set = SceneImages(images, size=backbone.image_size)
    mean, std = _norm_stats(backbone)
    pp = {"size": [backbone.image_size] * 2, "mean": list(mean), "std": list(std)}
    objective = ClipDinoiserObjective(backbone, guide, feats_idx=feats_idx, gamma=gamma, saliency=saliency,
                                      precomputed=precompute)
    frozen = [p.requires_grad for p in backbone.model.parameters()]
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    was_training = backbone.model.training
    backbone.model.eval()
    tmp = tempfile.TemporaryDirectory() if out is None else None
    run_dir = Path(tmp.name if tmp is not None else out)
    try:
        if precompute:
            train_set = _Precomputed(train_set, objective, pp, progress=progress)
        config = TrainConfig(steps=check_positive_int("steps", steps), batch_size=batch_size, lr=lr,
                             warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=None, seed=seed,
                             ckpt_every=0, log_every=max(1, min(10, steps)), out_dir=str(run_dir / "run"),
                             device=str(backbone.device))
        Trainer(heads, None, None, train_set, config, objective=objective, preprocess_cfg=pp,
                progress=progress).fit()
    finally:
        for p, g in zip(backbone.model.parameters(), frozen):
            p.requires_grad_(g)
        backbone.model.train(was_training)
        if tmp is not None:
            tmp.cleanup()
    heads.eval()
    heads.config.update({"guide": repr(guide), "backbone": getattr(backbone, "name", ""), "steps": int(steps)})
    if out is not None:
        save_heads(heads, out)
    return heads


# ------------------------------------------------------------------------------ save / load
def save_heads(heads: DinoiserHeads, directory) -> Path:
    """Write ``heads.safetensors`` (the 4 tensors, the reference's names) and ``heads.json`` into ``directory``."""
    from safetensors.torch import save_file

    from .. import __version__

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    save_file(tensors, str(out / HEADS_FILE))
    meta = {"format": FORMAT, "class": "DinoiserHeads", "cliplab_version": __version__, "config": heads.config}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out


def load_heads(directory) -> DinoiserHeads:
    """The heads saved by :func:`save_heads` in ``directory``.

    Raises
    ------
    DataError
        Not a folder of saved heads.
    """
    from safetensors.torch import load_file

    d = Path(directory)
    try:
        meta = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(d / HEADS_FILE))
        cfg = dict(meta["config"])
        heads = DinoiserHeads(cfg["in_size"], in_dim=cfg["in_dim"], conv_kernel=cfg["conv_kernel"],
                              feats_idx=cfg["feats_idx"], gamma=cfg["gamma"])
        heads.load_state_dict(tensors)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise DataError(f"{d} is not a folder of CLIP-DINOiser heads ({CONFIG_FILE} + {HEADS_FILE}): {e}") from None
    heads.config.update({k: v for k, v in cfg.items() if k not in heads.config})
    return heads.eval()
