"""Promptable region embeddings: CLOC's Prompter over a frozen Backbone.

Paper: Hong-You Chen et al., "Contrastive Localized Language-Image Pre-Training" (CLOC),
ICML 2025, arXiv:2410.02746, sections 3 and B.  No code was published with the paper
(there is no ``apple/ml-cloc``); this module is built from the text.

Algorithm
---------
A *promptable embedding* turns the image tokens of the vision tower, taken before pooling
and projection (``f'_I(x)``), and a spatial hint into a region embedding in the joint
image-text space (paper eq. 2)::

    z = Prompter(l, f'_I(x))

1. **Prompt.**  A box ``l = (x0, y0, x1, y1)`` (normalised to [0, 1]) is encoded with
   sinusoidal positional encodings of its two corners (:func:`sinusoidal_encoding`) and a
   linear map to the tower width; a text prompt (grounding) is the pooled, projected CLIP
   text embedding of the region caption mapped by a linear layer.
2. **Prompter.**  A single-layer, single-head pre-LN transformer encoder over
   ``[prompt ; image tokens]``, then a projection into the joint space.
3. **Region-text loss** (eq. 3)::

       L_CLOC = 1/2 (L_R->T + L_T->R)

   InfoNCE between the M*N region embeddings of a batch and the text embeddings of their
   captions, with CLIP's temperature; a negative whose caption is a near duplicate of the
   positive's (caption-caption cosine > 0.9) is dropped from the denominators
   (:func:`cloc_loss`).
4. **Grounding loss** (eq. 4): the Prompter run with the *text* prompt, then a two-layer
   GELU MLP regresses the box, ``L_g = 1/(4MN) sum ||l - Head(Prompter(f_T(y), f'_I))||^2``
   (:func:`grounding_loss`).

Defaults: one layer, one head, M = 4 boxes per image, the Backbone's temperature,
duplicate threshold 0.9, grounding weight 1.

Deviations
----------
- **Frozen Backbone.**  The paper trains everything from scratch together with the CLIP
  loss (``L = L_CLIP + lambda (L_CLOC + L_g)``) on billions of images.  Here the Backbone
  (both towers and the temperature) is frozen and only the Prompter is trained with
  ``L_CLOC + L_g``; the CLIP loss has nothing to train.
- **Read-out at the prompt.**  The paper pools the Prompter's output by global average.
  With a single layer, the image tokens' outputs cannot select the content inside the
  box (their queries never see the prompt's box before attending), so the region embedding
  is read at the prompt position, the one output whose attention is steered by the box.
  Only that position is computed (exactly the encoder layer's output there).
- **Defined initialisation.**  The prompt token starts from the mean of the image tokens
  plus the (zero-initialised) prompt encoding; the attention output, the MLP output and
  the prompt encoders start at zero and the output projection is the tower's own ``proj``.
  At initialisation every region embedding is therefore the mean-pooled projected patch
  tokens (``Backbone.image_tokens(project=True).mean(1)``), which a test checks; training
  starts from that whole-image embedding.
- **Patch positions.**  The image tokens get the same sinusoidal encoding of their patch
  centres, through a linear map, so that the box prompt can address them by position.
- **Input size.**  The tokens may be taken at a larger input than the tower's own
  (``image_size``; positional embedding interpolated bicubically, as the dense methods of
  :mod:`cliplab.dense` do) so that small objects cover several patches.

Examples
--------
>>> import cliplab, numpy as np
>>> from cliplab.dense.cloc import Prompter, region_embeddings
>>> bb = cliplab.load("shapes-tiny")
>>> prompter = Prompter.from_backbone(bb)
>>> images = np.zeros((2, 64, 64, 3), dtype=np.uint8)
>>> boxes = np.array([[[0, 0, 1, 1], [0, 0, 0.5, 0.5]]] * 2, dtype=np.float32)
>>> region_embeddings(bb, prompter, images, boxes).shape
(2, 2, 128)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .._progress import progress_bar
from ..errors import CheckpointMismatch, UsageError
from ..models.transforms import uint8_to_tensor
from ..train import TrainConfig, Trainer
from ..train.losses import Objective
from ..validation import check_backbone
from .attention import check_tower, last_block, prelast_tokens, vanilla_attention

logger = logging.getLogger(__name__)

__all__ = [
    "Prompter",
    "ClocModel",
    "ClocObjective",
    "RegionScenes",
    "sinusoidal_encoding",
    "cloc_loss",
    "grounding_loss",
    "region_embeddings",
    "ground",
    "crop_and_encode",
    "roi_mean_embeddings",
    "save_prompter",
    "load_prompter",
    "train_cloc",
]

_CONFIG_FILE = "prompter.json"
_WEIGHTS_FILE = "prompter.safetensors"
_FORMAT = "cliplab-cloc-prompter-1"


# ------------------------------------------------------------------ encodings and losses


def sinusoidal_encoding(coords: torch.Tensor, n_freqs: int) -> torch.Tensor:
    """Sinusoidal encoding of coordinates in [0, 1]: (..., C) -> (..., 2 * n_freqs * C).

    Each coordinate ``u`` becomes ``sin(2^k pi u), cos(2^k pi u)`` for ``k = 0 .. n_freqs-1``.
    """
    freqs = math.pi * 2.0 ** torch.arange(n_freqs, dtype=coords.dtype, device=coords.device)  # (F,)
    angles = coords[..., None] * freqs                                       # (..., C, F)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)       # (..., 2FC)


def cloc_loss(regions: torch.Tensor, texts: torch.Tensor, logit_scale, *, valid: torch.Tensor | None = None,
              duplicate_threshold: float | None = 0.9) -> torch.Tensor:
    """CLOC's region-text InfoNCE, ``1/2 (L_R->T + L_T->R)`` over all regions of a batch (eq. 3).

    Parameters
    ----------
    regions, texts : Tensor (N, D)
        L2-normalised region embeddings and the text embeddings of their captions; row i
        of both is a pair.
    logit_scale : float or Tensor
        The temperature ``t`` (exponentiated), CLIP's.
    valid : Tensor (N,) of bool, optional
        Rows to use (padding boxes are False).
    duplicate_threshold : float or None, default 0.9
        A negative j of anchor i is dropped from both denominators when the captions'
        cosine ``texts[i] . texts[j]`` exceeds it (the paper's rule for repeated
        captions); None keeps every negative.

    Returns
    -------
    Tensor, scalar
    """
    if valid is not None:
        keep = valid.bool()
        regions, texts = regions[keep], texts[keep]
    n = len(regions)
    if n == 0:
        return regions.sum() * 0.0
    logits = logit_scale * regions @ texts.T                              # (N, N), rows: regions
    if duplicate_threshold is not None:
        dup = (texts @ texts.T) > duplicate_threshold                     # (N, N)
        dup.fill_diagonal_(False)
        logits = logits.masked_fill(dup, float("-inf"))
    labels = torch.arange(n, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def grounding_loss(pred: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``1/(4MN) sum ||l - l_hat||^2`` over the valid boxes (eq. 4): pred, boxes (..., 4)."""
    err = ((pred - boxes) ** 2).sum(-1)                                   # (...)
    if valid is not None:
        err = err[valid.bool()]
    if err.numel() == 0:
        return pred.sum() * 0.0
    return err.mean() / 4


