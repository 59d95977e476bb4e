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
6. Optional mask-model refinement (the reference's ``sam_refinement`` with SAM's prompt
   decoder), where ``mask_model=`` is given; :func:`mask_refinement`: on the class map and
   probabilities downsampled by 2, every class's connected regions (8-connectivity) of at
   least ``minimal_area`` pixels whose probability passes ``coarse_thresh`` become prompts
   (a point at the region's most probable pixel, its box, and the class's probability map
   above ``coarse_thresh`` as a dense prompt); the mask model returns one mask and a quality
   score per region; masks scoring above ``iou_thresh`` replace the class map
   (``refined_c = max_r(mask_r · p_c) · ∪_r mask_r``, argmax over classes); pixels no kept
   mask covers keep the original prediction; regions whose mask failed keep their original
   probabilities where those are higher.

The guide is pluggable (``guide=``): ``None`` uses the CLIP tower's own tokens entering its
last block (no extra model needed); a :class:`~cliplab.models.Backbone` uses that model's
tokens the same way; any callable ``images (B, 3, H, W) -> tokens (B, h, w, C)`` (a timm
DINO ViT's patch tokens, for instance) plugs in as it is.  The mask model is pluggable too
(``mask_model=``): any callable ``mask_model(image, points=, boxes=, mask_input=) ->
(masks, scores)`` (see :func:`mask_refinement`); :func:`sam_mask_model` wraps SAM
(``segment_anything``) by model type and checkpoint path where a user has them.  DINO and
SAM weights are not bundled (no hub access here).

Deviations: SAM-attention aggregation is not implemented (step 4 uses the guide affinity of
step 1 on the whole image); the reference's SAM-specific mask-prompt handling (resize to
256, scale 0.005) lives in :func:`sam_mask_model`, the refinement itself sees probability
masks; as in the reference, failed regions change the probabilities but never the class
map (its test compares against probabilities it has just raised); guide tokens are resized (bilinear) to
CLIP's patch grid, whereas the reference resizes CLIP's values to the guide's grid; the mean
in ``S'`` is taken per window, whereas the reference's ``torch.mean`` runs over its whole
batch, which holds all windows of one image (the same for a single window; a few 1e-2 on
the last block's output for 2x2 windows of random weights); each token's own similarity is
kept so that no row of ``S'`` is all -inf.  Positional embeddings of windows other than the
model's input size are resized as the reference's ``interpolate_pos_encoding`` does
(``positions = "scale"``).  Compared with the reference code (random weights): see
docs/segmentation.md.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..validation import check_number, check_positive_int
from . import DENSE_METHODS
from .attention import prelast_tokens, project_tokens, qkv
from .base import DenseFeatures, DenseMethod

__all__ = ["Trident", "guided_affinity", "mask_refinement", "sam_mask_model"]


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


def _region_prompts(pred: np.ndarray, probs: torch.Tensor, c: int, minimal_area: int):
    """Connected regions of class ``c`` (8-connectivity, >= ``minimal_area`` px): masks, points (x, y), boxes."""
    from scipy import ndimage

    lab, n = ndimage.label(pred == c, structure=np.ones((3, 3), bool))
    regions, points, boxes = [], [], []
    for r in range(1, n + 1):
        region = lab == r
        if region.sum() < minimal_area:
            continue
        at = int(torch.argmax(probs[c] * torch.from_numpy(region)))               # first most probable pixel
        ys, xs = np.nonzero(region)
        regions.append(region)
        points.append((at % pred.shape[1], at // pred.shape[1]))
        boxes.append((xs.min(), ys.min(), xs.max(), ys.max()))                     # torchvision masks_to_boxes
    return regions, np.asarray(points, np.float32).reshape(-1, 2), np.asarray(boxes, np.float32).reshape(-1, 4)


def mask_refinement(probs: torch.Tensor, pred: torch.Tensor, image: np.ndarray, mask_model: Callable, *,
                    coarse_thresh: float = 0.10, minimal_area: int = 225, iou_thresh: float = 0.9,
                    down: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Trident's SAM-style refinement of one image's prediction with a promptable mask model.

    Parameters
    ----------
    probs : Tensor (C, H, W)
        Class probabilities.
    pred : Tensor (H, W) int
        Class map.
    image : ndarray (H, W, 3) uint8
        The image, given to the mask model.
    mask_model : callable
        ``mask_model(image, points=(R, 2) xy, boxes=(R, 4) xyxy, mask_input=(H, W)) ->
        (masks (R, H, W), scores (R,))``: one mask per region prompt (probabilities in [0, 1]
        or booleans; > 0.5 is inside) and its predicted quality (SAM's predicted IoU).
        Coordinates are pixels of ``image``; ``mask_input`` is the class's probability map,
        zero below ``coarse_thresh``.
    coarse_thresh : float, default=0.10
        Pixels whose top probability is below it are no class's region; classes whose
        probability never reaches it get no prompt.
    minimal_area : int, default=225
        Smallest region, in pixels of the map downsampled by ``down``.
    iou_thresh : float, default=0.9
        Masks scoring at most this are dropped (their regions "failed").
    down : int, default=2
        Downsampling of the maps for the region search (the reference's speed-up).

    Returns
    -------
    probs : Tensor (C, H, W)
        Refined class scores.
    pred : Tensor (H, W) int64
        Refined class map.

    Raises
    ------
    UsageError
        A mask model that returns the wrong number or shape of masks.
    """
    C, H, W = probs.shape
    dh, dw = max(1, H // down), max(1, W // down)
    p_down = F.interpolate(probs[None].float(), size=(dh, dw), mode="bilinear", align_corners=False)[0]
    pred_down = F.interpolate(pred[None, None].float(), size=(dh, dw), mode="nearest")[0, 0].long()
    pred_down[p_down.max(dim=0).values < coarse_thresh] = C                       # no class: not split
    pred_np = pred_down.numpy()
    sy, sx = H / dh, W / dw
    refined = torch.zeros(C, H, W)
    failed = torch.zeros(H, W, dtype=torch.bool)
    for c in range(C):
        if p_down[c].max() < coarse_thresh:
            continue
        regions, points, boxes = _region_prompts(pred_np, p_down, c, minimal_area)
        if not regions:
            continue
        points = points * np.float32([sx, sy])
        boxes = boxes * np.float32([sx, sy, sx, sy])
        mask_input = torch.where(probs[c] > coarse_thresh, probs[c], torch.zeros(())).numpy()
        masks, scores = mask_model(image, points=points, boxes=boxes, mask_input=mask_input)
        masks = torch.as_tensor(np.asarray(masks)).float()
        scores = torch.as_tensor(np.asarray(scores)).float().reshape(-1)
        if masks.shape != (len(regions), H, W) or len(scores) != len(regions):
            raise UsageError(f"the mask model returned masks {tuple(masks.shape)} and {len(scores)} scores for "
                             f"{len(regions)} prompts on a {H}x{W} image; it must return one (H, W) mask and one "
                             "score per prompt")
        keep = scores > iou_thresh
        for r in np.flatnonzero(~keep.numpy()):                                    # failed regions, full size
            up = F.interpolate(torch.from_numpy(regions[r])[None, None].float(), size=(H, W), mode="nearest")
            failed |= up[0, 0].bool()
        if keep.any():
            kept = masks[keep]                                                     # (R', H, W)
            inside = (kept > 0.5).any(dim=0)
            refined[c] = (kept * probs[c]).max(dim=0).values * inside
    out = torch.where(refined.sum(dim=0) == 0, pred.long(), refined.argmax(dim=0))
    if failed.any():
        failed_p = probs.float() * failed
        refined = torch.where(failed_p > refined, failed_p, refined)
    return refined, out


def sam_mask_model(checkpoint: str, model_type: str = "vit_b", *, mask_coff: float = 0.005,
                   device: str = "cpu") -> Callable:
    """A :func:`mask_refinement` mask model from a SAM checkpoint (package ``segment_anything``).

    ``model_type`` is a key of ``segment_anything.sam_model_registry`` (``vit_b``, ``vit_l``,
    ``vit_h``) and ``checkpoint`` the path of its weights.  As the reference: one point and
    one box prompt per region, the class probability map resized to SAM's 256 px mask input
    and scaled by ``mask_coff``, one mask per prompt (``multimask_output=False``), SAM's
    predicted IoU as the score.  Not exercised by cliplab's tests (no SAM weights here).

    Raises
    ------
    UsageError
        ``segment_anything`` is not installed.
    """
    try:
        from segment_anything import SamPredictor, sam_model_registry
    except ImportError:
        raise UsageError("SAM refinement needs the segment_anything package and a SAM checkpoint "
                         "(pip install segment-anything)") from None
    predictor = SamPredictor(sam_model_registry[model_type](checkpoint=checkpoint).to(device).eval())
    state = {"image": None}

    def model(image, *, points, boxes, mask_input):
        if state["image"] is not image:
            predictor.set_image(image)
            state["image"] = image
        H, W = image.shape[:2]
        h, w = predictor.transform.get_preprocess_shape(H, W, 256)
        m = F.interpolate(torch.as_tensor(mask_input)[None, None].float(), size=(h, w), mode="bilinear",
                          align_corners=False)
        m = F.pad(m, (0, 256 - w, 0, 256 - h)) * mask_coff
        dev = predictor.device
        pts = predictor.transform.apply_coords_torch(torch.as_tensor(points, device=dev), (H, W))[:, None]
        bxs = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes, device=dev), (H, W))
        masks, scores, _ = predictor.predict_torch(point_coords=pts, point_labels=torch.ones(len(pts), 1, device=dev),
                                                   boxes=bxs, mask_input=m[0].expand(len(pts), 1, 256, 256).to(dev),
                                                   multimask_output=False, return_logits=True)
        return masks[:, 0].sigmoid().cpu().numpy(), scores[:, 0].cpu().numpy()

    return model


@DENSE_METHODS.register("trident", help="Trident: guided attention per window, spliced, then global aggregation")
class Trident(DenseMethod):
    """Trident (see the module docstring).

    Parameters
    ----------
    guide : None, Backbone or callable, default=None
        Token source of the affinities (see the module docstring).
    beta, gamma : float, default=1.2, 3.0
        Affinity offset and sharpness.
    mask_model : callable, optional
        Refine each image's prediction with this promptable mask model
        (:func:`mask_refinement`; :func:`sam_mask_model` for SAM).
    coarse_thresh, minimal_area, iou_thresh : float, int, float, default=0.10, 225, 0.9
        Options of :func:`mask_refinement`.
    """

    logit_scale = 40.0
    splice = True
    positions = "scale"       # the reference's interpolate_pos_encoding, see attention.interpolate_positions

    def __init__(self, *, guide=None, beta: float = 1.2, gamma: float = 3.0, mask_model: Callable | None = None,
                 coarse_thresh: float = 0.10, minimal_area: int = 225, iou_thresh: float = 0.9):
        self.guide = guide
        self.beta = check_number("beta", beta)
        self.gamma = check_number("gamma", gamma, minimum=0, strict_minimum=True)
        if mask_model is not None and not callable(mask_model):
            raise UsageError("mask_model must be a callable (image, points=, boxes=, mask_input=) -> (masks, scores)")
        self.mask_model = mask_model
        self.coarse_thresh = check_number("coarse_thresh", coarse_thresh, minimum=0, maximum=1)
        self.minimal_area = check_positive_int("minimal_area", minimal_area, minimum=0)
        self.iou_thresh = check_number("iou_thresh", iou_thresh)

    @property
    def refines_prediction(self) -> bool:
        return self.mask_model is not None

    def refine_prediction(self, probs, pred, image):
        return mask_refinement(probs, pred, image, self.mask_model, coarse_thresh=self.coarse_thresh,
                               minimal_area=self.minimal_area, iou_thresh=self.iou_thresh)

    def _guide_tokens(self, backbone, images: torch.Tensor, grid) -> torch.Tensor:
        """Guide tokens (B, h*w, C) on CLIP's patch grid ``grid``."""
        if self.guide is None or hasattr(self.guide, "model"):
            source = backbone if self.guide is None else self.guide
            x, g = prelast_tokens(source.model.visual, images.to(source.device), positions=self.positions)
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
        x, grid = prelast_tokens(visual, images, positions=self.positions)      # (B, 1 + N, W)
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
