"""RAVE: a residual vector between CLIP embeddings guides an image-enhancement network.

Gaintseva, Benning, Slabaugh, "RAVE: Residual Vector Embedding for CLIP-Guided Backlit
Image Enhancement", ECCV 2024, arXiv:2404.01889; reference code Atmyre/RAVE
(``train_rave.py``, ``clip_score.py``, ``enhancement_model.py``, ``configs/train/rave.yaml``,
commit a207067).

Algorithm
---------
1. Residual vector (``train_rave.py``): with E the frozen CLIP image encoder and every
   embedding L2-normalised, ``v_pos = normalise(mean_i E(well-lit_i))``,
   ``v_neg = normalise(mean_j E(backlit_j))``, ``r = normalise(v_pos - v_neg)``; the target
   projection is ``thr = <v_pos, r>``.  The two image sets are unpaired.
2. Guidance loss (``clip_score.get_clip_score_from_feature`` with ``thr``):
   ``L_g = mean_b (cos(E(I_hat_b), r) - thr)^2``: the enhanced images' projection on ``r``
   is pulled to the well-lit mean's.  No prompts are learned.
3. Enhancement (``enhancement_model.UNet_emb_oneBranch_symmetry``, one output channel):
   a fully convolutional net of residual blocks and a pyramid-pooling module predicts an
   illumination map ``M >= 0`` (a ReLU); ``I_hat = clamp(I / (M + 1e-9), 0, 1)``.
4. Reconstruction loss (``clip_score.get_clip_score_MSE``):
   ``L_rec = sum_b sum_l w_l MSE(F_l(I_hat_b), F_l(I_b))`` over the frozen encoder's
   intermediate feature maps ``F_l``, summed (not averaged) over the batch as the reference.
5. Schedule (``train_rave.py``): ``25 L_rec`` with all ``w_l = 1`` for the first 1000
   iterations, then ``6 * 320 L_g + 0.9 * 25 L_rec`` with ``w = (1, ..., 1, 0.5)``; Adam,
   lr 2e-5, weight decay 1e-3, batch 8; only the enhancement net is trained.

The unguided baseline is the same net, data and steps with the guidance term left out.

Deviations
----------
- Encoder: one frozen Backbone (the bundled ``shapes-tiny`` by default) for both losses;
  the reference guides with CLIP ViT-B/32 and reconstructs with CLIP-RN101's features.
  ``F_l`` are the outputs of the Backbone's patch embedding and of each transformer block
  (for an open_clip ModifiedResNet: the stem and layer1-4, the reference's five maps);
  ``w`` has one weight per map, the last 0.5.
- Images are resized to the Backbone's input size (bilinear, as ``transforms.Resize`` on
  tensors) only when their size differs; ShapesWorld's 64 px images are not resized.
- Scaled to a few hundred steps: the warm-up is the reference's share of its first round
  (1000 of 1000 + 2100 iterations, :data:`WARMUP_FRACTION`); the Trainer's AdamW
  (decoupled weight decay on weight tensors, betas (0.9, 0.98)) with a cosine decay from a
  higher lr (1e-3) replaces Adam at a constant 2e-5; gradients are not clipped, as the
  reference.  Its checkpoint selection, re-initialisation when the warm-up PSNR stays
  below 8 dB, and round-extension rule are left out.
- The illumination head's bias starts at 1, so ``M ~ 1`` and ``I_hat ~ I`` at step 0; the
  reference starts at ``M ~ 0`` (``I_hat`` saturated white) and relies on the warm-up and
  re-initialisation.  Weight names match the reference, so its state dicts load.
- The optional "shifted residual" (projecting out of ``r`` a direction built from text
  tokens) is not implemented (the reference path references an undefined variable).
- Evaluation: PSNR and SSIM (Gaussian window 11, sigma 1.5) on RGB in [0, 1] from
  torchmetrics; the reference's ``compute_metrics.py`` scores grayscale images with
  OpenCV's PSNR and scikit-image's SSIM.

Data on ShapesWorld: the ``backlit`` domain renders scene ``i`` of a split with the same
objects as the original (well-lit) domain, so the original render is the ground truth of
the backlit one.  Training sees only unpaired images (:func:`shapes_backlit`).

Measured (``benchmarks/rave_shapes.py``, docs/generative.md): on ShapesWorld the guidance
moves the enhanced images along ``r`` but lowers PSNR (7.5 vs 8.7 dB unguided): the glow
of the ``backlit`` domain is brighter than the well-lit background, and the guided
illumination maps brighten it further.

Examples
--------
>>> import numpy as np
>>> res = residual_direction(np.eye(4)[[0, 0, 1]], np.eye(4)[[2, 3]])
>>> round(float(np.linalg.norm(res.vector)), 6), res.threshold > 0
(1.0, True)
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError, UsageError
from ..train import TrainConfig, Trainer
from ..train.freezing import frozen
from ..train.losses import Batch, Objective

__all__ = ["EnhancementNet", "RaveObjective", "Residual", "WARMUP_FRACTION", "encoder_layers", "enhance",
           "guidance_loss", "image_quality", "load_enhancer", "reconstruction_loss", "residual_direction",
           "residual_vector", "save_enhancer", "shapes_backlit", "train_rave"]

logger = logging.getLogger("cliplab.generative.rave")

WARMUP_FRACTION = 1000 / 3100
"""Share of the steps trained on the reconstruction loss alone: the reference's 1000
reconstruction iterations of its first round of 1000 + 2100."""

GUIDANCE_WEIGHT = 6 * 16 * 20
"""``6 * (16 * 20 L_g)``: the guidance term's weight after the warm-up (``train_rave.py``)."""

