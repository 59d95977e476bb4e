"""ExCEL: training-free patch–text CAMs and pseudo-masks for weakly supervised segmentation.

Yang, Meng, Fu, Tang, Wang, Song, "Exploring CLIP's Dense Knowledge for Weakly Supervised
Semantic Segmentation" (ExCEL), CVPR 2025, arXiv:2503.20826; reference code zwyang6/ExCEL at
commit 2cd7f51 (``model/load_attr.py`` ``attr_aggregate``, ``clip/clip_surgery_model.py`` ``Attention``,
``ResidualAttentionBlock``, ``VisionTransformer.forward``, ``clip/clip.py``
``clip_feature_surgery``, ``utils/affutils.py`` ``refine_cams_with_aff``,
``refine_cams_with_bkg_weclip``, ``utils/PAR.py``).  The training-free half of the paper:

1. **Text semantic enrichment (TSE).**  Class text ``t_c`` (prompt ``"a clean origami {c}."``),
   a bank ``A`` (D, K) of K-means centres of CLIP-encoded class descriptions (GPT-4 in the
   paper, K = 112 for VOC)::

       w_c = softmax(t_cᵀ A)       with the lowest 10 % of the K scores set to -inf   (TSE weights)
       T_c = norm(t_c + A w_c)                                                      (enriched text)

   Background prompts are not enriched.  :func:`enrich_text`, :func:`description_bank`.
2. **Static visual calibration (SVC).**  The last 5 blocks get a second, FFN-free path fed by
   ``LN1`` of the original path's tokens (per head, ``s = d_head^-1/2``)::

       A = Σ_heads (softmax(s q qᵀ) + softmax(s k kᵀ) + softmax(s v vᵀ)) / 3         (rows sum to H)
       x' <- x' + W_o (A v)        (x' starts as the tokens entering the first of these blocks)

   The class token comes from the original path; then ``ln_post`` and ``proj``.  :func:`svc_tokens`.
3. **Patch–text CAM** (CLIP Surgery's feature surgery, ``t = 2``): with ``f`` the features
   L2-normalised *along the token axis* (the reference's ``norm(dim=1)``) and ``p =
   softmax(t f_cls Tᵀ)``, ``ω_c = p_c / mean(p)``::

       S_ic = ω_c f_iᵀT_c - mean_c' ω_c' f_iᵀT_c'        CAM_c = minmax_i S_ic      (surgery)

   (the mean runs over every query, background prompts included; min-max over all tokens,
   class token included).  :func:`feature_surgery`.
4. **CAM refinement and pseudo-masks** (image-level labels: only the classes present count):
   the original path's attention of the last 6 blocks, averaged, made doubly stochastic
   (3 Sinkhorn rounds), symmetrised and squared, ``T``; per present class the patches inside
   the boxes of the connected regions above ``0.79 max`` of its CAM, ``m``; refined CAM
   ``(T ⊙ 1mᵀ) CAM_c``; each min-maxed and upsampled to the image, background ``1 - max_c``,
   PAR (20 iterations, dilations 1, 2, 4, 8, 12, 24), argmax.  :func:`refine_cams`,
   :func:`par_refine`, :func:`cam_pseudo_masks`.

The learnable visual calibration (the trained decoder of the paper's final numbers) is not
part of this module.

``segment(..., method="excel")`` runs steps 1–3 in the shared protocol of
:func:`cliplab.dense.segment` (windows, background, ``prob_thd``) for open-vocabulary
segmentation without image labels; :func:`cam_pseudo_masks` is the weakly supervised use.

Defaults: SVC on the last ``min(5, depth)`` blocks, TSE keeps the top 90 % of the bank,
surgery temperature 2, box threshold 0.79 over the last ``min(6, depth)`` blocks'
attention, PAR 20 iterations.

Deviations:

- *Description bank.*  The paper's GPT-4 descriptions are not shipped: ``descriptions=``
  takes a user bank ``{class: [sentences]}``; the default is generated from
  :data:`DESCRIPTION_TEMPLATES` (generic attribute sentences after the class prompt, as the
  reference's files are "a clean origami {c}. <attribute sentence>").  K defaults to
  ``ceil(0.28 N)`` for N descriptions (the reference: 112 of 400), at least the number of
  classes; K-means is scikit-learn's with ``random_state=0``, ``n_init="auto"``.
- *TSE on small banks.*  The reference masks ``int(0.1 K)`` scores; with K < 10 that is 0
  and its ``corr[:, -0:]`` masks every score (NaN); here nothing is masked then.
- *segment().*  Tokens are normalised per token (cosine, the protocol of every method),
  not along the token axis, and the surgery scores ``S`` are not min-maxed (a class absent
  from a window must not reach 1 there); the logits are ``S`` times the logit scale (100).
- The reference's mixed attention scales are kept: ``nn.MultiheadAttention`` returns
  head-averaged weights for the blocks before SVC and the SVC blocks return head sums, so
  in the affinity average the SVC blocks weigh H times more.  The reference's box end
  ``min(x + w, W - 1)`` (the last patch row and column never inside a box) is kept too.
- Images are resized to the model input by :func:`cliplab.dense.segment`'s loader (PIL
  bicubic; then bilinearly to ``size``); the reference resizes normalised tensors
  bilinearly to 320 px.
- Connected regions are found with ``scipy.ndimage.label`` (8-connectivity) instead of
  OpenCV contours (same boxes: a hole's contour box lies inside its region's box).  CAMs
  are upsampled with torch's bilinear resize (OpenCV's ``INTER_LINEAR`` in the reference;
  both half-pixel, no antialiasing).

Reference parity: on a random-weight open_clip ``ViT-B-16-quickgelu`` loaded into the
reference's own CLIP copy, :func:`svc_tokens`, :func:`feature_surgery`, :func:`enrich_text`,
:func:`refine_cams` and :func:`par_refine` match the reference functions run unmodified
(see ``docs/segmentation.md`` for the numbers).
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..validation import check_backbone, check_number, check_positive_int
from . import DENSE_METHODS
from .attention import interpolate_positions, qkv
from .base import DenseFeatures, DenseMethod

logger = logging.getLogger(__name__)

__all__ = ["ExCEL", "DESCRIPTION_TEMPLATES", "REFERENCE_BACKGROUND", "default_descriptions", "description_bank",
           "enrich_text", "svc_tokens", "feature_surgery", "transition_matrix", "refine_cams", "par_refine",
           "excel_cams", "cam_pseudo_masks"]

#: The reference's class prompt.
PROMPT = "a clean origami {c}."

#: Attribute sentences of the default description bank (after the class prompt).
DESCRIPTION_TEMPLATES = (
    "it has a distinctive shape.",
    "it has a characteristic outline.",
    "it has a typical colour.",
    "it has a typical texture.",
    "it has recognisable parts.",
    "it is seen from the front.",
    "it is seen from the side.",
    "it is small in the picture.",
    "it is large in the picture.",
    "it stands out from its background.",
)

#: The reference's background prompts for VOC (``datasets/clip_text.py`` ``BACKGROUND_CATEGORY``).
REFERENCE_BACKGROUND = ("ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
                        "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road",
                        "rock", "street", "valley", "bridge", "sign")


# ------------------------------------------------------------------------------ text
def default_descriptions(classes: Sequence[str], *, prompt: str = PROMPT,
                         templates: Sequence[str] = DESCRIPTION_TEMPLATES) -> dict[str, list[str]]:
    """A description bank ``{class: [prompt + " " + template, ...]}`` generated from templates."""
    return {c: [f"{prompt.format(c=c)} {t.format(c=c)}" for t in templates] for c in classes}


def description_bank(backbone, descriptions: Mapping[str, Sequence[str]], *, n_clusters: int | None = None,
                     seed: int = 0) -> np.ndarray:
    """TSE's attribute bank: K-means centres of the CLIP-encoded descriptions, float32 (D, K).

    ``n_clusters`` defaults to ``ceil(0.28 N)`` for N descriptions (the reference's 112 of
    400), at least the number of classes and at most N.
    """
    from sklearn.cluster import KMeans

    sentences = [str(s).lower() for v in descriptions.values() for s in v]
    if not sentences:
        raise UsageError("the description bank is empty; give at least one description per class")
    n = len(sentences)
    k = n_clusters if n_clusters is not None else max(len(descriptions), math.ceil(0.28 * n))
    k = check_positive_int("n_clusters", min(k, n))
    emb = backbone.encode_texts(sentences, progress=False)                            # (N, D), normalised
    logger.debug("description bank: %d descriptions of %d classes -> %d clusters", n, len(descriptions), k)
    km = KMeans(n_clusters=k, random_state=seed, n_init="auto").fit(emb)
    return km.cluster_centers_.T.astype(np.float32)                                   # (D, K)


def enrich_text(text: torch.Tensor, bank: torch.Tensor, *, keep: float | None = 0.9) -> torch.Tensor:
    """Text semantic enrichment: ``norm(t_c + A softmax(t_cᵀ A))`` (TSE weights, enriched text).

    Parameters
    ----------
    text : Tensor (C, D)
        Normalised class text embeddings (foreground classes only).
    bank : Tensor (D, K)
        Description bank (:func:`description_bank`).
    keep : float in (0, 1] or None, default=0.9
        Share of the K bank scores kept per class; the lowest ``int((1 - keep) K)`` are set
        to -inf before the softmax (``None``: all kept).

    Returns
    -------
    Tensor (C, D)
        L2-normalised enriched embeddings.
    """
    logits = text @ bank                                                              # (C, K)
    if keep is not None:
        drop = int((1 - keep) * bank.shape[1])
        if drop > 0:
            order = logits.argsort(dim=-1, descending=True)
            low = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order[:, -drop:], True)
            logits = logits.masked_fill(low, float("-inf"))
    w = torch.softmax(logits, dim=-1)                                                 # TSE weights
    return F.normalize(text + w @ bank.T, dim=-1)                                     # enriched text


# ---------------------------------------------------------------------------- visual
def _svc_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SVC: Σ_heads of the mean of the q-q, k-k and v-v softmaxes: (B, H, T, d) -> (B, 1, T, T)."""
    a = sum(torch.softmax((x @ x.transpose(-2, -1)) * scale, dim=-1) for x in (q, k, v)) / 3
    return a.sum(dim=1, keepdim=True)