# ------------------------------------------------------------------ the Prompter


class Prompter(nn.Module):
    """CLOC's Prompter: image tokens + a box or text prompt -> a region embedding.

    Parameters
    ----------
    width : int
        Width W of the vision tower's tokens.
    embed_dim : int
        Width D of the joint space.
    heads : int, default 1
    n_freqs : int, default 8
        Frequencies of the sinusoidal encoding of box corners and patch centres.
    mlp_ratio : float, default 4.0
    image_size : int or None
        Side of the input the tokens are taken at (None: the tower's own).

    Attributes
    ----------
    proj : Parameter (W, D)
        Output projection; :meth:`from_backbone` copies the tower's ``proj``.
    box_head : nn.Sequential
        Grounding head, a two-layer GELU MLP W -> W -> 4.

    Notes
    -----
    With the prompt ``p = mean_t(x_t) + E(prompt)`` and the tokens ``x_t + P(pos_t)``
    (``E``, ``P`` linear maps of the sinusoidal encodings), the encoder layer's output at the
    prompt position is ``h = p + W_o Attn(LN1(p), LN1([p ; x]))``, ``h += MLP(LN2(h))``; the
    region embedding is ``h @ proj``.
    """

    def __init__(self, width: int, embed_dim: int, *, heads: int = 1, n_freqs: int = 8,
                 mlp_ratio: float = 4.0, image_size: int | None = None):
        super().__init__()
        if width % heads:
            raise UsageError(f"width {width} is not divisible by heads {heads}")
        self.config = {"width": int(width), "embed_dim": int(embed_dim), "heads": int(heads),
                       "n_freqs": int(n_freqs), "mlp_ratio": float(mlp_ratio),
                       "image_size": None if image_size is None else int(image_size)}
        self.heads = heads
        self.n_freqs = n_freqs
        self.image_size = image_size
        hidden = int(width * mlp_ratio)
        self.box_embed = nn.Linear(8 * n_freqs, width)          # 4 box coordinates
        self.text_embed = nn.Linear(embed_dim, width)
        self.pos_embed = nn.Linear(4 * n_freqs, width)          # 2 patch-centre coordinates
        self.ln_1 = nn.LayerNorm(width)
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.proj = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)
        self.box_head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 4))
        for layer in (self.box_embed, self.text_embed, self.out_proj, self.mlp[-1]):
            nn.init.zeros_(layer.weight)                         # the defined init: h = mean(x)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_backbone(cls, backbone, **kwargs) -> "Prompter":
        """A Prompter at the defined init for ``backbone``'s vision tower (its ``proj`` copied).

        Raises
        ------
        UsageError
            The tower is not an open_clip ViT with patch tokens and a projection.
        """
        check_backbone("backbone", backbone)
        visual = backbone.model.visual
        check_tower(visual)
        if getattr(visual, "proj", None) is None:
            raise UsageError("the Prompter needs a vision tower with an output projection (proj)")
        width, embed_dim = visual.proj.shape
        prompter = cls(width, embed_dim, **kwargs)
        with torch.no_grad():
            prompter.proj.copy_(visual.proj.detach().float())
        return prompter.to(backbone.device)

    def box_prompts(self, boxes: torch.Tensor) -> torch.Tensor:
        """Box prompts: (B, K, 4) normalised ``(x0, y0, x1, y1)`` -> (B, K, W)."""
        return self.box_embed(sinusoidal_encoding(boxes, self.n_freqs))

    def text_prompts(self, texts: torch.Tensor) -> torch.Tensor:
        """Text prompts: (B, K, D) CLIP text embeddings -> (B, K, W)."""
        return self.text_embed(texts)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], prompts: torch.Tensor) -> torch.Tensor:
        """Encoder output at each prompt: tokens (B, T, W), prompts (B, K, W) -> (B, K, W).

        Each prompt attends to itself and the image tokens, never to the other prompts
        (K independent sequences ``[prompt_k ; tokens]``).
        """
        B, T, W = tokens.shape
        K = prompts.shape[1]
        h, d = self.heads, W // self.heads
        x = tokens + self.pos_embed(self._patch_encoding(grid, tokens))              # (B, T, W)
        p = tokens.mean(1, keepdim=True) + prompts                                   # (B, K, W)
        qp, kp, vp = self.in_proj(self.ln_1(p)).reshape(B, K, 3, h, d).permute(2, 0, 3, 1, 4)  # 3 x (B, h, K, d)
        kv = F.linear(self.ln_1(x), self.in_proj.weight[W:], self.in_proj.bias[W:])  # image tokens: keys, values
        kx, vx = kv.reshape(B, T, 2, h, d).permute(2, 0, 3, 1, 4)                   # 2 x (B, h, T, d)
        scale = d ** -0.5
        s_self = (qp * kp).sum(-1, keepdim=True) * scale                             # (B, h, K, 1)
        s_img = (qp @ kx.transpose(-2, -1)) * scale                                  # (B, h, K, T)
        a = torch.softmax(torch.cat([s_self, s_img], dim=-1), dim=-1)                # (B, h, K, 1 + T)
        o = a[..., :1] * vp + a[..., 1:] @ vx                                        # (B, h, K, d)
        p = p + self.out_proj(o.transpose(1, 2).reshape(B, K, W))                    # residual attention
        return p + self.mlp(self.ln_2(p))                                            # residual MLP

    def embed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Region embeddings, L2-normalised: (B, K, W) -> (B, K, D)."""
        return F.normalize(hidden @ self.proj, dim=-1)

    def regions(self, tokens: torch.Tensor, grid, boxes: torch.Tensor) -> torch.Tensor:
        """Region embeddings of ``boxes`` (B, K, 4): (B, K, D), L2-normalised."""
        return self.embed(self(tokens, grid, self.box_prompts(boxes)))

    def boxes_from_text(self, tokens: torch.Tensor, grid, texts: torch.Tensor) -> torch.Tensor:
        """Grounded boxes of text embeddings ``texts`` (B, K, D): (B, K, 4), unclamped."""
        return self.box_head(self(tokens, grid, self.text_prompts(texts)))

    def _patch_encoding(self, grid, like: torch.Tensor) -> torch.Tensor:
        gh, gw = grid
        ys = (torch.arange(gh, dtype=like.dtype, device=like.device) + 0.5) / gh
        xs = (torch.arange(gw, dtype=like.dtype, device=like.device) + 0.5) / gw
        centres = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)  # (T, 2) as (x, y)
        return sinusoidal_encoding(centres, self.n_freqs)                            # (T, 4F)


# ------------------------------------------------------------------ model for the Trainer


def tower_tokens(visual, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch tokens before pooling and projection, ``ln_post`` applied: (B, T, W) and the grid.

    The tokens open_clip's ViT returns with ``output_tokens``; at another input size the
    positional embedding is interpolated (:func:`~cliplab.dense.attention.prelast_tokens`).
    """
    x, grid = prelast_tokens(visual, images)
    z = last_block(visual.transformer.resblocks[-1], x, vanilla_attention)
    return visual.ln_post(z[:, 1:]), grid                                            # (B, T, W)