WARMUP_REC_WEIGHT = 25.0
"""``25 L_rec`` (all layer weights 1) during the warm-up."""

JOINT_REC_WEIGHT = 0.9 * 25
"""``0.9 * (25 L_rec)`` (last layer weight 0.5) after the warm-up."""

_EPS = 1e-9  # I / (M + eps), train_rave.py


# ----------------------------------------------------------------- residual vector


@dataclass(frozen=True)
class Residual:
    """The guidance direction of RAVE.

    Attributes
    ----------
    vector : ndarray of float32, shape (D,)
        ``r``, unit norm.
    threshold : float
        ``thr = <v_pos, r>``: the projection the guidance loss pulls enhanced images to.
    positive, negative : ndarray of float32, shape (D,)
        ``v_pos`` and ``v_neg``, the normalised means of the well-lit and backlit embeddings.
    """

    vector: np.ndarray
    threshold: float
    positive: np.ndarray
    negative: np.ndarray


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def residual_direction(positive: np.ndarray, negative: np.ndarray) -> Residual:
    """RAVE's residual vector from two sets of image embeddings.

    Parameters
    ----------
    positive : array-like of shape (N, D)
        Embeddings of well-lit images (re-normalised per row, as the reference).
    negative : array-like of shape (M, D)
        Embeddings of backlit images.

    Returns
    -------
    Residual

    Raises
    ------
    UsageError
        Empty sets, widths that differ, or equal means (no direction).
    """
    pos = np.asarray(positive, dtype=np.float32)
    neg = np.asarray(negative, dtype=np.float32)
    if pos.ndim != 2 or neg.ndim != 2 or not len(pos) or not len(neg) or pos.shape[1] != neg.shape[1]:
        raise UsageError(f"residual_direction needs two non-empty (N, D) sets of one width, got "
                         f"{pos.shape} and {neg.shape}")
    v_pos = _unit(_unit(pos).mean(0))                     # (D,)
    v_neg = _unit(_unit(neg).mean(0))                     # (D,)
    diff = v_pos - v_neg
    if not np.linalg.norm(diff) > 0:
        raise UsageError("the well-lit and backlit embeddings have the same mean direction: no residual")
    r = _unit(diff)                                       # r = normalise(v_pos - v_neg)
    return Residual(r.astype(np.float32), float(np.dot(v_pos, r)), v_pos, v_neg)