def svc_tokens(visual, images: torch.Tensor, *, layers: int = 5, calibrate: bool = True,
               positions: str = "bilinear") -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int]]:
    """Static visual calibration: the tower with a second, FFN-free path in its last ``layers`` blocks.

    Parameters
    ----------
    visual : open_clip VisionTransformer
    images : Tensor (B, 3, H, W)
        Normalised, sides multiples of the patch size.
    layers : int, default=5
        Blocks with the calibrated path (at most the tower's depth).
    calibrate : bool, default=True
        ``False``: the unchanged tower (CLIP's own tokens), with the same attention outputs.
    positions : str, default="bilinear"
        Positional-embedding resizing (:func:`~cliplab.dense.attention.interpolate_positions`).

    Returns
    -------
    tokens : Tensor (B, 1 + h*w, D)
        ``ln_post`` and ``proj`` of the calibrated path's tokens, the class token from the
        original path (not normalised).
    attentions : list of Tensor (B, T, T)
        The original path's attention per block, as the reference returns it: averaged over
        heads before the calibrated blocks, summed over heads in them.
    grid : (h, w)
    """
    B, _, H, W = images.shape
    ph, pw = visual.patch_size if isinstance(visual.patch_size, tuple) else (visual.patch_size,) * 2
    if H % ph or W % pw:
        raise UsageError(f"input {H}x{W} is not a multiple of the patch size {ph}x{pw}")
    grid = (H // ph, W // pw)
    x = visual.conv1(images.to(visual.conv1.weight.dtype))                            # (B, W, h, w)
    x = x.reshape(B, x.shape[1], -1).permute(0, 2, 1)                                 # (B, N, W)
    x = torch.cat([visual.class_embedding.to(x.dtype).expand(B, 1, -1), x], dim=1)
    x = visual.ln_pre(x + interpolate_positions(visual, grid, mode=positions).to(x.dtype))  # (B, T, W)
    blocks = list(visual.transformer.resblocks)
    first = len(blocks) - min(layers, len(blocks))
    attentions, x_new = [], None
    for i, block in enumerate(blocks):
        q, k, v = qkv(block, x)                                                       # (B, H, T, d)
        scale = q.shape[-1] ** -0.5
        a = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)                 # (B, H, T, T)
        o = (a @ v).transpose(1, 2).reshape(x.shape)
        out = x + block.ls_1(block.attn.out_proj(o))
        out = out + block.ls_2(block.mlp(block.ln_2(out)))
        if i >= first and calibrate:
            x_new = x if x_new is None else x_new                                     # the new path starts here
            o_new = (_svc_attention(q, k, v, scale) @ v).transpose(1, 2).reshape(x.shape)
            x_new = x_new + block.ls_1(block.attn.out_proj(o_new))                    # no FFN on the new path
            attentions.append(a.sum(dim=1))
        else:
            attentions.append(a.mean(dim=1))
        x = out
    z = x if x_new is None else torch.cat([x[:, :1], x_new[:, 1:]], dim=1)           # class token: original path
    z = visual.ln_post(z)
    z = z @ visual.proj if getattr(visual, "proj", None) is not None else z
    return z, attentions, grid