def _patch_size(visual) -> tuple[int, int]:
    p = visual.patch_size
    return tuple(p) if isinstance(p, (tuple, list)) else (p, p)


class ClocModel(nn.Module):
    """A frozen open_clip model and a trainable :class:`Prompter`: what the Trainer trains.

    Parameters
    ----------
    clip : open_clip.CLIP
        Frozen here (``requires_grad=False``, kept in eval mode).
    prompter : Prompter
    cache_mb : float, default 256
        Memory for memoised frozen outputs (image tokens and caption embeddings, keyed by
        a hash of the input's bytes); 0 turns the cache off.  Exact while the towers stay
        frozen, and the reason a few hundred steps over a few hundred scenes run in
        minutes on a CPU: each scene and caption goes through the towers once.
    """

    def __init__(self, clip: nn.Module, prompter: Prompter, *, cache_mb: float = 256):
        super().__init__()
        self.clip = clip
        self.prompter = prompter
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.clip.eval()
        self.cache_bytes = int(cache_mb * 2 ** 20)
        self._cache: dict = {}
        self._cached_bytes = 0

    def train(self, mode: bool = True) -> "ClocModel":
        super().train(mode)
        self.clip.eval()                                         # the frozen Backbone never trains
        return self

    def _memo(self, kind: str, inputs: torch.Tensor, fn) -> torch.Tensor:
        """``fn(inputs)`` (no gradient) row by row from the cache; the missing rows computed in one call."""
        if not self.cache_bytes:
            with torch.no_grad():
                return fn(inputs)
        keys = [(kind, hashlib.blake2b(row.cpu().numpy().tobytes(), digest_size=16).digest()) for row in inputs]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        fresh = {}
        if missing:
            with torch.no_grad():
                fresh = dict(zip(missing, fn(inputs[missing])))
            for i, row in fresh.items():
                size = row.numel() * row.element_size()
                if self._cached_bytes + size <= self.cache_bytes:
                    self._cache[keys[i]] = row
                    self._cached_bytes += size
        return torch.stack([fresh[i] if i in fresh else self._cache[k] for i, k in enumerate(keys)])

    def image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Frozen patch tokens (:func:`tower_tokens`) of preprocessed images (B, 3, H, W): (B, T, W), grid."""
        ph, pw = _patch_size(self.clip.visual)
        grid = (images.shape[-2] // ph, images.shape[-1] // pw)
        return self._memo("image", images, lambda x: tower_tokens(self.clip.visual, x)[0]), grid

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised frozen text embeddings of token ids (..., T) -> (..., D)."""
        flat = tokens.reshape(-1, tokens.shape[-1])
        feats = self._memo("text", flat, lambda t: F.normalize(self.clip.encode_text(t).float(), dim=-1))
        return feats.reshape(*tokens.shape[:-1], -1)

    @property
    def temperature(self) -> torch.Tensor:
        return self.clip.logit_scale.detach().exp()


