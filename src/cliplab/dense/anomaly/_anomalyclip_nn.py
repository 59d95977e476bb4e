"""The torch side of AnomalyCLIP: DPAM features, learnable prompts, the glocal loss.

The method, its training and its prompt files are in :mod:`cliplab.dense.anomaly.anomalyclip`
(which documents the algorithm); this module is imported only when they run, so that listing
the anomaly methods (``cliplab --help``) imports no torch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import UsageError
from ...train.losses import Objective

__all__ = ["AnomalyCLIPPrompts", "AnomalyCLIPModel", "GlocalLoss", "MaskedImages", "vv_attention",
           "dpam_features", "encode_deep_prompts", "default_layers", "focal_loss", "dice_loss", "TEMPERATURE"]

TEMPERATURE = 0.07
NORMAL_PROMPT = "{} object."
ABNORMAL_PROMPT = "{} damaged object."


# ------------------------------------------------------------------ vision: DPAM
def vv_attention(v: torch.Tensor, scale: float) -> torch.Tensor:
    """DPAM's V-V self-attention per head: ``softmax(s v vᵀ) v``, (B, H, T, d) -> (B, H, T, d)."""
    return torch.softmax((v @ v.transpose(-2, -1)) * scale, dim=-1) @ v


def default_layers(n_layers: int) -> tuple[int, ...]:
    """Feature layers (1-based) of a tower of ``n_layers`` blocks: ``round(L k / 4)``, k = 1..4 (6, 12, 18, 24 at L = 24)."""
    return tuple(sorted({max(1, int(round(n_layers * k / 4))) for k in range(1, 5)}))


def _run_block(visual, block, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """One open_clip block on batch-first tokens (B, T, W), whatever the transformer's layout."""
    if getattr(visual.transformer, "batch_first", True):
        return block(x, attn_mask=attn_mask)
    return block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)


def dpam_features(visual, images: torch.Tensor, feature_layers, dpam_layers: int):
    """Global embedding and DPAM patch embeddings of a batch (module docstring, step 2).

    Parameters
    ----------
    visual : open_clip VisionTransformer
    images : Tensor (B, 3, S, S)
        Preprocessed.
    feature_layers : sequence of int
        1-based block indices whose output gives patch features.
    dpam_layers : int
        Number of last blocks with the V-V path (the reference's ``DPAM_layer - 1``); 0: none
        (patch features from the original path).

    Returns
    -------
    global_feats : Tensor (B, D)
        Pooled and projected output of the unchanged tower (not normalised).
    patch_feats : list of Tensor (B, P, D)
        ``ln_post`` + ``proj`` of the parallel path's patch tokens at each feature layer.
    grid : tuple of int
    """
    from ..attention import prelast_tokens, project_tokens, qkv

    x, grid = prelast_tokens(visual, images, upto=0)                   # (B, 1 + P, W) after ln_pre
    blocks = visual.transformer.resblocks
    start = len(blocks) - dpam_layers
    wanted = set(int(i) for i in feature_layers)
    side, out = None, []
    for i, block in enumerate(blocks):
        if i >= start:
            B, T, W = x.shape
            _, _, v = qkv(block, x)                                      # (B, H, T, d) from LN1(x), original path
            o = vv_attention(v, v.shape[-1] ** -0.5).transpose(1, 2).reshape(B, T, W)
            o = block.ls_1(block.attn.out_proj(o))
            side = (x if side is None else side) + o                    # the V-V path: residual, no FFN
        x = _run_block(visual, block, x)                                 # the original path
        if i + 1 in wanted:
            out.append(project_tokens(visual, side if side is not None else x)[:, 1:])   # (B, P, D)
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled, out, grid