def feature_surgery(features: torch.Tensor, text: torch.Tensor, *, t: float = 2.0,
                    minmax: bool = True) -> torch.Tensor:
    """CLIP Surgery's patch–text CAM (ExCEL's ``clip_feature_surgery``).

    Parameters
    ----------
    features : Tensor (B, T, D)
        Token features, class token first (normalised as the caller wants them).
    text : Tensor (Q, D)
        Query embeddings.
    t : float, default=2
        Temperature of the class-token probabilities that weigh the classes.
    minmax : bool, default=True
        Min-max each query's scores over the tokens (class token included, as the reference).

    Returns
    -------
    Tensor (B, T, Q)
        ``S_ic = ω_c f_iᵀ t_c - mean_c' ω_c' f_iᵀ t_c'`` (min-maxed per query).
    """
    prob = torch.softmax(t * features[:, :1] @ text.T, dim=-1)                       # (B, 1, Q)
    w = prob / prob.mean(dim=-1, keepdim=True)                                        # ω
    s = w * (features @ text.T)                                                       # (B, T, Q)
    s = s - s.mean(dim=-1, keepdim=True)                                              # redundant features removed
    if minmax:
        lo, hi = s.min(dim=1, keepdim=True).values, s.max(dim=1, keepdim=True).values
        s = (s - lo) / (hi - lo)
    return s