class ClocObjective(Objective):
    """``L_CLOC + grounding_weight * L_g`` for the Trainer (batch: K boxes and K captions per image).

    Items of the training set: ``(image, None, {"targets": {"boxes": (K, 4), "valid": (K,)},
    "extra_captions": [K captions]})`` (:class:`RegionScenes`).

    Parameters
    ----------
    grounding_weight : float, default 1.0
        0 turns the grounding head off.
    duplicate_threshold : float or None, default 0.9
        See :func:`cloc_loss`.
    """

    needs_captions = False
    needs_targets = True
    needs_extra_captions = True

    def __init__(self, *, grounding_weight: float = 1.0, duplicate_threshold: float | None = 0.9, **kwargs):
        super().__init__(**kwargs)
        self.grounding_weight = grounding_weight
        self.duplicate_threshold = duplicate_threshold

    def forward_model(self, model: ClocModel, batch) -> dict:
        tokens, grid = model.image_tokens(batch.images)                              # (B, T, W)
        texts = model.text_features(batch.extra_tokens)                              # (B, K, D)
        boxes = batch.targets["boxes"].float()                                       # (B, K, 4)
        prompter = model.prompter
        prompts = prompter.box_prompts(boxes)                                        # (B, K, W)
        if self.grounding_weight:                                                    # one pass, 2K prompts
            prompts = torch.cat([prompts, prompter.text_prompts(texts)], dim=1)      # (B, 2K, W)
        hidden = prompter(tokens, grid, prompts)
        K = boxes.shape[1]
        out = {"regions": prompter.embed(hidden[:, :K]), "texts": texts, "boxes": boxes,
               "valid": batch.targets["valid"].bool(), "scale": model.temperature}
        if self.grounding_weight:
            out["pred_boxes"] = prompter.box_head(hidden[:, K:])                     # (B, K, 4)
        return out

    def forward(self, outputs: dict, batch=None) -> dict[str, torch.Tensor]:
        D = outputs["regions"].shape[-1]
        valid = outputs["valid"].reshape(-1)
        terms = {"cloc": cloc_loss(outputs["regions"].reshape(-1, D), outputs["texts"].reshape(-1, D),
                                   outputs["scale"], valid=valid, duplicate_threshold=self.duplicate_threshold)}
        if self.grounding_weight:
            terms["ground"] = self.grounding_weight * grounding_loss(
                outputs["pred_boxes"].reshape(-1, 4), outputs["boxes"].reshape(-1, 4), valid)
        return terms


