"""A-CLIP: attentive token removal guided by an EMA teacher, with online/EMA self-supervision.

Attentive Mask CLIP (Yang et al., ICCV 2023, arXiv:2212.08653); reference code
github.com/microsoft/A-CLIP (``models.py``: ``get_att_mask``, ``ACLIP.get_mask``,
``ACLIP.forward``, ``MaskVisionTransformer``; ``losses.py``: ``ACLIPLoss``,
``SIMCLRLoss``; ``main.py``, ``utils.cosine_scheduler``, ``datasets.py``:
``GetThreeRandomResizedCrop``; commit 0e51942).

Each step, with online image tower f, its EMA copy f' (not trained), text tower g,
the step t of T, and the equations numbered as they appear in the code below:

    (M)   m_t = 1 - (1 - m_0) (1 + cos(pi t / T)) / 2          momentum, m_0 = 0.996 -> 1
    (E)   theta' <- m_t theta' + (1 - m_t) theta               EMA of the image tower and BYOL projector
    (A)   a = mean over layers and heads of f'(image)'s [CLS]->patch attention   (B, g*g)
    (V)   two online views: random resized crops (scale 0.5..1) of the image; each view's
          attention is a's map resized to the image, cropped to the view's box, resized to g x g
    (K)   keep: the map pooled to (g/2) x (g/2) blocks of 2 x 2 patches (bilinear), the top
          floor(n_blocks * 0.5) + 1 blocks kept (25 of 49 for a 14 x 14 grid), the rest removed
    (O)   x_v = f(view v, kept patches only): patch embedding + positions, gather, [CLS], blocks
    (C)   L_clip = 1/2 InfoNCE(x_1, y) + 1/2 InfoNCE(x_2, y)
    (S)   L_simclr = SimCLR(h(c_1), h(c_2); tau = 0.1), c_v the online [CLS] token, h an MLP
    (B)   L_byol = mean 2 - 2 cos(q(p(c_v)), p'(c'))  over both views, c' the EMA [CLS]
    (L)   L = L_clip + L_simclr + 2 L_byol

The patch embedding is frozen (the reference's ``MaskVisionTransformer``, after MoCo v3):
it gets a zero gradient and is left out of the optimizer.  Heads (the reference's): the
SimCLR MLP h (Linear-BN-ReLU-Linear-BN-ReLU-Linear), the BYOL projector p and predictor q
(Linear-BN-ReLU-Linear, no biases) with 256 outputs; they are the objective's own
parameters, trained with the model and checkpointed with the objective's state.

Deviations from the reference code:

- the EMA view is the whole image; the reference draws a box between the union of the two
  crops and the whole image (and its ``GetThreeRandomResizedCrop`` mixes a top and a
  left coordinate when taking that union);
- colour jitter, grayscale, blur and solarisation are not applied to the online views
  (on ShapesWorld colour is what captions name);
- the heads' hidden width is 4 x the tower width (the reference's 4096 for ViT-B's 768 is
  5.3 x; 4096 would make a shapes-tiny step several times InfoNCE's);
- the SimCLR term compares the two views, as the paper describes; the released
  ``losses.py`` passes view 1 as both of its inputs;
- only the image tower (and BYOL projector) has an EMA copy: the reference also keeps an
  EMA text tower that its training forward never uses;
- the heads use per-rank BatchNorm under data parallelism (the reference converts them to
  SyncBatchNorm, which needs GPUs); the diagonal of SimCLR's same-view logits is removed
  with -inf, where the reference subtracts 1e9.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UsageError
from . import register_loss
from .base import Batch, ModelOutputs, Objective, gather_with_grad, held_fixed
from .infonce import infonce_loss


# ------------------------------------------------------------------ pure functions
def ema_momentum(step: int, total_steps: int, base: float = 0.996) -> float:
    """The momentum of step ``step`` of ``total_steps``: cosine from ``base`` to 1 (eq. M)."""
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * step / max(total_steps, 1))) / 2.0  # eq. (M)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta' <- m theta' + (1 - m) theta`` for every parameter pair, in place (eq. E)."""
    for p_t, p_s in zip(teacher.parameters(), student.parameters()):
        p_t.copy_(p_t * momentum + p_s.detach() * (1.0 - momentum))                     # eq. (E)


def _grid(visual) -> tuple[int, int]:
    g = visual.grid_size
    return (g, g) if isinstance(g, int) else tuple(g)