# ------------------------------------------------------------------------ refinement
def transition_matrix(attention: torch.Tensor) -> torch.Tensor:
    """Affinity ``T`` (N, N) from an attention map (N, N): 3 Sinkhorn rounds, symmetrised, squared."""
    t = attention / attention.sum(dim=0, keepdim=True)
    t = t / t.sum(dim=1, keepdim=True)
    for _ in range(2):
        t = t / t.sum(dim=0, keepdim=True)
        t = t / t.sum(dim=1, keepdim=True)
    t = (t + t.T) / 2
    return t @ t


def _box_mask(cam: np.ndarray, threshold: float) -> np.ndarray:
    """Patches inside the boxes of the connected regions above ``threshold * max`` (the reference's rule)."""
    from scipy import ndimage

    h, w = cam.shape
    img = (cam * 255).astype(np.uint8)
    binary = img > int(threshold * img.max())
    lab, n = ndimage.label(binary, structure=np.ones((3, 3), bool))
    mask = np.zeros((h, w), bool)
    for sl in ndimage.find_objects(lab):
        mask[sl[0].start:min(sl[0].stop, h - 1), sl[1].start:min(sl[1].stop, w - 1)] = True
    return mask


def refine_cams(cams: torch.Tensor, attentions: Sequence[torch.Tensor], *, threshold: float = 0.79,
                layers: int = 6) -> torch.Tensor:
    """ExCEL's affinity refinement of one image's CAMs.

    Parameters
    ----------
    cams : Tensor (C, h, w)
        CAMs of the classes present in the image, each in [0, 1].
    attentions : sequence of Tensor (T, T)
        The original path's attention per block (:func:`svc_tokens`), class token first.
    threshold : float, default=0.79
        Box threshold, a share of each CAM's maximum.
    layers : int, default=6
        Last blocks averaged.

    Returns
    -------
    Tensor (C, h, w)
        ``(T ⊙ 1 mᵀ) cam`` per class.
    """
    C, h, w = cams.shape
    att = torch.stack([a[1:, 1:] for a in attentions[-layers:]]).mean(dim=0).float()  # (N, N)
    trans = transition_matrix(att)
    out = []
    for cam in cams:
        m = torch.from_numpy(_box_mask(cam.cpu().numpy(), threshold)).to(trans).reshape(1, -1)   # (1, N)
        out.append(((trans * m) @ cam.reshape(-1, 1).float()).reshape(h, w))
    return torch.stack(out) if out else cams.new_zeros((0, h, w))