# ------------------------------------------------------------------ data


def region_caption(color: str, shape: str) -> str:
    """The caption of one region: ``"a red circle"``."""
    return f"a {color} {shape}"


class RegionScenes(torch.utils.data.Dataset):
    """ShapesWorld dense scenes with K sampled region boxes and captions per item.

    Item ``i`` is scene ``i % n_scenes`` with its own seeded choice of K objects (so
    passes over the set see other boxes of the same scenes); scenes with fewer than K
    objects pad with ``valid = 0``.

    Parameters
    ----------
    world : ShapesWorld
        A dense world (:func:`cliplab.data.shapes.dense.dense_world`).
    split : str
    n_scenes : int
    size : int
        Side the images are resized to (the Prompter's input).
    k : int, default 4
        Boxes per item (the paper's M).
    repeats : int, default 8
        Items per scene.
    seed : int, default 0
    progress : bool, optional
        Progress bar while the scenes render.
    """

    def __init__(self, world, split: str, n_scenes: int, size: int, *, k: int = 4, repeats: int = 8,
                 seed: int = 0, progress: bool | None = False):
        from ..data.shapes.dense import dense_scenes

        self.size, self.k, self.repeats, self.seed = size, k, repeats, seed
        self.scenes = [(_resize(s.image, size), *_scene_regions(s))
                       for s in dense_scenes(world, split, n_scenes, progress=progress, desc="scenes")]

    def __len__(self) -> int:
        return len(self.scenes) * self.repeats

    def __getitem__(self, i: int):
        image, boxes, captions, _ = self.scenes[i % len(self.scenes)]
        rng = np.random.default_rng([self.seed, i])
        pick = rng.permutation(len(boxes))[:self.k]
        out_boxes = np.zeros((self.k, 4), dtype=np.float32)
        valid = np.zeros(self.k, dtype=np.float32)
        caps = [""] * self.k
        out_boxes[:len(pick)] = boxes[pick]
        valid[:len(pick)] = 1
        for j, o in enumerate(pick):
            caps[j] = captions[o]
        return image, None, {"targets": {"boxes": out_boxes, "valid": valid}, "extra_captions": caps}


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def _scene_regions(scene) -> tuple[np.ndarray, list[str], list[str]]:
    """Normalised boxes (K, 4), region captions and shapes of a scene's objects."""
    S = scene.image.shape[0]
    boxes = np.array([o.box for o in scene.objects], dtype=np.float32).reshape(-1, 4) / S
    return boxes, [region_caption(o.color, o.shape) for o in scene.objects], [o.shape for o in scene.objects]


