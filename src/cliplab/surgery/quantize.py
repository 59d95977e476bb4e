"""W8A8 post-training quantization, simulated with fake-quant, and activation-outlier statistics.

The setup of Bondarenko et al. ("Quantizable Transformers", NeurIPS 2023, arXiv 2306.12929;
reference ``Qualcomm-AI-research/outlier-free-transformers``, ``quantization/`` and
``transformers_language/quant_configs.py``), applied to both towers of an open_clip model:

- **weights** (8 bit): symmetric uniform, per tensor, ``scale = max|W| / 127``, integers in
  [−127, 127] (current min-max; every ``nn.Linear`` and attention in-projection, the
  patch-embedding convolution and the two final projections);
- **activations** (8 bit): asymmetric uniform, per tensor, integers in [0, 255], static
  ranges estimated on calibration batches with a **running min-max** (momentum 0.9, the
  first batch sets the range) or a running **percentile** range (per batch the
  ``(100 − p)``-th and ``p``-th percentiles of a subsample of at most 2**20 values, same
  momentum).  Quantized are the input of every weight matmul (linear layers, attention
  in-projections, the patch embedding, the final projections) and the residual stream
  after every block — where the outliers the paper removes live.

Quantization is simulated: tensors are quantized and dequantized in float32
(``torch.fake_quantize_per_tensor_affine``), so accuracy is that of an integer kernel
with these ranges, not its speed.  Deviations from the reference: embeddings, LayerNorm
inputs and the softmax output stay in floating point (the reference also quantizes some of
these), and weights use the restricted range [−127, 127].

:func:`outlier_stats` measures what the paper reports: per layer, the infinity norm and
kurtosis of the FFN output and of the residual stream after the block.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch

from .._progress import progress_bar
from ..errors import UsageError
from .outlier_free import OutlierFreeAttention, attention_modules

logger = logging.getLogger(__name__)

__all__ = ["ActQuantizer", "fake_quantize_weight", "quantize_w8a8", "outlier_stats", "OutlierStats",
           "ACT_RANGES"]

ACT_RANGES = ("minmax", "percentile")
_MAX_PERCENTILE_SAMPLES = 1 << 20


def fake_quantize_weight(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric per-tensor quantize-dequantize: ``round(w / s).clamp(−q, q) · s``, ``s = max|w| / q``.

    ``q = 2**(bits−1) − 1`` (127 for 8 bits).  An all-zero tensor is returned unchanged.
    """
    q = 2 ** (bits - 1) - 1
    amax = float(w.detach().abs().max()) if w.numel() else 0.0
    if amax == 0.0:
        return w.detach().clone()
    return torch.fake_quantize_per_tensor_affine(w.detach().float(), amax / q, 0, -q, q).to(w.dtype)