# ------------------------------------------------------------------ text: learnable prompts
class AnomalyCLIPPrompts(torch.nn.Module):
    """The learnable parameters of AnomalyCLIP: two context prompts and the deep text tokens.

    Parameters
    ----------
    width : int
        Width W of the text tower's token embeddings.
    n_ctx : int, default=12
        Learnable words E of each prompt.
    text_ctx : int, default=4
        Deep tokens per text layer (must be <= ``n_ctx``).
    text_depth : int, default=9
        The deep tokens replace positions 1..``text_ctx`` at the input of text layers
        1..``text_depth - 1`` (0-based); 1 disables them.
    seed : int, default=0
        Seeds the N(0, 0.02) initialisation.

    Attributes
    ----------
    ctx_normal, ctx_abnormal : Parameter (n_ctx, W)
    deep : Parameter (text_depth - 1, text_ctx, W)
    """

    def __init__(self, width: int, *, n_ctx: int = 12, text_ctx: int = 4, text_depth: int = 9, seed: int = 0):
        super().__init__()
        if not 1 <= text_ctx <= n_ctx or text_depth < 1:
            raise UsageError(f"AnomalyCLIP prompts need 1 <= text_ctx <= n_ctx and text_depth >= 1, got "
                             f"n_ctx={n_ctx}, text_ctx={text_ctx}, text_depth={text_depth}")
        g = torch.Generator().manual_seed(seed)
        self.config = {"width": int(width), "n_ctx": int(n_ctx), "text_ctx": int(text_ctx),
                       "text_depth": int(text_depth)}
        self.ctx_normal = torch.nn.Parameter(torch.randn(n_ctx, width, generator=g) * 0.02)
        self.ctx_abnormal = torch.nn.Parameter(torch.randn(n_ctx, width, generator=g) * 0.02)
        self.deep = torch.nn.Parameter(torch.randn(text_depth - 1, text_ctx, width, generator=g) * 0.02)

    def text_features(self, clip_model, tokenize) -> torch.Tensor:
        """``(g_n, g_a)``: (2, D), L2-normalised, through the frozen text tower of ``clip_model``.

        ``tokenize`` maps strings to token ids (B, T) (``Backbone.tokenize``).
        """
        n = self.config["n_ctx"]
        filler = " ".join(["X"] * n)
        tokens = tokenize([NORMAL_PROMPT.format(filler), ABNORMAL_PROMPT.format(filler)])
        tokens = tokens.to(self.ctx_normal.device)                        # (2, T)
        emb = clip_model.token_embedding(tokens).to(self.ctx_normal.dtype)  # (2, T, W)
        ctx = torch.stack([self.ctx_normal, self.ctx_abnormal])           # (2, E, W)
        x = torch.cat([emb[:, :1], ctx, emb[:, 1 + n:]], dim=1)            # SOT, [V1..VE], words
        return F.normalize(encode_deep_prompts(clip_model, x, tokens, self.deep), dim=-1)


def encode_deep_prompts(model, x: torch.Tensor, tokens: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
    """Text features (B, D) of token embeddings ``x`` (B, T, W) with deep prompts (reference
    ``ResidualAttentionBlock_learnable_token``): layer ``i`` = 1..len(deep) gets positions
    1..t of its input replaced by ``deep[i - 1]`` (t, W)."""
    from open_clip.transformer import text_global_pool

    B, T, _ = x.shape
    x = x + model.positional_embedding[:T].to(x.dtype)
    mask = model.attn_mask[:T, :T] if model.attn_mask is not None else None
    t = deep.shape[1]
    for i, block in enumerate(model.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[:, :1], deep[i - 1].expand(B, -1, -1), x[:, 1 + t:]], dim=1)
        x = _run_block(model, block, x, attn_mask=mask)
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection if model.text_projection is not None else x


# ------------------------------------------------------------------ the model the Trainer trains
class AnomalyCLIPModel(torch.nn.Module):
    """Frozen CLIP + learnable prompts: images (B, 3, S, S) -> image logits and per-layer maps.

    Parameters
    ----------
    backbone : Backbone
        Its open_clip model is kept in eval mode (:func:`~cliplab.dense.anomaly.anomalyclip.train_anomalyclip`
        freezes it while training).
    prompts : AnomalyCLIPPrompts
    feature_layers : sequence of int, optional
        Default :func:`default_layers` of the vision tower.
    dpam_layers : int, optional
        Default: from the first feature layer to the last block.
    """

    def __init__(self, backbone, prompts: AnomalyCLIPPrompts, *, feature_layers=None, dpam_layers=None):
        super().__init__()
        from ..attention import check_tower

        self.clip = backbone.model
        check_tower(self.clip.visual)
        self.prompts = prompts
        self._tokenize = backbone.tokenize
        self.image_size = backbone.image_size
        n = len(self.clip.visual.transformer.resblocks)
        self.feature_layers = tuple(feature_layers or default_layers(n))
        if not all(1 <= i <= n for i in self.feature_layers):
            raise UsageError(f"feature layers must lie in 1..{n}, got {list(self.feature_layers)}")
        self.dpam_layers = n - min(self.feature_layers) + 1 if dpam_layers is None else int(dpam_layers)
        if not 0 <= self.dpam_layers <= n:
            raise UsageError(f"dpam_layers must lie in 0..{n}, got {self.dpam_layers}")
        self.clip.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()                                                 # frozen: no dropout, ever
        return self

    def forward(self, images: torch.Tensor) -> dict:
        """``{"image_logits": (B, 2), "maps": [(B, 2, S, S) per feature layer]}``; maps are probabilities."""
        with torch.no_grad():
            glob, patches, grid = dpam_features(self.clip.visual, images, self.feature_layers, self.dpam_layers)
        text = self.prompts.text_features(self.clip, self._tokenize)                 # (2, D)
        logits = F.normalize(glob.float(), dim=-1) @ text.T / TEMPERATURE            # (B, 2)
        maps = []
        for f in patches:
            s = torch.softmax(F.normalize(f.float(), dim=-1) @ text.T / TEMPERATURE, dim=-1)   # (B, P, 2)
            s = s.transpose(1, 2).reshape(len(s), 2, *grid)                            # (B, 2, h, w)
            maps.append(F.interpolate(s, size=images.shape[-2:], mode="bilinear", align_corners=False))
        return {"image_logits": logits, "maps": maps}