_RING = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]   # PAR's one-hot 3 x 3 kernels


def _neighbours(x: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """The 8 neighbours at each dilation, replicate padding: (B, C, H, W) -> (B, C, 8 * len(dilations), H, W).

    Neighbour order per dilation: row-major over the 3 x 3 ring (PAR's one-hot kernels).
    """
    H, W = x.shape[-2:]
    out = []
    for d in dilations:
        pad = F.pad(x, [d] * 4, mode="replicate")
        out += [pad[..., r * d:r * d + H, c * d:c * d + W] for r, c in _RING]
    return torch.stack(out, dim=2)


def par_refine(image: torch.Tensor, masks: torch.Tensor, *, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
               iterations: int = 20, w1: float = 0.3, w2: float = 0.01) -> torch.Tensor:
    """Pixel-adaptive refinement (PAR, from ToCo, as ExCEL uses it).

    Parameters
    ----------
    image : Tensor (B, 3, H', W')
        The image (any per-channel affine normalisation); resized to the masks.
    masks : Tensor (B, C, H, W)
        Class scores to propagate.

    Returns
    -------
    Tensor (B, C, H, W)
        Scores after ``iterations`` steps of ``m <- Σ_neighbours aff · m``, with ``aff`` a
        softmax over the neighbours of the colour affinity plus ``w2`` times one of the distance.
    """
    img = F.interpolate(image.float(), size=masks.shape[-2:], mode="bilinear", align_corners=True)
    B, _, H, W = img.shape
    nb = _neighbours(img, dilations)                                                   # (B, 3, P, H, W)
    ker = torch.ones(1, 1, 8, 1, 1)
    ker[0, 0, [0, 2, 5, 7]] = math.sqrt(2)
    pos = torch.cat([ker * d for d in dilations], dim=2).to(img)                       # (1, 1, P, 1, 1)
    diff = (nb - img.unsqueeze(2)).abs()
    aff = -(diff / (nb.std(dim=2, keepdim=True) + 1e-8) / w1) ** 2
    aff = aff.mean(dim=1, keepdim=True)                                                # (B, 1, P, H, W)
    pos = pos.repeat(B, 1, 1, H, W)
    pos_aff = -(pos / (pos.std(dim=2, keepdim=True) + 1e-8) / w1) ** 2
    aff = torch.softmax(aff, dim=2) + w2 * torch.softmax(pos_aff, dim=2)
    m = masks.float()
    offsets = [(d, r, c) for d in dilations for r, c in _RING]
    for _ in range(iterations):                        # Σ_j aff_j · neighbour_j(m), without stacking the neighbours
        pads = {d: F.pad(m, [d] * 4, mode="replicate") for d in dilations}
        acc = torch.zeros_like(m)
        for j, (d, r, c) in enumerate(offsets):
            acc += aff[:, :, j] * pads[d][..., r * d:r * d + H, c * d:c * d + W]
        m = acc
    return m


# ----------------------------------------------------------------------------- method
def _prompt(templates) -> str:
    """The class prompt of the default descriptions: a single template as given, else the reference's."""
    from ..zeroshot import get_templates

    tpl = get_templates(templates)
    return tpl[0] if len(tpl) == 1 else PROMPT


@DENSE_METHODS.register("excel", help="ExCEL: text enrichment, static visual calibration, patch-text CAMs (surgery)")
class ExCEL(DenseMethod):
    """ExCEL's training-free CAMs in the shared segmentation protocol (see the module docstring).

    Parameters
    ----------
    descriptions : dict of str -> list of str, optional
        Description bank per class name (default: :func:`default_descriptions` with
        ``prompt``).  ``tse=False`` disables enrichment.
    prompt : str, default="a clean origami {c}."
        Class prompt of the default descriptions.
    n_clusters : int, optional
        Bank size K (default ``ceil(0.28 N)``).
    keep : float, default=0.9
        Share of bank scores kept in TSE.
    layers : int, default=5
        Blocks with static visual calibration (0: none).
    tse : bool, default=True
    t : float, default=2
        Surgery temperature.
    """

    logit_scale = 100.0
    name = "excel"

    def __init__(self, *, descriptions: Mapping[str, Sequence[str]] | None = None, prompt: str = PROMPT,
                 n_clusters: int | None = None, keep: float = 0.9, layers: int = 5, tse: bool = True, t: float = 2.0):
        self.descriptions = descriptions
        self.prompt = str(prompt)
        self.n_clusters = n_clusters
        self.keep = check_number("keep", keep, minimum=0, maximum=1, strict_minimum=True)
        self.layers = check_positive_int("layers", layers, minimum=0)
        self.tse = bool(tse)
        self.t = check_number("t", t, minimum=0)
        self._queries = None

    def text_queries(self, backbone, names, queries, owner, *, background: bool = False):
        if self.tse:
            fg = owner > 0 if background else np.ones(len(owner), bool)
            descriptions = self.descriptions
            if descriptions is None:
                descriptions = default_descriptions([n for i, n in enumerate(names) if not (background and i == 0)],
                                                    prompt=self.prompt)
            bank = torch.from_numpy(description_bank(backbone, descriptions, n_clusters=self.n_clusters))
            q = torch.from_numpy(np.asarray(queries, np.float32))
            q[torch.from_numpy(fg)] = enrich_text(q[torch.from_numpy(fg)], bank, keep=self.keep)
            queries = q.numpy()
        self._queries = torch.from_numpy(np.asarray(queries, np.float32))
        return queries

    def features(self, backbone, images: torch.Tensor) -> DenseFeatures:
        z, _, grid = svc_tokens(backbone.model.visual, images, layers=self.layers, calibrate=self.layers > 0)
        return DenseFeatures(z[:, 1:].reshape(len(images), *grid, -1), {"cls": z[:, 0]})

    def refine(self, logits: torch.Tensor, feats: DenseFeatures) -> torch.Tensor:
        """Feature surgery on the cosine logits (B, Q, h, w): ``ω_c s_c - mean_c' ω_c' s_c'``."""
        q = self._queries.to(logits.device)
        cls = F.normalize(feats.extras["cls"].float(), dim=-1) @ q.T                    # (B, Q)
        p = torch.softmax(self.t * cls, dim=-1)
        w = (p / p.mean(dim=-1, keepdim=True))[:, :, None, None]                        # ω (B, Q, 1, 1)
        s = w * logits
        return s - s.mean(dim=1, keepdim=True)


# ------------------------------------------------------------------- weak supervision
def excel_cams(backbone, images: torch.Tensor, text: torch.Tensor, *, layers: int = 5, t: float = 2.0,
               surgery: bool = True) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int]]:
    """Patch–text CAMs of preprocessed images for every query.

    Parameters
    ----------
    backbone : Backbone
    images : Tensor (B, 3, H, W)
    text : Tensor (Q, D)
        Normalised queries (enriched foreground classes, then background prompts).
    layers : int, default=5
        SVC blocks (0: CLIP's own tokens).
    surgery : bool, default=True
        Feature surgery on token-axis-normalised features (the reference); ``False``: plain
        patch–text cosine (per-token normalised), min-maxed per query.

    Returns
    -------
    cams : Tensor (B, Q, h, w)
        In [0, 1] per query.
    attentions : list of Tensor (B, T, T)
    grid : (h, w)
    """
    z, att, grid = svc_tokens(backbone.model.visual, images, layers=layers, calibrate=layers > 0)
    z = z.float()
    if surgery:
        s = feature_surgery(z / z.norm(dim=1, keepdim=True), text, t=t)[:, 1:]         # the reference's norm(dim=1)
    else:
        s = F.normalize(z[:, 1:], dim=-1) @ text.T                                      # (B, N, Q)
        lo, hi = s.min(dim=1, keepdim=True).values, s.max(dim=1, keepdim=True).values
        s = (s - lo) / (hi - lo).clamp_min(1e-12)
    return s.transpose(1, 2).reshape(len(images), -1, *grid), att, grid