# ------------------------------------------------------------------ inference


def _image_batch(backbone, images, size: int) -> torch.Tensor:
    arrays = [_resize(np.asarray(im), size) for im in images]
    cfg = dict(backbone.preprocess_cfg, size=[size, size])
    return uint8_to_tensor(arrays, cfg).to(backbone.device)                          # (B, 3, S, S)


def _check_boxes(boxes, n_images: int) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or len(boxes) != n_images:
        raise UsageError(f"boxes must have shape (N, K, 4) with N = {n_images} images, got {boxes.shape}")
    if boxes.size and (boxes.min() < 0 or boxes.max() > 1):
        raise UsageError("boxes are normalised (x0, y0, x1, y1) in [0, 1]; divide pixel boxes by the image side")
    return boxes


def _check_images(images) -> list:
    images = list(images)
    for im in images:
        a = np.asarray(im)
        if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise UsageError(f"images must be uint8 (H, W, 3) arrays, got {a.dtype} {a.shape}")
    return images


@torch.no_grad()
def region_embeddings(backbone, prompter: Prompter, images, boxes, *, batch_size: int = 32,
                      progress: bool | None = None) -> np.ndarray:
    """Region embeddings of boxes in images: float32 (N, K, D), L2-normalised.

    Parameters
    ----------
    backbone : Backbone
        The Backbone the Prompter was trained on.
    prompter : Prompter
    images : sequence of uint8 ndarray (H, W, 3)
        Resized (squashed) to the Prompter's ``image_size``.
    boxes : array (N, K, 4)
        Normalised ``(x0, y0, x1, y1)`` per image.

    Raises
    ------
    UsageError
        Bad image or box arrays; a tower the Prompter cannot read.
    """
    check_backbone("backbone", backbone)
    images = _check_images(images)
    boxes = _check_boxes(boxes, len(images))
    size = prompter.image_size or backbone.image_size
    prompter = prompter.to(backbone.device).eval()
    out = []
    for s in progress_bar(range(0, len(images), batch_size), progress=progress, desc="regions", unit="batch"):
        tokens, grid = tower_tokens(backbone.model.visual, _image_batch(backbone, images[s:s + batch_size], size))
        b = torch.as_tensor(boxes[s:s + batch_size], device=backbone.device)
        out.append(prompter.regions(tokens.float(), grid, b).cpu())
    if not out:
        return np.zeros((0, boxes.shape[1], prompter.config["embed_dim"]), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32)


@torch.no_grad()
def ground(backbone, prompter: Prompter, images, texts: Sequence[Sequence[str]], *,
           batch_size: int = 32) -> np.ndarray:
    """Boxes of region captions: float32 (N, Q, 4), normalised ``(x0, y0, x1, y1)``.

    ``texts[i]`` holds the Q captions to ground in ``images[i]`` (the same Q for every
    image); the grounding head regresses one box per caption.
    """
    check_backbone("backbone", backbone)
    images = _check_images(images)
    if len(texts) != len(images) or len({len(t) for t in texts}) > 1:
        raise UsageError("texts must hold the same number of captions for each image")
    size = prompter.image_size or backbone.image_size
    prompter = prompter.to(backbone.device).eval()
    out = []
    for s in range(0, len(images), batch_size):
        chunk = texts[s:s + batch_size]
        q = len(chunk[0])
        t = torch.as_tensor(backbone.encode_texts([c for caps in chunk for c in caps]), device=backbone.device)
        tokens, grid = tower_tokens(backbone.model.visual, _image_batch(backbone, images[s:s + batch_size], size))
        pred = prompter.boxes_from_text(tokens.float(), grid, t.reshape(len(chunk), q, -1))
        x0y0 = torch.minimum(pred[..., :2], pred[..., 2:]).clamp(0, 1)
        x1y1 = torch.maximum(pred[..., :2], pred[..., 2:]).clamp(0, 1)
        out.append(torch.cat([x0y0, x1y1], dim=-1).cpu())
    if not out:
        return np.zeros((0, 0, 4), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32)


# ------------------------------------------------------------------ baselines