def check_vit(visual) -> None:
    """Raise :class:`UsageError` unless ``visual`` is an open_clip ViT with [CLS] pooling."""
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post")
    missing = [n for n in needed if not hasattr(visual, n)]
    if missing:
        raise UsageError(f"A-CLIP needs an open_clip VisionTransformer image tower; {type(visual).__name__} "
                         f"has no {', '.join(missing)}")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False) \
            or getattr(visual, "pool_type", "tok") != "tok":
        raise UsageError("A-CLIP needs a ViT pooled by its [CLS] token (no attentional pooler, pool_type 'tok')")
    if any(not isinstance(getattr(b, "attn", None), torch.nn.MultiheadAttention) for b in visual.transformer.resblocks):
        raise UsageError("A-CLIP reads attention maps from standard open_clip blocks (nn.MultiheadAttention); "
                         "outlier-free attention (clipped softmax, gates) is not supported")


def _blocks(visual, x: torch.Tensor, attention: list | None = None) -> torch.Tensor:
    """Run the tower's blocks on (B, T, W) tokens; append each block's [CLS]->patch attention to ``attention``."""
    transformer = visual.transformer
    if attention is None:
        return transformer(x)
    batch_first = getattr(transformer, "batch_first", True)
    for block in transformer.resblocks:
        attn = block.attn                                                               # nn.MultiheadAttention
        n, (bsz, t, w) = attn.num_heads, x.shape
        bias = attn.in_proj_bias[:2 * w] if attn.in_proj_bias is not None else None
        q, k = F.linear(block.ln_1(x), attn.in_proj_weight[:2 * w], bias).reshape(
            bsz, t, 2, n, w // n).permute(2, 0, 3, 1, 4)                                 # 2 x (B, H, T, d)
        weights = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)  # (B, H, T, T)
        attention.append(weights[:, :, 0, 1:].mean(1))                                  # (B, T-1)
        x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
    return x