def residual_vector(backbone, well_lit, backlit, *, batch_size: int = 64, progress: bool | None = None) -> Residual:
    """RAVE's residual vector of a Backbone's image embeddings of two unpaired sets.

    Parameters
    ----------
    backbone : Backbone
    well_lit, backlit : images
        Anything :meth:`Backbone.encode_images` reads (uint8 arrays (N, H, W, 3), paths,
        PIL images).
    batch_size : int, default 64
    progress : bool or None

    Returns
    -------
    Residual
    """
    pos = backbone.encode_images(well_lit, batch_size=batch_size, progress=progress, on_error="raise").features
    neg = backbone.encode_images(backlit, batch_size=batch_size, progress=progress, on_error="raise").features
    return residual_direction(pos, neg)


# ----------------------------------------------------------------- losses


def guidance_loss(image_features: torch.Tensor, residual: torch.Tensor, threshold: float) -> torch.Tensor:
    """``mean_b (cos(f_b, r) - thr)^2`` (``clip_score.get_clip_score_from_feature``, thr given).

    Parameters
    ----------
    image_features : torch.Tensor of shape (B, D)
        Image embeddings of the enhanced images (any norm).
    residual : torch.Tensor of shape (D,)
    threshold : float

    Returns
    -------
    torch.Tensor, scalar
    """
    cos = F.normalize(image_features, dim=-1) @ F.normalize(residual.to(image_features), dim=-1)  # (B,)
    return ((cos - threshold) ** 2).mean()


def reconstruction_loss(pred: list[torch.Tensor], target: list[torch.Tensor], weights) -> torch.Tensor:
    """``sum_b sum_l w_l MSE(pred_l[b], target_l[b])`` (``clip_score.get_clip_score_MSE``).

    Parameters
    ----------
    pred, target : list of torch.Tensor of shape (B, ...)
        One feature map per layer, batch first.
    weights : sequence of float
        One per layer.

    Returns
    -------
    torch.Tensor, scalar
        Summed over the batch, as the reference (not averaged).
    """
    if not (len(pred) == len(target) == len(weights)):
        raise UsageError(f"{len(pred)} predicted maps, {len(target)} targets and {len(weights)} weights")
    total = pred[0].new_zeros(())
    for w, a, b in zip(weights, pred, target):
        total = total + w * ((a - b) ** 2).flatten(1).mean(1).sum()
    return total


# ----------------------------------------------------------------- encoder features