def square_crop(image: np.ndarray, box, *, enlarge: float = 1.0) -> np.ndarray:
    """The square around normalised ``box`` (side ``enlarge`` x its longer side), clipped to the image."""
    H, W = image.shape[:2]
    x0, y0, x1, y1 = np.asarray(box, dtype=np.float64) * [W, H, W, H]
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0, 1.0) * enlarge / 2
    a, b = int(max(0, math.floor(cx - half))), int(min(W, math.ceil(cx + half)))
    c, d = int(max(0, math.floor(cy - half))), int(min(H, math.ceil(cy + half)))
    return image[c:max(d, c + 1), a:max(b, a + 1)]


def crop_and_encode(backbone, images, boxes, *, enlarge: float = 1.0, batch_size: int = 64) -> np.ndarray:
    """Baseline region embeddings: crop each box, resize to the model input, encode: (N, K, D).

    Crops are squares around the box (:func:`square_crop`), so the resize keeps the
    aspect ratio; ``enlarge=1.5`` adds context as ViLD does.
    """
    check_backbone("backbone", backbone)
    images = _check_images(images)
    boxes = _check_boxes(boxes, len(images))
    size = backbone.image_size
    crops = [_resize(np.ascontiguousarray(square_crop(im, b, enlarge=enlarge)), size)
             for im, bs in zip(images, boxes) for b in bs]
    if not crops:
        return np.zeros((*boxes.shape[:2], backbone.embed_dim), dtype=np.float32)
    feats = backbone.encode_images(crops, batch_size=batch_size, progress=False).features
    return feats.reshape(*boxes.shape[:2], -1)


@torch.no_grad()
def roi_mean_embeddings(backbone, images, boxes, *, image_size: int | None = None,
                        batch_size: int = 32) -> np.ndarray:
    """Baseline region embeddings: mean of the projected patch tokens whose centre is in the box.

    The pooling baseline of the paper's ablation (RoIAlign on frozen tokens, here an
    average over patch centres; a box with no patch centre takes the patch under its
    centre).  Returns float32 (N, K, D), L2-normalised.
    """
    check_backbone("backbone", backbone)
    images = _check_images(images)
    boxes = _check_boxes(boxes, len(images))
    visual = backbone.model.visual
    size = image_size or backbone.image_size
    out = []
    for s in range(0, len(images), batch_size):
        tokens, (gh, gw) = tower_tokens(visual, _image_batch(backbone, images[s:s + batch_size], size))
        feats = (tokens @ visual.proj).float()                                       # (B, T, D)
        ys = (torch.arange(gh) + 0.5) / gh
        xs = (torch.arange(gw) + 0.5) / gw
        cx, cy = xs.repeat(gh), ys.repeat_interleave(gw)                             # (T,)
        b = torch.as_tensor(boxes[s:s + batch_size])                                  # (B, K, 4)
        inside = ((cx >= b[..., 0:1]) & (cx <= b[..., 2:3]) & (cy >= b[..., 1:2]) & (cy <= b[..., 3:4])).float()
        centre = (((b[..., 0] + b[..., 2]) / 2 * gw).long().clamp(0, gw - 1)
                  + ((b[..., 1] + b[..., 3]) / 2 * gh).long().clamp(0, gh - 1) * gw)  # (B, K)
        empty = inside.sum(-1) == 0
        inside[empty] = F.one_hot(centre[empty], gh * gw).float()
        pooled = (inside / inside.sum(-1, keepdim=True)).to(feats.device) @ feats      # (B, K, D)
        out.append(F.normalize(pooled, dim=-1).cpu())
    return torch.cat(out).numpy().astype(np.float32)


# ------------------------------------------------------------------ save, load, train