def _image_labels(labels, n_images: int, classes: Sequence[str]) -> list[np.ndarray]:
    """Per image the indices (into ``classes``) of its image-level labels."""
    if isinstance(labels, np.ndarray) and labels.ndim == 2:
        if labels.shape != (n_images, len(classes)):
            raise UsageError(f"multi-hot labels must be ({n_images}, {len(classes)}); got {labels.shape}")
        return [np.flatnonzero(row) for row in labels]
    labels = list(labels)
    if len(labels) != n_images:
        raise UsageError(f"{n_images} images but {len(labels)} label lists; give one list of classes per image")
    out = []
    for row in labels:
        idx = []
        for c in ([row] if isinstance(row, (str, int, np.integer)) else row):
            if isinstance(c, str):
                if c not in classes:
                    raise UsageError(f"label {c!r} is not one of the classes {list(classes)}")
                idx.append(classes.index(c))
            else:
                if not 0 <= int(c) < len(classes):
                    raise UsageError(f"label {c} is out of range for {len(classes)} classes")
                idx.append(int(c))
        out.append(np.unique(np.asarray(idx, np.int64)))
    return out


@torch.inference_mode()
def cam_pseudo_masks(backbone, images, labels, classes: Sequence[str], *, background=REFERENCE_BACKGROUND,
                     templates=PROMPT, descriptions: Mapping[str, Sequence[str]] | None = None,
                     n_clusters: int | None = None, keep: float = 0.9, tse: bool = True, layers: int = 5,
                     surgery: bool = True, refine: bool = True, threshold: float = 0.79, size: int | None = None,
                     return_cams: bool = False):
    """Pseudo-masks for weakly supervised segmentation from image-level labels (ExCEL, training-free).

    Every image is resized to ``size`` (default: the model input), its CAMs are computed
    for every query (:func:`excel_cams`), and only the CAMs of its image-level classes are
    kept; with ``refine`` they go through :func:`refine_cams`; each is min-maxed and
    upsampled to the image, the background score is ``1 - max_c CAM_c``, ``refine`` adds
    :func:`par_refine`, and the argmax is the pseudo-mask.  ``tse=False, layers=0,
    surgery=False, refine=False`` gives plain patch–text CAMs with the same background rule.

    Parameters
    ----------
    backbone : Backbone
    images : sequence of path, PIL image or uint8 array (H, W, 3)
    labels : sequence of sequences of class names or indices, or ndarray (N, C) multi-hot
        The classes present in each image (indices into ``classes``).
    classes : sequence of str (C,)
        Foreground class names.
    background : sequence of str, default=REFERENCE_BACKGROUND
        Background prompts (take part in the surgery's class mean, never in the masks).
    templates : template spec, default="a clean origami {c}."
    descriptions, n_clusters, keep, tse
        Text semantic enrichment (see :class:`ExCEL`).
    layers : int, default=5
        Static visual calibration blocks (0: none).
    surgery, refine : bool, default=True
    threshold : float, default=0.79
        Box threshold of the affinity refinement.
    size : int, optional
        Model input side (a multiple of the patch size).
    return_cams : bool, default=False
        Also return each image's CAMs (C_i, H, W) at its size, before the argmax.

    Returns
    -------
    masks : list of ndarray (H_i, W_i) int32
        0 = background, ``c + 1`` = ``classes[c]``; only image-level classes occur.
    cams : list of ndarray, with ``return_cams``

    Raises
    ------
    UsageError
        Labels that do not name a class, a label list per image missing.

    Examples
    --------
    >>> bb = cliplab.load("shapes-tiny")                                            # doctest: +SKIP
    >>> masks = cam_pseudo_masks(bb, ["scene.png"], [["circle", "star"]], ["circle", "square", "star"],
    ...                          templates="a photo of a {c}.", background=["background"])  # doctest: +SKIP
    >>> sorted(set(masks[0].ravel()) - {0})        # only the image's own classes    # doctest: +SKIP
    [1, 3]
    """
    from .segment import class_queries, prepare_images

    check_backbone("backbone", backbone)
    classes = [str(c) for c in classes]
    threshold = check_number("threshold", threshold, minimum=0, maximum=1)
    side = check_positive_int("size", size) if size is not None else backbone.image_size
    _, fg, _ = class_queries(backbone, classes, templates)
    text = torch.from_numpy(fg)
    if tse:
        descriptions = descriptions if descriptions is not None else default_descriptions(
            classes, prompt=_prompt(templates))
        bank = torch.from_numpy(description_bank(backbone, descriptions, n_clusters=n_clusters))
        text = enrich_text(text, bank, keep=keep)
    if background:
        _, bg, _ = class_queries(backbone, list(dict.fromkeys(background)), templates)
        text = torch.cat([text, torch.from_numpy(bg)])                                   # (Q, D)
    text = text.to(backbone.device)

    prepared = prepare_images(backbone, images, window=None)                             # model input size
    present = _image_labels(labels, len(prepared), classes)
    masks, all_cams = [], []
    for (t, (H0, W0), _), idx in zip(prepared, present):
        if not len(idx):                                                                  # no label: all background
            masks.append(np.zeros((H0, W0), np.int32))
            all_cams.append(np.zeros((0, H0, W0), np.float32))
            continue
        x = t[None] if side == t.shape[-1] else F.interpolate(t[None], size=(side, side), mode="bilinear",
                                                              align_corners=False)
        x = x.to(backbone.device)
        cams, att, _ = excel_cams(backbone, x, text, layers=layers, surgery=surgery)
        cams = cams[0, torch.from_numpy(idx)].float().cpu()                               # (C_i, h, w)
        if refine:
            cams = refine_cams(cams, [a[0].cpu() for a in att], threshold=threshold)
        lo = cams.flatten(1).min(dim=1).values[:, None, None]
        cams = cams - lo
        cams = cams / (1e-7 + cams.flatten(1).max(dim=1).values[:, None, None])
        cams = F.interpolate(cams[None], size=(H0, W0), mode="bilinear", align_corners=False)[0]
        bg = 1 - cams.max(dim=0, keepdim=True).values
        scores = torch.cat([bg, cams])                                                   # (1 + C_i, H, W)
        if refine:
            scores = par_refine(t[None], scores[None])[0]                               # image resized inside
        key = torch.from_numpy(np.concatenate([[0], idx + 1]))
        masks.append(key[scores.argmax(dim=0)].numpy().astype(np.int32))
        all_cams.append(scores[1:].numpy())
    return (masks, all_cams) if return_cams else masks