class ActQuantizer(torch.nn.Module):
    """Asymmetric per-tensor activation fake-quantizer with a static, calibrated range.

    Modes: ``"observe"`` (pass through, update the running range), ``"quantize"``
    (quantize-dequantize with the frozen range), ``"off"`` (pass through).

    Parameters
    ----------
    method : {"minmax", "percentile"}
    percentile : float, default 99.999
        Upper percentile of the ``"percentile"`` method (the lower one is ``100 − p``).
    momentum : float, default 0.9
        Running range ``r ← momentum · r + (1 − momentum) · r_batch``.
    bits : int, default 8
    """

    def __init__(self, method: str = "minmax", *, percentile: float = 99.999, momentum: float = 0.9,
                 bits: int = 8):
        super().__init__()
        if method not in ACT_RANGES:
            raise UsageError(f"activation range must be one of {', '.join(ACT_RANGES)}, got {method!r}")
        if not 50 < percentile <= 100:
            raise UsageError(f"percentile must be in (50, 100], got {percentile}")
        self.method, self.percentile, self.momentum, self.bits = method, float(percentile), float(momentum), bits
        self.mode = "off"
        self.register_buffer("lo", torch.tensor(float("nan")))
        self.register_buffer("hi", torch.tensor(float("nan")))

    def extra_repr(self) -> str:
        return f"{self.method}, mode={self.mode}, range=[{float(self.lo):.4g}, {float(self.hi):.4g}]"

    def _batch_range(self, x: torch.Tensor) -> tuple[float, float]:
        x = x.detach().float().reshape(-1)
        if self.method == "minmax":
            return float(x.min()), float(x.max())
        if x.numel() > _MAX_PERCENTILE_SAMPLES:
            g = torch.Generator().manual_seed(x.numel())
            x = x[torch.randint(0, x.numel(), (_MAX_PERCENTILE_SAMPLES,), generator=g)]
        qs = torch.quantile(x, torch.tensor([1 - self.percentile / 100, self.percentile / 100]))
        return float(qs[0]), float(qs[1])

    def scale_zero_point(self) -> tuple[float, int]:
        """``(scale, zero_point)`` of the frozen range; the range always includes 0."""
        lo, hi = min(float(self.lo), 0.0), max(float(self.hi), 0.0)
        levels = 2 ** self.bits - 1
        scale = max((hi - lo) / levels, 1e-12)
        return scale, int(round(-lo / scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            lo, hi = self._batch_range(x)
            if torch.isnan(self.lo):
                self.lo.fill_(lo), self.hi.fill_(hi)
            else:
                m = self.momentum
                self.lo.fill_(m * float(self.lo) + (1 - m) * lo)
                self.hi.fill_(m * float(self.hi) + (1 - m) * hi)
            return x
        if self.mode == "quantize":
            if torch.isnan(self.lo):
                raise UsageError("activation quantizer used before calibration")
            scale, zp = self.scale_zero_point()
            return torch.fake_quantize_per_tensor_affine(x.float(), scale, zp, 0, 2 ** self.bits - 1).to(x.dtype)
        return x


def _input_hook(quantizer: ActQuantizer):
    def hook(module, args):
        return (quantizer(args[0]), *args[1:])
    return hook


def _output_hook(quantizer: ActQuantizer):
    def hook(module, args, output):
        return quantizer(output)
    return hook


def quantize_w8a8(backbone, images, texts, *, act_range: str = "minmax", percentile: float = 99.999,
                  momentum: float = 0.9, batch_size: int = 32, max_batches: int = 16,
                  progress: bool | None = None):
    """A new Backbone that simulates W8A8 inference (see the module docstring).

    Parameters
    ----------
    backbone : Backbone
        Left unchanged; a ViT/text-transformer open_clip model (clipped-softmax and gated
        models from :func:`cliplab.surgery.apply_outlier_free` included).
    images : sequence
        Calibration images (paths, PIL images or uint8 arrays), e.g. training images.
    texts : sequence of str
        Calibration texts (e.g. the class prompts).
    act_range : {"minmax", "percentile"}
    percentile, momentum : float
        See :class:`ActQuantizer`.
    batch_size : int, default 32
    max_batches : int, default 16
        Calibration batches per tower (the reference estimates ranges on 16 batches).

    Returns
    -------
    Backbone
        Named ``<name>+w8a8-<act_range>``; its model carries the quantizers as
        ``model.w8a8_quantizers`` (a ModuleDict, ranges in buffers ``lo``/``hi``).

    Raises
    ------
    UsageError
        No calibration images or texts; a bad option.
    """
    images, texts = list(images), list(texts)
    if not images or not texts:
        raise UsageError("W8A8 calibration needs at least one image and one text")
    if act_range not in ACT_RANGES:
        raise UsageError(f"act_range must be one of {', '.join(ACT_RANGES)}, got {act_range!r}")
    model = copy.deepcopy(backbone.model).eval()
    quantizers = torch.nn.ModuleDict()

    def new(name: str) -> ActQuantizer:
        q = ActQuantizer(act_range, percentile=percentile, momentum=momentum)
        quantizers[name.replace(".", "/") or "root"] = q
        return q

    with torch.no_grad():
        for _, block in list(attention_modules(model)):      # explicit attention: its in-projection is reachable
            if isinstance(block.attn, torch.nn.MultiheadAttention):
                block.attn = OutlierFreeAttention(block.attn)
        n_weights = 0
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.copy_(fake_quantize_weight(module.weight))
                module.register_forward_pre_hook(_input_hook(new(f"{name}.input")))
                n_weights += 1
            elif isinstance(module, OutlierFreeAttention):
                module.in_proj_weight.copy_(fake_quantize_weight(module.in_proj_weight))
                module.pre_in_proj = new(f"{name}.in_proj_input")
                n_weights += 1
            if hasattr(module, "ln_1") and hasattr(module, "mlp"):   # a residual block: its output stream
                module.register_forward_hook(_output_hook(new(f"{name}.output")))
        for owner, attr, pooled_norm in ((getattr(model, "visual", None), "proj", "ln_post"),
                                         (model, "text_projection", "ln_final")):
            w = getattr(owner, attr, None) if owner is not None else None
            if isinstance(w, torch.nn.Parameter):
                w.copy_(fake_quantize_weight(w))
                getattr(owner, pooled_norm).register_forward_hook(_output_hook(new(f"{pooled_norm}.output")))
                n_weights += 1
    model.w8a8_quantizers = quantizers
    logger.info("W8A8: %d weight tensors, %d activation quantizers", n_weights, len(quantizers))
    quantized = backbone.with_model(model, name=f"{backbone.name}+w8a8-{act_range}")

    for q in quantizers.values():
        q.mode = "observe"
    n_img = min(len(images), batch_size * max_batches)
    n_txt = min(len(texts), batch_size * max_batches)
    bar = progress_bar(total=n_img + n_txt, desc="W8A8 calibration", unit="input", progress=progress)
    for i in range(0, n_img, batch_size):
        quantized.encode_images(images[i:i + batch_size], batch_size=batch_size, progress=False)
        bar.update(min(batch_size, n_img - i))
    for i in range(0, n_txt, batch_size):
        quantized.encode_texts(texts[i:i + batch_size], batch_size=batch_size)
        bar.update(min(batch_size, n_txt - i))
    bar.close()
    uncalibrated = [k for k, q in quantizers.items() if torch.isnan(q.lo)]
    if uncalibrated:
        raise UsageError(f"calibration did not reach {len(uncalibrated)} quantizer(s), e.g. {uncalibrated[0]}")
    for q in quantizers.values():
        q.mode = "quantize"
    return quantized


@dataclass
class OutlierStats:
    """Per-layer activation statistics (the paper's Table 1 columns).

    Attributes
    ----------
    layers : list of str
        ``<tower>.<block>.ffn`` and ``<tower>.<block>.residual`` entries.
    inf_norm : ndarray of float64, shape (L,)
        ``max |x|`` per sample, averaged over samples.
    kurtosis : ndarray of float64, shape (L,)
        ``E[(x − μ)^4] / (σ^4 + 1e-6)`` per sample, averaged over samples.
    """

    layers: list
    inf_norm: np.ndarray
    kurtosis: np.ndarray

    def summary(self) -> dict:
        """``max_inf_norm`` (max over layers), ``avg_kurtosis`` and ``max_kurtosis``."""
        return {"max_inf_norm": float(self.inf_norm.max()), "avg_kurtosis": float(self.kurtosis.mean()),
                "max_kurtosis": float(self.kurtosis.max())}


def _sample_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inf-norm, kurtosis) per sample of (B, ...) activations, each sample flattened."""
    x = x.detach().double().reshape(x.shape[0], -1)
    mu = x.mean(1, keepdim=True)
    var = ((x - mu) ** 2).mean(1)
    kurt = ((x - mu) ** 4).mean(1) / (var ** 2 + 1e-6)
    return x.abs().max(1).values, kurt


def outlier_stats(backbone, images=None, texts=None, *, batch_size: int = 32) -> OutlierStats:
    """Infinity norm and kurtosis of every block's FFN output and residual stream.

    Hooks on each residual block's ``mlp`` (FFN output) and on the block itself (the
    residual stream after it; the analogue of the reference's post-FFN LayerNorm input
    in open_clip's pre-LN blocks), over the given images and/or texts.

    Parameters
    ----------
    backbone : Backbone
    images : sequence, optional
    texts : sequence of str, optional
        At least one of the two.

    Returns
    -------
    OutlierStats
    """
    images = [] if images is None else list(images)
    texts = [] if texts is None else list(texts)
    if not images and not texts:
        raise UsageError("outlier_stats needs images or texts")
    sums: dict[str, list] = {}
    handles = []

    def record(key, batch_first):
        def hook(module, args, output):
            inf, kurt = _sample_stats(output if batch_first else output.transpose(0, 1))
            s = sums.setdefault(key, [0.0, 0.0, 0])
            s[0] += float(inf.sum())
            s[1] += float(kurt.sum())
            s[2] += inf.shape[0]
        return hook

    model = backbone.model
    towers = [("image", getattr(model, "visual", None)), ("text", getattr(model, "transformer", None))]
    for tower_name, tower in towers:
        if tower is None:
            continue
        transformer = getattr(tower, "transformer", tower)
        batch_first = getattr(transformer, "batch_first", True)
        for name, block in attention_modules(tower):
            key = f"{tower_name}.{name.split('.')[-1]}"
            handles.append(block.mlp.register_forward_hook(record(f"{key}.ffn", batch_first)))
            handles.append(block.register_forward_hook(record(f"{key}.residual", batch_first)))
    try:
        with torch.no_grad():
            if images:
                backbone.encode_images(images, batch_size=batch_size, progress=False)
            if texts:
                backbone.encode_texts(texts, batch_size=batch_size)
    finally:
        for h in handles:
            h.remove()
    layers = list(sums)
    return OutlierStats(layers, np.array([sums[k][0] / sums[k][2] for k in layers]),
                        np.array([sums[k][1] / sums[k][2] for k in layers]))