def save_prompter(prompter: Prompter, out: str | Path, *, backbone=None) -> Path:
    """Write ``prompter.safetensors`` and ``prompter.json`` (config, Backbone name) to folder ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in prompter.state_dict().items()},
              str(out / _WEIGHTS_FILE), metadata={"format": _FORMAT})
    record = {"format": _FORMAT, "config": prompter.config}
    if backbone is not None:
        record["backbone"] = {"name": backbone.name, "fingerprint": backbone.fingerprint}
    (out / _CONFIG_FILE).write_text(json.dumps(record, indent=2))
    return out


def load_prompter(path: str | Path, *, backbone=None) -> Prompter:
    """Read a Prompter written by :func:`save_prompter`.

    Raises
    ------
    UsageError
        No prompter in ``path``.
    CheckpointMismatch
        Not a cliplab prompter, or its widths do not fit ``backbone``.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / _CONFIG_FILE).is_file() or not (path / _WEIGHTS_FILE).is_file():
        raise UsageError(f"no prompter in {path} (expected {_CONFIG_FILE} and {_WEIGHTS_FILE}; "
                         "write one with save_prompter)")
    record = json.loads((path / _CONFIG_FILE).read_text())
    if record.get("format") != _FORMAT:
        raise CheckpointMismatch(f"{path} is not a cliplab CLOC prompter")
    cfg = record["config"]
    if backbone is not None:
        width, embed_dim = backbone.model.visual.proj.shape
        if (width, embed_dim) != (cfg["width"], cfg["embed_dim"]):
            raise CheckpointMismatch(f"the prompter in {path} is for a tower of width {cfg['width']} and "
                                     f"embedding {cfg['embed_dim']}, not {width} and {embed_dim}")
        saved = record.get("backbone", {}).get("fingerprint")
        if saved and saved != backbone.fingerprint:
            logger.warning("the prompter in %s was trained on another Backbone (%s)", path,
                           record["backbone"].get("name"))
    prompter = Prompter(cfg["width"], cfg["embed_dim"], heads=cfg["heads"], n_freqs=cfg["n_freqs"],
                        mlp_ratio=cfg["mlp_ratio"], image_size=cfg["image_size"])
    prompter.load_state_dict(load_file(str(path / _WEIGHTS_FILE)))
    return prompter.to(backbone.device) if backbone is not None else prompter


def train_cloc(backbone, steps: int, out: str | Path, *, train_set=None, n_scenes: int = 200,
               image_size: int | None = None, k: int = 4, batch_size: int = 16, lr: float = 3e-3,
               warmup_steps: int = 20, weight_decay: float = 0.05, grounding_weight: float = 1.0,
               seed: int = 0, world=None, log_every: int = 10, progress: bool | None = None,
               prompter_kwargs: dict | None = None) -> Prompter:
    """Train a Prompter on a frozen ``backbone`` with the Trainer; save it to ``out/prompter``.

    Parameters
    ----------
    backbone : Backbone
        Frozen; its tokenizer tokenises the region captions.
    steps : int
    out : str or path
        Run folder: the Trainer's ``metrics.jsonl``/``csv`` and checkpoint, and the
        Prompter in ``out/prompter`` (:func:`save_prompter`).
    train_set : Dataset, optional
        Items as :class:`ClocObjective` reads them; default :class:`RegionScenes` of
        ``n_scenes`` train scenes of :func:`~cliplab.data.shapes.dense.dense_world`.
    image_size : int, optional
        Input side of the tokens (default: the tower's).
    k, batch_size, lr, warmup_steps, weight_decay, grounding_weight, seed, log_every
        See :class:`RegionScenes`, :class:`~cliplab.train.TrainConfig`, :class:`ClocObjective`.
    world : ShapesWorld, optional
        Dense world of the default training set (default ``dense_world(seed=0)``).
    prompter_kwargs : dict, optional
        More :class:`Prompter` options (``heads``, ``n_freqs``, ``mlp_ratio``).

    Returns
    -------
    Prompter
        Trained, in eval mode.
    """
    check_backbone("backbone", backbone)
    size = image_size or backbone.image_size
    patch = _patch_size(backbone.model.visual)
    if size % patch[0] or size % patch[1]:
        raise UsageError(f"image_size {size} is not a multiple of the patch size {patch[0]}")
    if train_set is None:
        from ..data.shapes.dense import dense_world

        train_set = RegionScenes(world if world is not None else dense_world(seed=0), "train", n_scenes, size,
                                 k=k, seed=seed, progress=progress)
    torch.manual_seed(seed)
    prompter = Prompter.from_backbone(backbone, image_size=image_size, **(prompter_kwargs or {}))
    frozen = {n: p.requires_grad for n, p in backbone.model.named_parameters()}
    model = ClocModel(backbone.model, prompter)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                         weight_decay=weight_decay, seed=seed, out_dir=str(out), ckpt_every=0,
                         log_every=log_every, device=str(backbone.device))
    pp = dict(backbone.preprocess_cfg, size=[size, size])
    try:
        objective = ClocObjective(grounding_weight=grounding_weight)
        Trainer(model, backbone.tokenize, None, train_set, config, objective=objective, preprocess_cfg=pp,
                progress=progress).fit()
    finally:
        for n, p in backbone.model.named_parameters():
            p.requires_grad_(frozen[n])
        backbone.model.eval()
    save_prompter(prompter, Path(out) / "prompter", backbone=backbone)
    return prompter.eval()
