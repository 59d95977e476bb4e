"""ProAct: hybrid clipped activations with progressively trained thresholds.

Mousavi et al., "ProAct: Progressive Training for Hybrid Clipped Activation Function to
Enhance Resilience of DNNs" (2024); reference: the Reliable ReLU Toolbox (PyPI ``rrelu``,
``rrelu/relu_bound/bound_proact.py`` and ``rrelu/search_bound/proact.py``).

A bit flip in a weight's exponent can make an activation huge, and the error then
propagates to the output.  ProAct bounds every activation with a trainable threshold ``T``:

    HyReLU(x) = max(0, x − x·σ(k (x − T))),  k = 20

≈ ``x`` below ``T`` and ≈ 0 above it (out-of-range values are zeroed, not saturated).  In
CLIP's GELU MLPs we apply the same gate to the tower's own activation,
``a(x)·(1 − σ(k (x − T)))``, which for ``a = ReLU`` is exactly HyReLU.  The thresholds are
*hybrid*: one scalar per activation layer (layer-wise), except the last layer of the
tower, which gets one threshold per neuron (neuron-wise).

Training (:func:`train_proact`, weights frozen): thresholds start at the running maximum
of each neuron's input over training images (reduced to the layer maximum for the
layer-wise ones), then are trained one layer at a time from the last to the first, with
loss ``0.8·CE + 0.1·KD + 4e-8·Σ mean(T²)`` (KD: soft cross-entropy to the unclipped
model's logits), AdamW with a cosine schedule (lr 1e-3 for the neuron-wise layer, 1e-2
for scalars), through cliplab's one :class:`~cliplab.train.Trainer`.  Per layer the weight
decays ``decays`` are tried from the strongest; the first whose validation accuracy stays
within ``tolerance`` of the unclipped model is kept (strong decay lowers T).

Deviations: the classifier is CLIP zero-shot (image tower + fixed class text weights);
only the image tower's MLP activations are bounded (zero-shot class weights are computed
once, so the text tower does not run at inference); training runs a fixed number of steps
per layer instead of the reference's epochs (100+5 neuron-wise, 10+5 layer-wise).
"""

from __future__ import annotations

import copy
import logging
import tempfile
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..train import TrainConfig, Trainer
from ..train.losses import Objective
from ..zeroshot import class_weights, get_templates

logger = logging.getLogger(__name__)

__all__ = ["HybridClippedActivation", "apply_proact", "train_proact", "bounded_layers"]


class HybridClippedActivation(torch.nn.Module):
    """``a(x)·(1 − σ(k (x − T)))``: the wrapped activation, zeroed above a trainable threshold.

    Parameters
    ----------
    activation : torch.nn.Module
        The activation it bounds (GELU, QuickGELU, ReLU...).
    threshold : torch.Tensor
        ``()`` (layer-wise) or ``(F,)`` (neuron-wise, over the last input dimension).
    k : float, default 20.0
        Steepness of the cut-off (the reference's ``k = −20`` in ``σ(−k(x − T))``).
    """

    def __init__(self, activation: torch.nn.Module, threshold: torch.Tensor, k: float = 20.0):
        super().__init__()
        self.activation = activation
        self.threshold = torch.nn.Parameter(threshold.detach().clone().float())
        self.k = float(k)
        self.enabled = True

    @property
    def neuron_wise(self) -> bool:
        return self.threshold.ndim > 0

    def extra_repr(self) -> str:
        return f"{'neuron' if self.neuron_wise else 'layer'}-wise, k={self.k:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.activation(x)
        if not self.enabled:
            return a
        return a * (1 - torch.sigmoid(self.k * (x - self.threshold)))


def bounded_layers(model: torch.nn.Module) -> list[HybridClippedActivation]:
    """The bounded activations of ``model``, in forward order."""
    return [m for m in model.modules() if isinstance(m, HybridClippedActivation)]


@contextmanager
def _unclipped(model):
    layers = bounded_layers(model)
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True