# ------------------------------------------------------------------ losses
def focal_loss(probs: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on probabilities, as the reference's ``FocalLoss()`` computes it (alpha = 1).

    ``probs`` (B, C, H, W) (softmax over C), ``target`` (B, H, W) class indices.  The one-hot
    target is clamped to ``[smooth / (C - 1), 1 - smooth]``, ``p_t = Σ_c onehot_c p_c + smooth``
    and the loss is ``mean(-(1 - p_t)^γ log p_t)`` over all pixels (Lin et al. 2017).
    """
    C = probs.shape[1]
    p = probs.permute(0, 2, 3, 1).reshape(-1, C)                         # (N, C)
    onehot = F.one_hot(target.reshape(-1).long(), C).to(p.dtype)
    onehot = onehot.clamp(smooth / (C - 1), 1.0 - smooth)
    pt = (onehot * p).sum(1) + smooth
    return (-(1 - pt) ** gamma * pt.log()).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary Dice loss: ``1 - mean_b (2 Σ x y + 1) / (Σ x + Σ y + 1)``; pred, target (B, H, W)."""
    x, y = pred.reshape(len(pred), -1), target.reshape(len(target), -1).to(pred.dtype)
    return 1 - ((2 * (x * y).sum(1) + 1) / (x.sum(1) + y.sum(1) + 1)).mean()


class GlocalLoss(Objective):
    """AnomalyCLIP's glocal loss (module docstring, step 4) as a Trainer objective.

    Items of the training set: ``(image, None, {"targets": {"label": int, "mask": (S, S)}})``.
    Terms: ``image`` (cross-entropy of the global logits), ``focal`` and ``dice`` (summed
    over the feature layers, times ``lam``).

    Parameters
    ----------
    lam : float, default=4.0
        Weight of the local (pixel) terms.
    gamma : float, default=2.0
    """

    needs_captions = False
    needs_targets = True

    def __init__(self, *, lam: float = 4.0, gamma: float = 2.0, rank: int = 0, world_size: int = 1):
        super().__init__(rank=rank, world_size=world_size)
        self.lam, self.gamma = lam, gamma

    def forward_model(self, model, batch):
        return model(batch.images)

    def forward(self, outputs, batch=None):
        label = batch.targets["label"].long().reshape(-1)                # (B,)
        mask = (batch.targets["mask"] > 0.5).float()                     # (B, S, S)
        focal = sum(focal_loss(s, mask, gamma=self.gamma) for s in outputs["maps"])
        dice = sum(dice_loss(s[:, 1], mask) + dice_loss(s[:, 0], 1 - mask) for s in outputs["maps"])
        return {"image": F.cross_entropy(outputs["image_logits"], label),
                "focal": self.lam * focal, "dice": self.lam * dice}


class MaskedImages:
    """Training items ``(image, None, {"targets": {"label", "mask"}})`` with masks at the model size S.

    Square images are resized to S x S once (bicubic, as the Backbone's preprocess does for
    a square image) and kept, so that the Trainer takes its fast path; other images go to
    the Trainer's preprocess as they are (their masks are resized to S x S, as the evaluation
    assumes square images).
    """

    def __init__(self, images, labels, masks, size: int):
        self.images, self.labels, self.masks, self.size = images, labels, masks, size
        self._cache: dict = {}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        if i not in self._cache:
            self._cache[i] = self._load(i)
        image, mask = self._cache[i]
        return image, None, {"targets": {"label": np.int64(self.labels[i]), "mask": mask}}

    def _load(self, i: int):
        from PIL import Image

        from ...data.anomaly_folder import resize_mask
        from ...data.images import load_image

        image = self.images[i]
        image = Image.fromarray(image) if isinstance(image, np.ndarray) else load_image(image)
        image = image.convert("RGB")
        if image.width == image.height:
            image = image.resize((self.size, self.size), Image.BICUBIC)
        mask = (resize_mask(self.masks[i], self.size) if self.masks[i] is not None
                else np.zeros((self.size, self.size), bool))
        return np.asarray(image), mask.astype(np.float32)