def vit_forward(visual, images: torch.Tensor, keep: torch.Tensor | None = None, *,
                freeze_patch_embed: bool = False,
                attention: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An open_clip ViT on the kept patch tokens only (MAE-style gather).

    Parameters
    ----------
    visual : open_clip.transformer.VisionTransformer
    images : torch.Tensor of shape (B, 3, H, W)
        At the tower's image size.
    keep : torch.Tensor of shape (B, K), optional
        Indices (row-major over the patch grid) of the patches each image keeps; all
        patches when None.
    freeze_patch_embed : bool, default False
        Use the patch embedding as a constant (zero gradient).
    attention : list, optional
        Receives each block's [CLS]->patch attention averaged over heads, (B, K) per block.

    Returns
    -------
    features : torch.Tensor of shape (B, D)
        The projected [CLS] output (unnormalised), what ``encode_image`` returns with all patches.
    cls : torch.Tensor of shape (B, W)
        The [CLS] token after ``ln_post``, before the projection.
    """
    weight = visual.conv1.weight
    if freeze_patch_embed:
        weight = held_fixed(weight)
    x = F.conv2d(images.to(weight.dtype), weight, visual.conv1.bias, stride=visual.conv1.stride)  # (B, W, g, g)
    x = x.flatten(2).transpose(1, 2)                                                   # (B, g*g, W)
    pos = visual.positional_embedding.to(x.dtype)                                      # (1 + g*g, W)
    x = x + pos[1:]
    if keep is not None:
        x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))             # eq. (O), (B, K, W)
    cls = (visual.class_embedding.to(x.dtype) + pos[0]).expand(x.shape[0], 1, -1)      # (B, 1, W)
    x = visual.ln_pre(torch.cat([cls, x], dim=1))                                      # (B, 1 + K, W)
    x = visual.ln_post(_blocks(visual, x, attention))
    cls = x[:, 0]                                                                      # (B, W)
    return (cls @ visual.proj if visual.proj is not None else cls), cls


def teacher_attention(visual, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS]->patch attention averaged over all layers and heads, and the [CLS] token (eq. A).

    Returns
    -------
    attention : torch.Tensor of shape (B, g*g)
    cls : torch.Tensor of shape (B, W)
    """
    maps: list = []
    _, cls = vit_forward(visual, images, attention=maps)
    return torch.stack(maps).mean(0), cls                                              # eq. (A)


def random_boxes(n: int, size: tuple[int, int], scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """``n`` RandomResizedCrop boxes ``(top, left, height, width)`` in pixels, (n, 4) int64.

    Drawn by torchvision's ``RandomResizedCrop.get_params`` from torch's global RNG
    (which the Trainer seeds and checkpoints).
    """
    from torchvision.transforms import RandomResizedCrop

    probe = torch.empty(1, *size)
    return torch.tensor([RandomResizedCrop.get_params(probe, list(scale), list(ratio)) for _ in range(n)])


def resized_crops(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image cropped to its box and resized (bilinear) back to the image size: (B, C, H, W)."""
    size = images.shape[-2:]
    return torch.cat([F.interpolate(img[None, :, t:t + h, l:l + w], size=size, mode="bilinear", align_corners=False)
                      for img, (t, l, h, w) in zip(images, boxes.tolist())])


def crop_attention(attention: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int],
                   boxes: torch.Tensor) -> torch.Tensor:
    """The attention map seen through each view's box (eq. V; the reference's ``ACLIP.get_mask``).

    The (g, g) map of the whole image is resized (bilinear) to the image's pixels, cropped to
    the box ``(top, left, height, width)`` and resized back to (g, g).

    Parameters
    ----------
    attention : torch.Tensor of shape (B, g*g)
    grid : (int, int)
    image_size : (int, int)
    boxes : torch.Tensor of shape (B, 4)

    Returns
    -------
    torch.Tensor of shape (B, g*g)
    """
    maps = attention.reshape(-1, 1, *grid)
    full = F.interpolate(maps, size=tuple(image_size), mode="bilinear")                # (B, 1, H, W)
    out = [F.interpolate(m[None, :, t:t + h, l:l + w], size=tuple(grid), mode="bilinear")
           for m, (t, l, h, w) in zip(full, boxes.tolist())]
    return torch.cat(out).reshape(attention.shape[0], -1)                              # (B, g*g)


def attentive_keep(attention: torch.Tensor, grid: tuple[int, int], ratio: float = 0.5) -> torch.Tensor:
    """Indices of the patches A-CLIP keeps: the most attended 2 x 2 blocks (eq. K; ``get_att_mask``).

    The (g, g) map is resized (bilinear) to (g/2, g/2) blocks, the ``floor(n_blocks * ratio)
    + 1`` highest blocks are kept, and each kept block keeps its 4 patches.

    Parameters
    ----------
    attention : torch.Tensor of shape (B, g*g)
    grid : (int, int)
        Both sides even.
    ratio : float, default 0.5

    Returns
    -------
    torch.Tensor of shape (B, 4 * (floor(n_blocks * ratio) + 1)), int64
        Row-major patch indices, ascending in each row.

    Raises
    ------
    UsageError
        A side of the grid is odd.
    """
    gh, gw = grid
    if gh % 2 or gw % 2:
        raise UsageError(f"A-CLIP keeps 2x2 blocks of patches and needs an even patch grid, got {gh}x{gw}")
    b = attention.shape[0]
    blocks = F.interpolate(attention.reshape(b, 1, gh, gw), size=(gh // 2, gw // 2), mode="bilinear")
    blocks = blocks.reshape(b, -1)                                                     # (B, n_blocks)
    n_keep = int(blocks.shape[1] * ratio) + 1
    top = torch.argsort(blocks, dim=1, descending=True)[:, :n_keep]                   # eq. (K)
    kept = torch.zeros_like(blocks, dtype=torch.bool).scatter_(1, top, True)
    kept = kept.reshape(b, gh // 2, gw // 2).repeat_interleave(2, 1).repeat_interleave(2, 2)  # (B, g, g)
    return kept.reshape(b, -1).nonzero()[:, 1].reshape(b, -1)                          # (B, 4 n_keep)


def simclr_loss(a: torch.Tensor, b: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent between two views (the reference's ``SIMCLRLoss``), eq. (S).

    Parameters
    ----------
    a, b : torch.Tensor of shape (N, E)
        Embeddings of view 1 and view 2 (normalised here); row i of both is one image.
    tau : float, default 0.1

    Returns
    -------
    torch.Tensor
        ``(CE([a b^T, a a^T - diag], i) + CE([b a^T, b b^T - diag], i)) / 2`` with logits / tau.
    """
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    n = a.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    labels = torch.arange(n, device=a.device)
    aa = (a @ a.T / tau).masked_fill(eye, float("-inf"))                              # (N, N)
    bb = (b @ b.T / tau).masked_fill(eye, float("-inf"))
    ab, ba = a @ b.T / tau, b @ a.T / tau
    return (F.cross_entropy(torch.cat([ab, aa], 1), labels) + F.cross_entropy(torch.cat([ba, bb], 1), labels)) / 2


def byol_loss(online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_i 2 - 2 cos(online_i, target_i)``, the target held fixed (eq. B)."""
    return (2 - 2 * F.cosine_similarity(online, target.detach(), dim=-1)).mean()        # eq. (B)


def _mlp(dims: list[int], *, bias: bool) -> nn.Sequential:
    """Linear-BN-ReLU between ``dims``, a plain Linear last (the reference's heads)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU()]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------ the objective
@register_loss("aclip", help="A-CLIP: EMA-attention-guided token removal, two views, SimCLR + BYOL (arXiv:2212.08653)")
class ACLIPLoss(Objective):
    """A-CLIP's forward pass (EMA teacher, attentive masking, two masked views) and its losses.

    :meth:`setup` (called by the Trainer before it builds the optimizer) copies the model's
    image tower into the EMA teacher and builds the heads; the teacher, the heads and their
    BatchNorm statistics are this objective's state, saved in every checkpoint.

    Parameters
    ----------
    rank : int, default 0
    world_size : int, default 1
    keep_ratio : float, default 0.5
        ``ratio`` of eq. (K): ``floor(n_blocks * ratio) + 1`` blocks are kept.
    momentum : float, default 0.996
        m_0 of eq. (M).
    crop_scale : (float, float), default (0.5, 1.0)
        Area range of the two online views (eq. V).
    ssl_temperature : float, default 0.1
        tau of SimCLR.
    simclr_weight, byol_weight : float, default 1.0 and 2.0
        Weights of eq. (L).
    ssl_dim : int, default 256
        Output width of the heads.
    mlp_dim : int, optional
        Hidden width of the heads; default 4 x the image tower's width.
    freeze_patch_embed : bool, default True
        Hold the patch embedding fixed, as the reference does.

    Attributes
    ----------
    init_logit_scale : float
        log(1 / 0.07), CLIP's.
    teacher : torch.nn.Module
        The EMA image tower (after :meth:`setup`); no parameter requires a gradient.
    """

    init_logit_scale = math.log(1 / 0.07)
    init_logit_bias = None

    def __init__(self, *, rank: int = 0, world_size: int = 1, keep_ratio: float = 0.5, momentum: float = 0.996,
                 crop_scale: tuple[float, float] = (0.5, 1.0), ssl_temperature: float = 0.1,
                 simclr_weight: float = 1.0, byol_weight: float = 2.0, ssl_dim: int = 256, mlp_dim: int | None = None,
                 freeze_patch_embed: bool = True):
        super().__init__(rank=rank, world_size=world_size)
        if not 0 <= keep_ratio < 1:
            raise ValueError(f"keep_ratio must be in [0, 1), got {keep_ratio}")
        self.keep_ratio = float(keep_ratio)
        self.momentum = float(momentum)
        self.crop_scale = tuple(crop_scale)
        self.ssl_temperature = float(ssl_temperature)
        self.simclr_weight = float(simclr_weight)
        self.byol_weight = float(byol_weight)
        self.ssl_dim = int(ssl_dim)
        self.mlp_dim = mlp_dim
        self.freeze_patch_embed = bool(freeze_patch_embed)
        self.total_steps = 1
        self.teacher: nn.Module | None = None

    def setup(self, model, config=None) -> None:
        """Copy ``model.visual`` into the EMA teacher and build the heads on its device.

        Parameters
        ----------
        model : open_clip.CLIP
        config : TrainConfig
            Its ``steps`` is T of eq. (M).

        Raises
        ------
        UsageError
            Without a config (T is needed).
        """
        if config is None:
            raise UsageError("the aclip objective needs the run's config (its steps set the EMA schedule)")
        visual = model.visual
        check_vit(visual)
        self.total_steps = int(config.steps)
        width = visual.conv1.out_channels
        hidden = self.mlp_dim or 4 * width
        device = visual.conv1.weight.device
        self.simclr_head = _mlp([width, hidden, hidden, self.ssl_dim], bias=True).to(device)
        self.byol_projector = _mlp([width, hidden, self.ssl_dim], bias=False).to(device)
        self.byol_predictor = _mlp([self.ssl_dim, hidden, self.ssl_dim], bias=False).to(device)
        self.teacher = copy.deepcopy(visual).requires_grad_(False)
        self.teacher_projector = copy.deepcopy(self.byol_projector).requires_grad_(False)

    def parameter_groups(self, model, weight_decay: float) -> list[dict]:
        """The Trainer's groups for the model (without the frozen patch embedding) and for the heads."""
        from ..trainer import parameter_groups

        if self.teacher is None:
            raise UsageError("the aclip objective must be bound to its model first (objective.setup(model, config))")
        groups = parameter_groups(model, weight_decay)
        if self.freeze_patch_embed:
            frozen = model.visual.conv1.weight
            groups = [{**g, "params": [p for p in g["params"] if p is not frozen]} for g in groups]
        heads = nn.ModuleList([self.simclr_head, self.byol_projector, self.byol_predictor])
        return groups + parameter_groups(heads, weight_decay)

    def forward_model(self, model, batch: Batch) -> ModelOutputs:
        """EMA update, teacher attention, two masked views through the online tower, the heads.

        Returns
        -------
        ModelOutputs
            ``image_features`` of view 1 and, in ``extras``: ``image_features_2`` (B, D),
            ``simclr`` (2, B, E), ``byol_online`` (2, B, E), ``byol_target`` (B, E), ``keep``
            (2, B, K) the kept patch indices.
        """
        if self.teacher is None:
            raise UsageError("the aclip objective must be bound to its model first (objective.setup(model, config))")
        visual, images = model.visual, batch.images
        b = images.shape[0]
        grid = _grid(visual)
        with torch.no_grad():
            m = ema_momentum(batch.step, self.total_steps, self.momentum)                  # eq. (M)
            ema_update(self.teacher, visual, m)                                           # eq. (E)
            ema_update(self.teacher_projector, self.byol_projector, m)
            attention, cls_ema = teacher_attention(self.teacher, images)                 # eq. (A)
            target = self.teacher_projector(cls_ema)                                      # (B, E)
            boxes = random_boxes(2 * b, tuple(images.shape[-2:]), self.crop_scale)        # eq. (V), (2B, 4)
            views = resized_crops(images.repeat(2, 1, 1, 1), boxes)                       # (2B, 3, H, W)
            view_attention = crop_attention(attention.repeat(2, 1), grid, tuple(images.shape[-2:]), boxes)
            keep = attentive_keep(view_attention, grid, self.keep_ratio)                 # eq. (K), (2B, K)
        features, cls = vit_forward(visual, views, keep, freeze_patch_embed=self.freeze_patch_embed)  # eq. (O)
        features = F.normalize(features, dim=-1).reshape(2, b, -1)                       # (2, B, D)
        simclr = self.simclr_head(cls).reshape(2, b, -1)                                 # (2, B, E)
        online = self.byol_predictor(self.byol_projector(cls)).reshape(2, b, -1)         # (2, B, E)
        text = model.encode_text(batch.tokens, normalize=True)                           # (B, D)
        return ModelOutputs(features[0], text, model.logit_scale.exp(),
                            extras={"image_features_2": features[1], "simclr": simclr, "byol_online": online,
                                    "byol_target": target, "keep": keep.reshape(2, b, -1)})

    def forward(self, outputs: ModelOutputs, batch: Batch | None = None) -> dict:
        """Return the weighted terms of eq. (L): ``contrastive_1``, ``contrastive_2``, ``simclr``, ``byol``.

        The contrastive and SimCLR terms are computed on the global batch (features gathered
        across ranks); BYOL is a per-image mean.
        """
        if outputs.logit_bias is not None:
            raise ValueError("the aclip loss takes no logit_bias; build the model without one")
        ex = outputs.extras
        img1, img2, txt, s1, s2 = gather_with_grad(
            [outputs.image_features, ex["image_features_2"], outputs.text_features, ex["simclr"][0], ex["simclr"][1]],
            self.world_size)
        t = outputs.logit_scale
        target = ex["byol_target"]
        return {"contrastive_1": 0.5 * infonce_loss(img1, txt, t),                      # eq. (C)
                "contrastive_2": 0.5 * infonce_loss(img2, txt, t),
                "simclr": self.simclr_weight * simclr_loss(s1, s2, self.ssl_temperature),  # eq. (S)
                "byol": self.byol_weight * byol_loss(ex["byol_online"].flatten(0, 1),
                                                     torch.cat([target, target])),       # eq. (B), (L)
                }