def encoder_layers(visual: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are the reconstruction loss's feature maps.

    open_clip ``VisionTransformer``: the patch embedding ``conv1`` and every block;
    ``ModifiedResNet``: the stem (``avgpool``) and ``layer1``-``layer4``, the maps
    CLIP-RN101 gives the reference.

    Raises
    ------
    UsageError
        For another vision tower.
    """
    if hasattr(visual, "transformer") and hasattr(visual, "conv1"):
        return [visual.conv1, *visual.transformer.resblocks]
    if all(hasattr(visual, n) for n in ("avgpool", "layer1", "layer2", "layer3", "layer4")):
        return [visual.avgpool, visual.layer1, visual.layer2, visual.layer3, visual.layer4]
    raise UsageError(f"RAVE's reconstruction loss needs a ViT or ModifiedResNet tower, got {type(visual).__name__}")


class _Encoder(nn.Module):
    """A CLIP image tower on [0, 1] images: the embedding and the intermediate maps.

    The CLIP model is held outside the module tree (not moved, trained, put in train mode
    or saved with the objective); whoever trains freezes it for the run
    (:func:`train_rave` does, and restores it after).  Images are cast to the tower's
    dtype (a half-precision Backbone) and the outputs back to float32.
    """

    def __init__(self, clip_model: nn.Module, preprocess_cfg: dict):
        super().__init__()
        self._clip = (clip_model,)                        # not a submodule: the caller's model, left as it is
        self.size = tuple(int(s) for s in preprocess_cfg["size"])
        self.register_buffer("mean", torch.tensor(preprocess_cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess_cfg["std"], dtype=torch.float32).view(1, 3, 1, 1))
        self.layers = encoder_layers(clip_model.visual)   # a plain list: not registered either

    @property
    def clip(self) -> nn.Module:
        return self._clip[0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """images (B, 3, H, W) in [0, 1] -> (embedding (B, D), [maps (B, ...)]), float32."""
        if tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        dtype = self.clip.visual.conv1.weight.dtype      # ViT and ModifiedResNet both start with conv1
        maps: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: maps.append(out.float())) for m in self.layers]
        try:
            emb = self.clip.encode_image(((images - self.mean) / self.std).to(dtype))   # (B, D)
        finally:
            for h in hooks:
                h.remove()
        return emb.float(), maps


# ----------------------------------------------------------------- enhancement net


class _PPM(nn.Module):
    """Pyramid pooling (``PPM1``): pooled 1x1 projections at several bins, fused by a 3x3 conv."""

    def __init__(self, in_dim: int, reduction_dim: int, bins=(1, 2, 3, 6)):
        super().__init__()
        self.features = nn.ModuleList(nn.Sequential(
            nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_dim, reduction_dim, kernel_size=1, bias=False), nn.PReLU())
            for b in bins)
        self.fuse = nn.Sequential(
            nn.Conv2d(in_dim + reduction_dim * len(bins), in_dim, kernel_size=3, padding=1, bias=False), nn.PReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = [x] + [F.interpolate(f(x), x.shape[2:], mode="bilinear", align_corners=True) for f in self.features]
        return self.fuse(torch.cat(out, 1))


class _ResidualBlock(nn.Module):
    """``lrelu(x + conv2(lrelu(conv1(x))))``, reflect-padded 3x3 convs without bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False, padding_mode="reflect")
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False, padding_mode="reflect")
        self.lrelu = nn.LeakyReLU(negative_slope=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lrelu(x + self.conv2(self.lrelu(self.conv1(x))))


class EnhancementNet(nn.Module):
    """RAVE's enhancement network: an illumination map ``M`` (B, 1, H, W) from an image.

    The reference's ``UNet_emb_oneBranch_symmetry(3, 1)`` at ``width=32`` (same layers and
    parameter names): a 3x3 stem, two residual blocks, pyramid pooling, a widening conv,
    two residual blocks at twice the width, a narrowing conv, two residual blocks and a
    ReLU head.  Fully convolutional, no down-sampling: any image size.

    Parameters
    ----------
    width : int, default 32
        Channels of the outer blocks (the middle ones have ``2 * width``, the pyramid
        pooling ``width // 4`` per bin).
    seed : int or None, default None
        Seeds the initialisation (conv weights N(0, 0.02), as ``weights_init``; the
        head's bias 1, see the module's deviations).

    Examples
    --------
    >>> import torch
    >>> net = EnhancementNet(width=8, seed=0)
    >>> net(torch.rand(2, 3, 16, 16)).shape
    torch.Size([2, 1, 16, 16])
    """

    def __init__(self, width: int = 32, *, seed: int | None = None):
        super().__init__()
        if width < 4:
            raise UsageError(f"width must be >= 4, got {width}")
        self.width = int(width)
        w = self.width
        with torch.random.fork_rng(enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.cond1 = nn.Conv2d(3, w, 3, 1, 1, bias=True)
            self.cond_add1 = nn.Conv2d(w, 1, 3, 1, 1, bias=True)
            self.condx = nn.Conv2d(w, 2 * w, 3, 1, 1, bias=True)
            self.condy = nn.Conv2d(2 * w, w, 3, 1, 1, bias=True)
            self.relu = nn.ReLU()
            self.lrelu = nn.LeakyReLU(negative_slope=0.2)
            self.ResidualBlock1 = _ResidualBlock(w)
            self.ResidualBlock2 = _ResidualBlock(w)
            self.ResidualBlock3 = _ResidualBlock(2 * w)
            self.ResidualBlock4 = _ResidualBlock(2 * w)
            self.ResidualBlock5 = _ResidualBlock(w)
            self.ResidualBlock6 = _ResidualBlock(w)
            self.PPM1 = _PPM(w, max(1, w // 4))
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.data.normal_(0.0, 0.02)
        with torch.no_grad():
            self.cond_add1.bias.fill_(1.0)  # deviation: M ~ 1 (identity) at the start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [0, 1] -> illumination map M (B, 1, H, W), M >= 0."""
        h = self.lrelu(self.cond1(x))
        h = self.PPM1(self.ResidualBlock2(self.ResidualBlock1(h)))
        h = self.condy(self.ResidualBlock4(self.ResidualBlock3(self.condx(h))))
        h = self.ResidualBlock6(self.ResidualBlock5(h))
        return self.relu(self.cond_add1(h))

    def enhance(self, x: torch.Tensor) -> torch.Tensor:
        """``clamp(x / (M + 1e-9), 0, 1)``: (B, 3, H, W) in [0, 1] -> same shape."""
        return torch.clamp(x / (self(x) + _EPS), 0, 1)


# ----------------------------------------------------------------- training


class RaveObjective(Objective):
    """RAVE's loss for the Trainer: reconstruction warm-up, then guidance + reconstruction.

    The Trainer's model is the :class:`EnhancementNet`; the batch's images must be in
    [0, 1] (``preprocess_cfg`` mean 0, std 1, as :func:`train_rave` passes).

    Parameters
    ----------
    clip_model : torch.nn.Module
        An open_clip model (``backbone.model``).  Not changed, moved or saved in
        checkpoints; freeze it for the run (``with cliplab.train.freezing.frozen(...)``,
        as :func:`train_rave` does) so that no gradients collect on it.
    preprocess_cfg : dict
        The Backbone's input size, mean and std.
    residual : Residual
    guided : bool, default True
        False: the unguided baseline (no guidance term after the warm-up).
    warmup_fraction : float, default WARMUP_FRACTION
        Share of the run's steps with the reconstruction loss alone.
    """

    needs_captions = False
    frozen_modules = ("encoder",)

    def __init__(self, clip_model: nn.Module, preprocess_cfg: dict, residual: Residual, *, guided: bool = True,
                 warmup_fraction: float = WARMUP_FRACTION):
        super().__init__()
        if not 0.0 <= warmup_fraction <= 1.0:
            raise UsageError(f"warmup_fraction must be in [0, 1], got {warmup_fraction}")
        self.encoder = _Encoder(clip_model, preprocess_cfg)
        self.register_buffer("residual", torch.as_tensor(residual.vector, dtype=torch.float32))  # (D,)
        self.threshold = float(residual.threshold)
        self.guided = bool(guided)
        self.warmup_fraction = float(warmup_fraction)
        n = len(self.encoder.layers)
        self.warmup_weights = [1.0] * n                     # all 1 during the warm-up
        self.joint_weights = [1.0] * (n - 1) + [0.5]        # [1, 1, 1, 1, 0.5] for RN101

    def forward_model(self, model: nn.Module, batch: Batch) -> dict:
        x = batch.images                                    # (B, 3, H, W) in [0, 1]
        enhanced = model.enhance(x)                         # (B, 3, H, W)
        emb, maps = self.encoder(enhanced)                  # (B, D), [(B, ...)]
        with torch.no_grad():
            _, maps_in = self.encoder(x)
        return {"enhanced": enhanced, "embedding": emb, "maps": maps, "maps_input": maps_in}

    def forward(self, outputs: dict, batch: Batch | None = None) -> dict[str, torch.Tensor]:
        step = batch.step if batch is not None else 0
        total = batch.total_steps if batch is not None and batch.total_steps else 1
        emb = outputs["embedding"]
        if step < round(self.warmup_fraction * total):     # reconstruction only
            rec = WARMUP_REC_WEIGHT * reconstruction_loss(outputs["maps"], outputs["maps_input"], self.warmup_weights)
            return {"reconstruction": rec, "guidance": emb.new_zeros(())}
        rec = JOINT_REC_WEIGHT * reconstruction_loss(outputs["maps"], outputs["maps_input"], self.joint_weights)
        guide = (GUIDANCE_WEIGHT * guidance_loss(emb, self.residual, self.threshold) if self.guided
                 else emb.new_zeros(()))
        return {"reconstruction": rec, "guidance": guide}


class _Unpaired(torch.utils.data.Dataset):
    """Training items ``(image uint8 (S, S, 3), None)``: images without captions or pairs."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], None


def _as_uint8_batch(images) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise UsageError(f"images must be a uint8 array (N, H, W, 3), got {arr.dtype} {arr.shape}")
    return arr


def train_rave(backbone, backlit, residual: Residual, *, guided: bool = True, steps: int = 300,
               batch_size: int = 8, lr: float = 1e-3, weight_decay: float = 1e-3, width: int = 32,
               warmup_fraction: float = WARMUP_FRACTION, seed: int = 0, out_dir: str | Path | None = None,
               log_every: int = 25, progress: bool | None = None) -> EnhancementNet:
    """Train an :class:`EnhancementNet` on unpaired backlit images with the Trainer.

    Parameters
    ----------
    backbone : Backbone
        Frozen for the run only: its weights, ``requires_grad`` flags, train mode and
        device are as before afterwards.
    backlit : ndarray of uint8, shape (N, S, S, 3)
        Training images (square, one size).
    residual : Residual
        From :func:`residual_vector` on the same Backbone.
    guided : bool, default True
        False trains the unguided baseline (same steps, no guidance term).
    steps, batch_size, lr, weight_decay : training (see the module's deviations)
    width : int, default 32
        :class:`EnhancementNet` width (32 is the reference's).
    warmup_fraction : float, default WARMUP_FRACTION
    seed : int, default 0
        Seeds the initialisation and the batch order.
    out_dir : path, optional
        Receives the Trainer's metrics and checkpoint; a temporary folder by default.
    log_every : int, default 25
    progress : bool or None

    Returns
    -------
    EnhancementNet
        In eval mode.
    """
    images = _as_uint8_batch(backlit)
    if images.shape[1] != images.shape[2]:
        raise UsageError(f"training images must be square, got {images.shape[1]}x{images.shape[2]}")
    net = EnhancementNet(width, seed=seed)
    objective = RaveObjective(backbone.model, backbone.preprocess_cfg, residual, guided=guided,
                              warmup_fraction=warmup_fraction)
    size = images.shape[1]
    pp = {"size": [size, size], "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}  # the net reads [0, 1]
    with tempfile.TemporaryDirectory() as tmp, frozen(backbone.model):
        config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                             warmup_steps=0, grad_clip=None, seed=seed, ckpt_every=0, log_every=log_every,
                             out_dir=str(out_dir if out_dir is not None else tmp), device=str(backbone.device))
        Trainer(net, None, None, _Unpaired(images), config, progress=progress, objective=objective,
                preprocess_cfg=pp).fit()
    return net.eval()


# ----------------------------------------------------------------- inference and metrics


def _to_float(images) -> torch.Tensor:
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise UsageError(f"images must be (N, H, W, 3) or (H, W, 3), got {arr.shape}")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(0, 3, 1, 2)  # (N, 3, H, W)


@torch.no_grad()
def enhance(model: EnhancementNet, images, *, batch_size: int = 32, max_side: int | None = None) -> np.ndarray:
    """Enhance images: ``clamp(I / M(I), 0, 1)``.

    Parameters
    ----------
    model : EnhancementNet
    images : ndarray of shape (N, H, W, 3) or (H, W, 3)
        uint8, or float in [0, 1].
    batch_size : int, default 32
    max_side : int, optional
        Images whose longer side exceeds this get their illumination map ``M`` computed on
        a copy resized (area) to ``max_side`` on the longer side, then upsampled bilinearly
        to full size; the division ``I / M`` is at full size, so the output keeps the
        input's size.  Bounds the memory of the net's full-resolution feature maps (a
        6000 x 4000 photo at width 16 needs several GB).  None: always at full size (as the
        reference code).  A deviation for large images only: ``M`` is smooth, so little is
        lost, but it is not the full-resolution map.

    Returns
    -------
    ndarray of float32, shape (N, H, W, 3)
        In [0, 1].

    Raises
    ------
    UsageError
        Bad image array or ``max_side`` < 8.
    """
    if max_side is not None and int(max_side) < 8:
        raise UsageError(f"max_side must be >= 8 pixels or None, got {max_side}")
    x = _to_float(images)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def one(batch: torch.Tensor) -> torch.Tensor:                        # (B, 3, H, W) -> same
        h, w = batch.shape[-2:]
        if max_side is None or max(h, w) <= max_side:
            return model.enhance(batch)
        scale = max_side / max(h, w)
        small = F.interpolate(batch, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
        m = F.interpolate(model(small), size=(h, w), mode="bilinear", align_corners=False)   # (B, 1, H, W)
        return torch.clamp(batch / (m + _EPS), 0, 1)

    try:
        out = [one(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out).permute(0, 2, 3, 1).numpy() if out else np.zeros((0, *x.shape[2:], 3), np.float32)


def image_quality(pred, target) -> dict[str, float]:
    """Mean per-image PSNR (dB) and SSIM of RGB images in [0, 1] (torchmetrics).

    Parameters
    ----------
    pred, target : ndarray of shape (N, H, W, 3)
        uint8 or float in [0, 1].

    Returns
    -------
    dict
        ``{"psnr": float, "ssim": float}``; SSIM with a Gaussian window of 11, sigma 1.5.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    p, t = _to_float(pred).double(), _to_float(target).double()
    if p.shape != t.shape:
        raise UsageError(f"pred and target shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    psnr = peak_signal_noise_ratio(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3))  # (N,)
    ssim = structural_similarity_index_measure(p, t, data_range=1.0, reduction="none")     # (N,)
    return {"psnr": float(psnr.mean()), "ssim": float(ssim.mean())}


# ----------------------------------------------------------------- save / load


def save_enhancer(model: EnhancementNet, out_dir: str | Path) -> Path:
    """Write ``enhancer.json`` (width) and ``enhancer.safetensors`` to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(out / "enhancer.safetensors"))
    (out / "enhancer.json").write_text(json.dumps({"method": "RAVE", "width": model.width}, indent=2) + "\n")
    return out


def load_enhancer(path: str | Path) -> EnhancementNet:
    """Read an enhancer written by :func:`save_enhancer`.

    Raises
    ------
    ModelLoadError
        The folder lacks the files, they are unreadable or corrupt, or the weights do not
        fit the recorded width (exit code 3 in the CLI; one line, no traceback).
    """
    from ..models.state_dicts import read_state_dict

    path = Path(path)
    meta, weights = path / "enhancer.json", path / "enhancer.safetensors"
    if not meta.is_file() or not weights.is_file():
        raise ModelLoadError(f"{path} is not a RAVE enhancer folder (needs enhancer.json and enhancer.safetensors)")
    try:
        cfg = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelLoadError(f"{meta}: not readable JSON ({err})") from None
    width = cfg.get("width") if isinstance(cfg, dict) else None
    if isinstance(width, bool) or not isinstance(width, int) or not 4 <= width <= 4096:
        raise ModelLoadError(f"{meta}: needs a JSON object with an integer 'width' in [4, 4096], as save_enhancer "
                             "writes")
    state = read_state_dict(weights)                       # ModelLoadError for a corrupt or foreign file
    model = EnhancementNet(width)
    expected = model.state_dict()
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    wrong = [k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ModelLoadError(f"{weights}: the weights do not fit an enhancer of width {width} "
                             f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape)")
    model.load_state_dict(state)
    return model.eval()


# ----------------------------------------------------------------- ShapesWorld data


def shapes_backlit(split: str, indices, *, seed: int = 0, world: str = "shapes-tiny") -> tuple[np.ndarray, np.ndarray]:
    """Scenes ``indices`` of ``split`` rendered backlit and well-lit (the original domain).

    Parameters
    ----------
    split : str
    indices : iterable of int
    seed : int, default 0
    world : str, default "shapes-tiny"

    Returns
    -------
    backlit, well_lit : ndarray of uint8, shape (N, S, S, 3)
        Row i of both shows the same scene: ground truth pairs (for evaluation; training
        takes the backlit and well-lit images of disjoint index ranges).
    """
    from ..data.shapes import get_world

    base = get_world(world, seed=seed)
    indices = list(indices)
    well_lit, _ = base.render_batch(split, indices)
    backlit, _ = base.replace(domain="backlit").render_batch(split, indices)
    return backlit, well_lit