def _mlp_activations(visual) -> list[tuple[torch.nn.Module, str]]:
    """(parent, attribute) of every residual block's MLP activation, in order."""
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None:
        raise UsageError("ProAct needs an open_clip ViT image tower (transformer.resblocks)")
    out = []
    for block in blocks:
        mlp = block.mlp
        names = [n for n, m in mlp.named_children() if not isinstance(m, torch.nn.Linear)
                 and not isinstance(m, torch.nn.Dropout) and not isinstance(m, torch.nn.LayerNorm)]
        if len(names) != 1:
            raise UsageError(f"cannot find the activation of an MLP with children {list(dict(mlp.named_children()))}")
        out.append((mlp, names[0]))
    return out


def apply_proact(backbone, images, *, k: float = 20.0, batch_size: int = 64):
    """A new Backbone whose image-tower MLP activations are hybrid clipped activations.

    Thresholds start at the running maximum of each neuron's activation input over
    ``images``; layer-wise layers take the maximum over neurons.  The last block's
    activation is neuron-wise.

    Parameters
    ----------
    backbone : Backbone
        Left unchanged.
    images : sequence
        Training images for the initial thresholds (paths, PIL images or uint8 arrays).
    k : float, default 20.0

    Returns
    -------
    Backbone
        Named ``<name>+proact``.

    Raises
    ------
    UsageError
        No images, or a tower that is not an open_clip ViT.
    """
    images = list(images)
    if not images:
        raise UsageError("ProAct needs training images to initialise its thresholds")
    model = copy.deepcopy(backbone.model)
    sites = _mlp_activations(model.visual)
    maxima: list[torch.Tensor | None] = [None] * len(sites)
    handles = []
    for i, (mlp, name) in enumerate(sites):
        def hook(module, args, i=i):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).amax(0)        # (F,)
            maxima[i] = x if maxima[i] is None else torch.maximum(maxima[i], x)
        handles.append(getattr(mlp, name).register_forward_pre_hook(hook))
    probe = backbone.with_model(model, name=backbone.name)
    try:
        probe.encode_images(images, batch_size=batch_size, progress=False)
    finally:
        for h in handles:
            h.remove()
    for i, (mlp, name) in enumerate(sites):
        last = i == len(sites) - 1
        threshold = maxima[i] if last else maxima[i].max()
        setattr(mlp, name, HybridClippedActivation(getattr(mlp, name), threshold, k))
    return backbone.with_model(model, name=f"{backbone.name}+proact")


class _ZeroShotHead(torch.nn.Module):
    """Logits (B, C) of the image tower against fixed class weights; only thresholds train."""

    def __init__(self, model, weights: np.ndarray, scale: float):
        super().__init__()
        self.visual = model.visual
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float32))   # (C, D)
        self.scale = float(scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(self.visual(images), dim=-1) @ self.weights.T


class _ProActObjective(Objective):
    """``ce·CE + kd·KD + reg·Σ mean(T²)`` over the bounded layers (ProAct's loss)."""

    needs_captions = False
    needs_targets = True

    def __init__(self, layer: HybridClippedActivation, all_layers, *, ce: float, kd: float, reg: float,
                 weight_decay: float):
        super().__init__()
        self.layer, self.all_layers = [layer], list(all_layers)   # lists: not submodules
        self.ce, self.kd, self.reg, self.decay = ce, kd, reg, weight_decay

    def parameter_groups(self, model, weight_decay):
        return [{"params": [self.layer[0].threshold], "weight_decay": self.decay}]

    def forward_model(self, model, batch):
        return model(batch.images)

    def forward(self, outputs, batch=None):
        y, teacher = batch.targets["label"].long(), batch.targets["teacher"]
        logp = torch.log_softmax(outputs, dim=-1)
        kd = -(torch.softmax(teacher, dim=-1) * logp).sum(-1).mean()
        reg = sum((m.threshold ** 2).mean() for m in self.all_layers)
        return {"ce": self.ce * F.nll_loss(logp, y), "kd": self.kd * kd, "threshold": self.reg * reg}


class _Items:
    def __init__(self, images, labels, teacher):
        self.images, self.labels, self.teacher = images, labels, teacher

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], None, {"targets": {"label": np.int64(self.labels[i]), "teacher": self.teacher[i]}}


