"""AnomalyCLIP: object-agnostic prompt learning for zero-shot anomaly detection.

Zhou, Pang, Tian, He, Chen, "AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot
Anomaly Detection", ICLR 2024, arXiv:2310.18961.  Reference code: zqhang/AnomalyCLIP at 45ed4dd
(``prompt_ensemble.py`` ``AnomalyCLIP_PromptLearner``, ``AnomalyCLIP_lib/AnomalyCLIP.py``
``Attention`` / ``ResidualAttentionBlock`` / ``DAPM_replace``, ``loss.py``, ``train.py``,
``test.py``).

Prompts are learned once, on auxiliary categories with masks, and then used on every
other category unchanged: nothing in them names an object.  The steps follow the paper's
section 3 and the reference code (equation numbers are not cited: the paper PDF was not
read here, the code was):

1. **Object-agnostic text prompts:** ``g_n = T([V_1..V_E] object.)``
   and ``g_a = T([W_1..W_E] damaged object.)``, E = 12 learnable word embeddings each
   (init N(0, 0.02)); the frozen text tower T also gets *deep* prompts: 4 learnable tokens
   that replace positions 1..4 at the input of text layers 1..8 (depth 9 of 12 layers).
2. **Diagonally prominent attention (DPAM):** from block ``L - dpam_layers + 1``
   on, the vision tower gains a parallel path whose attention is ``softmax(s v vᵀ) v`` per
   head (q = k = v): ``x'_l = x'_{l-1} + W_o softmax(s v vᵀ) v`` with ``v`` from
   ``LN1(x_{l-1})`` of the *original* path, no FFN; the original path is unchanged and
   gives the global (class-token) embedding f.  Patch maps come from the parallel path at
   ``feature_layers``, each through ``ln_post`` and ``proj``.
3. **Scores:** per layer l, ``S_l = softmax([cos(f_l, g_n), cos(f_l, g_a)] / 0.07)``
   per patch, bilinearly upsampled to the input; the map is the mean over layers of
   ``(S_l[a] + 1 - S_l[n]) / 2``, Gaussian-smoothed; the image score is
   ``softmax([cos(f, g_n), cos(f, g_a)] / 0.07)[a]``.
4. **Glocal loss:** ``CE(image logits, label) + λ Σ_l [Focal(S_l, M) +
   Dice(S_l[a], M) + Dice(S_l[n], 1 - M)]`` with λ = 4 and γ = 2 (the reference's
   ``FocalLoss`` with ``smooth=1e-5`` and ``BinaryDiceLoss`` with smoothing 1).

Only the prompt parameters train (the Backbone is frozen), through the one
:class:`cliplab.train.Trainer` with the objective :class:`GlocalLoss`
(:func:`train_anomalyclip`).  Defaults of the reference: E = 12, 4 deep tokens, depth 9,
features at layers 6, 12, 18, 24 and DPAM on the last 19 blocks of ViT-L/14 (24 blocks),
batch 8, lr 1e-3, 15 epochs, σ = 4 at 518 px.  For other depths cliplab scales the
layer choices: features at ``round(L k / 4)``, k = 1..4, DPAM from the first of them on,
text depth ``round(0.75 L_text)``.

Deviations from the reference code:

- The global embedding is the tower's ordinary pooled output (``ln_post``, then ``proj``),
  so it equals ``Backbone.encode_images``; the reference projects the class token without
  ``ln_post``.
- The map is the *mean* over layers (the reference sums); metrics are unchanged.  σ is
  scaled to the input size (``4 * S / 518``); no 518 px resize.
- The reference's ``compound_prompt_projections`` (linear layers it creates, never uses
  and trains nothing through) are left out.
- Optimiser: the Trainer's AdamW (betas 0.9, 0.98, no weight decay, warm-up then cosine)
  for a number of steps, not Adam (0.5, 0.999) at a constant rate for 15 epochs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ...errors import DataError, UsageError
from . import ANOMALY_METHODS, AnomalyMethod, AnomalyResult

logger = logging.getLogger(__name__)

# also importable from here, loaded on first use (``__getattr__``): the torch parts in _NN
__all__ = ["AnomalyCLIP", "train_anomalyclip", "save_prompts", "load_prompts", "inspection_training_data"]

_FORMAT = "cliplab.anomalyclip.prompts/1"
_NN = ("AnomalyCLIPPrompts", "AnomalyCLIPModel", "GlocalLoss", "vv_attention", "dpam_features", "focal_loss",
       "dice_loss", "default_layers", "encode_deep_prompts")


def __getattr__(name: str):
    """The torch parts (:mod:`._anomalyclip_nn`), imported on first use."""
    if name in _NN:
        from . import _anomalyclip_nn

        return getattr(_anomalyclip_nn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------ save / load
def save_prompts(model, path, **info) -> Path:
    """Write the learned prompts: ``path`` (.safetensors, config in its metadata) and a
    ``.json`` beside it (config, feature layers, DPAM depth, ``info``)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "prompts.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {**model.prompts.config, "feature_layers": list(model.feature_layers),
              "dpam_layers": model.dpam_layers, **info}
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.prompts.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": _FORMAT, "config": json.dumps(config)})
    path.with_suffix(".json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_prompts(backbone, path):
    """An :class:`AnomalyCLIPModel` on ``backbone`` with the prompts saved at ``path``
    (the .safetensors file or the folder holding ``prompts.safetensors``).

    Raises
    ------
    UsageError
        No such file, not a prompts file, or prompts of a text tower of another width.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ._anomalyclip_nn import AnomalyCLIPModel, AnomalyCLIPPrompts

    path = Path(path)
    if path.is_dir():
        path = path / "prompts.safetensors"
    if not path.is_file():
        raise UsageError(f"AnomalyCLIP prompts not found: {path} (write them with train_anomalyclip)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise UsageError(f"{path}: not a safetensors file ({e})") from None
    if meta.get("format") != _FORMAT:
        raise UsageError(f"{path} is not an AnomalyCLIP prompts file (write it with train_anomalyclip)")
    cfg = json.loads(meta["config"])
    width = backbone.model.token_embedding.weight.shape[1]
    if cfg["width"] != width:
        raise UsageError(f"{path}: prompts for a text tower of width {cfg['width']}, this model's is {width}")
    prompts = AnomalyCLIPPrompts(width, n_ctx=cfg["n_ctx"], text_ctx=cfg["text_ctx"], text_depth=cfg["text_depth"])
    prompts.load_state_dict(load_file(str(path)))
    model = AnomalyCLIPModel(backbone, prompts.to(backbone.device), feature_layers=cfg["feature_layers"],
                             dpam_layers=cfg["dpam_layers"])
    return model


# ------------------------------------------------------------------ the registered method
class AnomalyCLIP(AnomalyMethod):
    """AnomalyCLIP zero-shot anomaly detection with learned object-agnostic prompts (module docstring).

    Parameters
    ----------
    backbone : Backbone
    category : str, default="object"
        Ignored: the prompts are object-agnostic.
    batch_size : int, default=32
    prompts : str, Path or AnomalyCLIPModel
        Learned prompts (:func:`train_anomalyclip`, :func:`save_prompts`).
    sigma : float, optional
        Gaussian smoothing of the maps in pixels; default ``4 * S / 518`` (the reference's σ
        = 4 at 518 px).

    Raises
    ------
    UsageError
        Without ``prompts``.
    """

    def __init__(self, backbone, *, category: str = "object", batch_size: int = 32, prompts=None,
                 sigma: float | None = None):
        super().__init__(backbone, category=category, batch_size=batch_size)
        if prompts is None:
            raise UsageError("anomalyclip needs learned prompts: pass --prompts PATH "
                             "(train them with cliplab.dense.anomaly.anomalyclip.train_anomalyclip)")
        from ._anomalyclip_nn import AnomalyCLIPModel

        self.model = prompts if isinstance(prompts, AnomalyCLIPModel) else load_prompts(backbone, prompts)
        self.sigma = 4.0 * backbone.image_size / 518 if sigma is None else float(sigma)

    def predict(self, images) -> AnomalyResult:
        """Image scores (N,) and maps (N, S, S) of ``images``."""
        import torch
        from scipy.ndimage import gaussian_filter

        images = list(images)
        scores, maps = [], []
        self.model.eval()
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                x = self._pixels(images[start:start + self.batch_size]).to(self.backbone._dtype)
                out = self.model(x)
                scores.append(torch.softmax(out["image_logits"], dim=-1)[:, 1].cpu().numpy())
                m = torch.stack([(s[:, 1] + 1 - s[:, 0]) / 2 for s in out["maps"]]).mean(0)  # (B, S, S)
                maps.append(m.float().cpu().numpy())
        maps = np.concatenate(maps)
        if self.sigma > 0:
            maps = np.stack([gaussian_filter(m, sigma=self.sigma) for m in maps])
        return AnomalyResult(np.concatenate(scores).astype(np.float32), maps.astype(np.float32))


ANOMALY_METHODS.register("anomalyclip", help="AnomalyCLIP: learned object-agnostic normal/abnormal prompts, "
                         "V-V attention (DPAM), multi-layer maps (Zhou et al. 2024; --prompts PATH)")(AnomalyCLIP)


# ------------------------------------------------------------------ training
def inspection_training_data(train_categories, *, n_per_category: int = 64, seed: int = 0):
    """AnomalyData of ShapesWorld inspection scenes of ``train_categories``: per category half
    normal (``train`` split), half defective (``test`` split, the six defects in turn)."""
    from ...data.datasets import AnomalyData
    from ...data.shapes.inspection import INSPECTION_DEFECTS, InspectionWorld

    world = InspectionWorld(seed, categories=list(train_categories))
    images, labels, masks, cats, defects = [], [], [], [], []
    for c in world.categories:
        for i in range(n_per_category):
            kind = "good" if i % 2 == 0 else INSPECTION_DEFECTS[(i // 2) % len(INSPECTION_DEFECTS)]
            s = world.scene(c, "train" if kind == "good" else "test", i // 2, kind)
            images.append(s.image)
            labels.append(int(s.is_anomalous))
            masks.append(s.mask)
            cats.append(c)
            defects.append(kind)
    return AnomalyData(images, np.asarray(labels), masks, cats, defects, "inspection-train",
                       meta={"world": world.config()})


def train_anomalyclip(backbone, train_categories, steps: int = 300, out="runs/anomalyclip", *,
                      batch_size: int = 8, lr: float = 1e-3, warmup_steps: int = 10, seed: int = 0,
                      n_per_category: int = 64, n_ctx: int = 12, text_ctx: int = 4, text_depth: int | None = None,
                      feature_layers=None, dpam_layers=None, progress: bool | None = None) -> Path:
    """Learn AnomalyCLIP prompts on auxiliary categories with the Trainer; returns the prompts file.

    Parameters
    ----------
    backbone : Backbone
        Frozen; only the prompts train.
    train_categories : sequence of str or AnomalyData
        Names of ShapesWorld inspection categories (:data:`cliplab.data.shapes.inspection.CATEGORIES`;
        ``n_per_category`` scenes each, half defective), or an :class:`~cliplab.data.datasets.AnomalyData`
        with masks (an MVTec-style folder's test split, as the paper trains on VisA to test on MVTec AD).
    steps : int, default=300
    out : str or Path
        Receives ``prompts.safetensors``, ``prompts.json`` and the Trainer's ``train/`` folder
        (metrics, checkpoint).
    batch_size, lr, warmup_steps, seed
        Trainer settings (AdamW, no weight decay, no gradient clipping).
    n_ctx, text_ctx, text_depth, feature_layers, dpam_layers
        :class:`AnomalyCLIPPrompts` and :class:`AnomalyCLIPModel`; ``text_depth`` defaults to
        ``round(0.75 * text layers)`` (9 of 12 in the reference).

    Returns
    -------
    Path
        ``out/prompts.safetensors``.
    """
    from ...data.datasets import AnomalyData
    from ...train import TrainConfig, Trainer
    from ._anomalyclip_nn import AnomalyCLIPModel, AnomalyCLIPPrompts, GlocalLoss, MaskedImages

    data = train_categories if isinstance(train_categories, AnomalyData) else inspection_training_data(
        train_categories, n_per_category=n_per_category, seed=seed)
    if not len(data) or not (np.asarray(data.labels) == 1).any():
        raise DataError("AnomalyCLIP training needs defective images with masks")
    width = backbone.model.token_embedding.weight.shape[1]
    if text_depth is None:
        text_depth = max(1, int(round(0.75 * len(backbone.model.transformer.resblocks))))
    prompts = AnomalyCLIPPrompts(width, n_ctx=n_ctx, text_ctx=text_ctx, text_depth=text_depth, seed=seed)
    model = AnomalyCLIPModel(backbone, prompts, feature_layers=feature_layers, dpam_layers=dpam_layers)
    size = backbone.image_size
    masks = [data.masks[i] if data.labels[i] else None for i in range(len(data))]
    train_set = MaskedImages(list(data.items), np.asarray(data.labels), masks, size)
    out = Path(out)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, weight_decay=0.0,
                         grad_clip=None, seed=seed, ckpt_every=0, log_every=max(1, min(10, steps)),
                         out_dir=str(out / "train"), device=str(backbone.device))
    grad = {p: p.requires_grad for p in backbone.model.parameters()}
    try:
        for p in grad:
            p.requires_grad_(False)                                      # the Backbone is frozen
        row = Trainer(model, None, backbone.preprocess, train_set, config, objective=GlocalLoss(),
                      preprocess_cfg=backbone.preprocess_cfg, progress=progress).fit()
    finally:
        for p, flag in grad.items():
            p.requires_grad_(flag)
        model.eval()
    logger.info("AnomalyCLIP prompts after %d steps: loss %.4f", steps, row.get("loss", float("nan")))
    cats = sorted(set(data.categories))
    return save_prompts(model, out, backbone=backbone.name, train_categories=cats, steps=steps, seed=seed)