def train_proact(bounded, images, labels, classnames, *, templates="a photo of a {c}.", val=None,
                 steps_per_layer: int = 100, batch_size: int = 64, lr_layer: float = 1e-2,
                 lr_neuron: float = 1e-3, decays=(4e-1, 4e-3, 4e-5, 0.0), tolerance: float = 0.015,
                 ce: float = 0.8, kd: float = 0.1, reg: float = 4e-8, seed: int = 0, progress: bool | None = None):
    """Train the thresholds of :func:`apply_proact`'s Backbone progressively, last layer first.

    Parameters
    ----------
    bounded : Backbone
        From :func:`apply_proact`; trained in place (its weights stay frozen).
    images : sequence of uint8 arrays (H, W, 3) at the model's input size
    labels : sequence of int
        Indices into ``classnames``.
    classnames : list of str
    templates : str or list of str
        Zero-shot prompts, a spec of :func:`cliplab.zeroshot.get_templates`.
    val : (images, labels), optional
        Validation set for the weight-decay choice; default: the training images.
    steps_per_layer : int, default 100
    lr_layer, lr_neuron : float
        Learning rates of layer-wise and neuron-wise thresholds (the reference's 1e-2, 1e-3).
    decays : sequence of float
        Weight decays tried per layer, strongest first.
    tolerance : float, default 0.015
        Allowed drop of validation top-1 against the unclipped model (the reference: 1.5 points).
    ce, kd, reg : float
        Loss weights (the reference's 0.8, 0.1, 4e-8).

    Returns
    -------
    dict
        ``{"layers": [{"layer", "decay", "val_acc", "threshold_mean"}...], "clean_val_acc": float}``
        in training order.
    """
    model = bounded.model
    layers = bounded_layers(model)
    if not layers:
        raise UsageError("the Backbone has no bounded activations: call apply_proact first")
    images, labels = list(images), np.asarray(labels)
    if len(images) != len(labels) or not len(images):
        raise UsageError(f"{len(images)} images but {len(labels)} labels")
    w = class_weights(bounded, list(classnames), get_templates(templates), progress=False)               # (C, D)
    head = _ZeroShotHead(model, w, bounded.logit_scale)
    val_images, val_labels = (images, labels) if val is None else (list(val[0]), np.asarray(val[1]))

    def accuracy() -> float:
        x = bounded.encode_images(val_images, batch_size=batch_size, progress=False).features
        return float(((x @ w.T).argmax(1) == val_labels).mean())

    with _unclipped(model):
        teacher = bounded.logit_scale * bounded.encode_images(images, batch_size=batch_size,
                                                              progress=False).features @ w.T   # (N, C)
        clean = accuracy()
    items = _Items(images, labels, teacher.astype(np.float32))
    model.requires_grad_(False)
    history = []
    for index in reversed(range(len(layers))):
        layer = layers[index]
        start = layer.threshold.detach().clone()
        chosen = None
        for decay in decays:
            with torch.no_grad():
                layer.threshold.copy_(start)
            layer.threshold.requires_grad_(True)
            lr = lr_neuron if layer.neuron_wise else lr_layer
            with tempfile.TemporaryDirectory() as tmp:
                config = TrainConfig(steps=steps_per_layer, batch_size=min(batch_size, len(items)), lr=lr,
                                     weight_decay=decay, warmup_steps=max(1, steps_per_layer // 20),
                                     grad_clip=None, seed=seed, ckpt_every=0, log_every=max(1, steps_per_layer),
                                     out_dir=tmp)
                objective = _ProActObjective(layer, layers, ce=ce, kd=kd, reg=reg, weight_decay=decay)
                Trainer(head, None, None, items, config, objective=objective,
                        preprocess_cfg=bounded.preprocess_cfg, progress=progress).fit()
            layer.threshold.requires_grad_(False)
            model.eval()
            acc = accuracy()
            logger.info("ProAct layer %d: decay %g, val top-1 %.4f (unclipped %.4f)", index, decay, acc, clean)
            if acc >= clean - tolerance:
                chosen = decay
                break
        if chosen is None:   # no decay kept the accuracy: the last (weakest) one stays
            chosen = decays[-1]
        history.append({"layer": index, "decay": chosen, "val_acc": acc,
                        "threshold_mean": float(layer.threshold.detach().mean())})
    model.eval()
    return {"layers": history, "clean_val_acc": clean}
