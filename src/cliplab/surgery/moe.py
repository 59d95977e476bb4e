"""CLIP-MoE: upcycle a dense CLIP into top-k mixtures of experts from a diversified multiplet.

Zhang et al., "CLIP-MoE: Towards Building Mixture of Experts for CLIP with Diversified
Multiplet Upcycling", EMNLP 2025, arXiv:2409.19291.  Reference code:
github.com/OpenSparseLLMs/CLIP-MoE (``clipmoe/model_clipmoe.py``: ``MoEResidualAttentionBlock``,
``load_balancing_loss_func``; ``clipmoe/clipmoe.py``: ``initMoE_MCL``, ``initMoE_upcycle``;
``train/train_mcl.py``, ``train/train_moe.py``).

Algorithm
---------
1. **Diversified multiplet** (:func:`diversified_multiplet`).  Embed a sample of the
   training set with the dense model, cluster the joint (image, caption) features
   with k-means into E clusters, and fine-tune one copy of the dense model per
   cluster with only the MLPs of the chosen blocks trainable and every batch drawn
   from that cluster (InfoNCE).  The E copies differ exactly where the experts go.
2. **Upcycling** (:func:`upcycle`).  Each chosen block's MLP becomes E experts, expert
   e a copy of copy e's MLP (or, without a multiplet, E copies of the dense MLP: plain
   sparse upcycling, the reference's ``initMoE_upcycle``); everything else is the
   dense model's.  A router ``Linear(W, E, bias=False)`` per block, softmax, top-k,
   the k weights renormalised to sum 1 (:class:`cliplab.models.moe.MoEMLP`).
3. **Training** (:func:`train_moe`) through the one Trainer with
   :class:`MoEObjective`: InfoNCE plus the Switch-style load-balancing loss of each
   tower, ``L_bal = E * sum_e f_e P_e`` (Switch Transformer eqs. 4-6), f_e the fraction
   of tokens whose top-k includes e and P_e the mean router probability, over the tokens
   of all MoE blocks of the tower together::

       L = L_InfoNCE + aux_weight * (L_bal,image + L_bal,text)      aux_weight = 0.01

Defaults: E = 4, top-k = 2, every block of both towers, ``aux_weight`` 0.01, router and
experts trained (``trainable="moe"``).

Deviations
----------
* Multiplet, reduced: one k-means on the concatenated L2-normalised image and caption
  features into E clusters, and one fine-tuning run per cluster on that cluster alone.
  The reference runs E-1 *sequential* stages of Multistage Contrastive Learning (3 image
  x 3 text MiniBatchKMeans clusters per stage, accumulated labels ``cls*9 + label``, each
  stage fine-tunes the previous stage's MLPs with batches drawn from one accumulated
  cluster) and takes the base model as expert 0.  Kept: clusters from the model's own
  features, MLP-only fine-tuning, single-cluster batches, one expert per fine-tuned copy.
* One caption per image: the reference's ``0.01 (L_bal,img + L_bal,long/2 + L_bal,short/2)``
  becomes ``aux_weight (L_bal,image + L_bal,text)``; text padding positions are routed and
  counted as in the reference.  No division by the world size (the Trainer's DDP averages).
* The reference's default MoE phase trains routers only (``--lock-except-gate``, lr 1e-6,
  one epoch on 1-10M pairs); ``trainable="router"`` does that, the default trains router
  and experts.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import UsageError
from ..models.backbone import Backbone
from ..models.moe import MOE_KEY, check_layout, install_moe, moe_modules
from ..train.losses import Batch, ModelOutputs
from ..train.losses.infonce import InfoNCELoss
from ..train.trainer import TrainConfig, Trainer
from ..validation import check_choice, check_number, check_positive_int
from .layers import TOWERS

logger = logging.getLogger("cliplab.surgery.moe")

__all__ = ["load_balancing_loss", "upcycle", "diversified_multiplet", "Multiplet", "finetune_mlp",
           "train_moe", "MoEObjective", "set_trainable", "TRAINABLE"]

TRAINABLE = ("router", "moe", "all")
"""What :func:`set_trainable` unfreezes: the gates; gates and experts; everything."""


# ------------------------------------------------------------------------ the loss
def load_balancing_loss(router_logits, top_k: int) -> torch.Tensor:
    """Switch-style auxiliary load-balancing loss of top-k routing, as CLIP-MoE computes it.

    Parameters
    ----------
    router_logits : torch.Tensor of shape (..., E), or a sequence of (N_l, E) tensors
        Gate logits of all tokens (of all MoE blocks of one tower: they are pooled).
    top_k : int
        k of the routing.

    Returns
    -------
    torch.Tensor
        The scalar ``E * sum_e f_e P_e``: f_e the fraction of tokens whose top-k
        contains e, P_e the mean softmax probability of e (Switch Transformer,
        arXiv:2101.03961, eqs. 4-6; reference ``load_balancing_loss_func``).  Equals
        k under uniform routing; the gradient flows through P only.
    """
    if isinstance(router_logits, (list, tuple)):
        router_logits = torch.cat([t.reshape(-1, t.shape[-1]) for t in router_logits])
    logits = router_logits.reshape(-1, router_logits.shape[-1])          # (N, E)
    n_experts = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)                                 # (N, E)
    _, chosen = torch.topk(probs, top_k, dim=-1)                          # (N, k)
    mask = torch.nn.functional.one_hot(chosen, n_experts).float()         # (N, k, E)
    tokens_per_expert = mask.mean(dim=0)                                  # (k, E): f, per slot
    prob_per_expert = probs.mean(dim=0)                                   # (E,): P
    return n_experts * torch.sum(tokens_per_expert * prob_per_expert)     # eq. 4, summed over slots


# ---------------------------------------------------------------------- upcycling
def _layout(model, n_experts: int, top_k: int, towers, layers) -> dict:
    towers = check_choice("towers", towers, TOWERS, many=True)
    stacks = {"visual": getattr(getattr(model, "visual", None), "transformer", None),
              "text": getattr(model, "transformer", None)}
    out = {}
    for tower in towers:
        blocks = getattr(stacks[tower], "resblocks", None)
        if blocks is None:
            raise UsageError(f"the model has no open_clip {tower} transformer to upcycle "
                             "(MoE upcycling needs an open_clip CLIP tower; try towers=... of the ones it has)")
        n = len(blocks)
        if layers is None:
            idx = list(range(n))
        elif isinstance(layers, int) and not isinstance(layers, bool):
            if not 1 <= layers <= n:
                raise UsageError(f"layers={layers}: the {tower} tower has {n} blocks (give 1..{n}: the last N)")
            idx = list(range(n - layers, n))                                # the reference's moe_layers
        else:
            idx = sorted({int(i) for i in layers})
            if not idx or idx[0] < 0 or idx[-1] >= n:
                raise UsageError(f"layers={list(layers)}: the {tower} tower has blocks 0..{n - 1}")
        out[tower] = idx
    return check_layout({"experts": n_experts, "top_k": top_k, "layers": out})


def upcycle(backbone: Backbone, experts: int | Sequence[Backbone] = 4, *, top_k: int = 2,
            towers=TOWERS, layers: int | Sequence[int] | None = None, seed: int = 0) -> Backbone:
    """Return a new Backbone whose MLPs are top-k mixtures of experts; ``backbone`` is untouched.

    Parameters
    ----------
    backbone : Backbone
        The dense model; every weight outside the chosen MLPs comes from it.
    experts : int or sequence of Backbone, default 4
        E: a count (E copies of the dense MLP, plain sparse upcycling) or E dense
        Backbones of the same architecture whose MLPs become the experts (the
        diversified multiplet, :attr:`Multiplet.experts`).
    top_k : int, default 2
        Experts per token.
    towers : subset of ("visual", "text"), default both
    layers : None, int or sequence of int, default None
        Which blocks: all (None), the last N (int, the reference's ``moe_layers``) or
        these indices (in every chosen tower).
    seed : int, default 0
        Seeds the router initialisation (``nn.Linear``'s default); the global RNG is untouched.

    Returns
    -------
    Backbone
        In eval mode, every parameter trainable, ``model_cfg["cliplab"]["moe"]`` recording the
        layout so that ``save`` then :func:`cliplab.load` rebuilds it.  With identical
        experts its outputs equal ``backbone``'s for any router.

    Raises
    ------
    UsageError
        Bad counts, towers or layers; a backbone that is already upcycled; expert
        models of another architecture.
    """
    if moe_modules(backbone.model):
        raise UsageError("this backbone is already a mixture of experts")
    sources = None
    if isinstance(experts, int) and not isinstance(experts, bool):
        n_experts = check_positive_int("experts", experts)
    else:
        sources = [e.model if isinstance(e, Backbone) else e for e in experts]
        n_experts = len(sources)
        if n_experts < 1:
            raise UsageError("experts: give a count or at least one expert model")
        want = {k: tuple(v.shape) for k, v in backbone.model.state_dict().items()}
        for i, m in enumerate(sources):
            if {k: tuple(v.shape) for k, v in m.state_dict().items()} != want:
                raise UsageError(f"expert model {i} does not have the architecture of the dense backbone")
    check_positive_int("top_k", top_k)
    if top_k > n_experts:
        raise UsageError(f"top_k={top_k} is more than the {n_experts} experts")
    model = copy.deepcopy(backbone.model)
    layout = _layout(model, n_experts, top_k, towers, layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        install_moe(model, layout, experts_from=sources)
    model.requires_grad_(True)
    name = f"{backbone.name}+moe({n_experts}x{top_k})"
    cfg = dict(backbone.model_cfg)
    cfg["cliplab"] = {**(cfg.get("cliplab") or {}), MOE_KEY: layout}
    return Backbone(model, model_cfg=cfg,
                    preprocess_cfg=backbone.preprocess_cfg, tokenizer=backbone.tokenizer, name=name,
                    device=str(backbone.device), precision=backbone.precision)


def set_trainable(model: torch.nn.Module, trainable: str = "moe") -> torch.nn.Module:
    """Freeze ``model`` except its gates (``"router"``), gates and experts (``"moe"``), or nothing (``"all"``)."""
    check_choice("trainable", trainable, TRAINABLE)
    model.requires_grad_(trainable == "all")
    if trainable != "all":
        for mods in moe_modules(model).values():
            for m in mods:
                (m.gate if trainable == "router" else m).requires_grad_(True)
    return model


# ----------------------------------------------------------------------- training
class MoEObjective(InfoNCELoss):
    """InfoNCE plus ``aux_weight`` times the load-balancing loss of each tower's MoE blocks.

    ``forward_model`` clears the router logits the :class:`~cliplab.models.moe.MoEMLP`
    blocks recorded, runs the model, and puts ``L_bal`` of each tower in
    ``outputs.extras["balance_<tower>"]``; ``forward`` returns
    ``{"contrastive": ..., "balance": aux_weight * sum of them}`` (logged as
    ``loss_contrastive`` and ``loss_balance``).

    Parameters
    ----------
    aux_weight : float, default 0.01
        The reference's ``beta``.
    """

    name = "moe-infonce"

    def __init__(self, aux_weight: float = 0.01, *, rank: int = 0, world_size: int = 1):
        super().__init__(rank=rank, world_size=world_size)
        self.aux_weight = check_number("aux_weight", aux_weight, minimum=0.0)

    def forward_model(self, model: torch.nn.Module, batch: Batch) -> ModelOutputs:
        blocks = moe_modules(model)
        for mods in blocks.values():
            for m in mods:
                m.pop_router_logits()
                m.record_router_logits = True
        try:
            out = super().forward_model(model, batch)
        finally:
            for mods in blocks.values():
                for m in mods:
                    m.record_router_logits = False
        for tower, mods in blocks.items():
            logits = [t for m in mods for t in m.pop_router_logits()]
            if logits:
                out.extras[f"balance_{tower}"] = load_balancing_loss(logits, mods[0].top_k)
        return out

    def forward(self, outputs: ModelOutputs, batch: Batch | None = None) -> dict:
        terms = super().forward(outputs, batch)
        bal = [v for k, v in outputs.extras.items() if k.startswith("balance_")]
        if bal:
            terms["balance"] = self.aux_weight * sum(bal)
        return terms


class _Subset:
    """Items ``indices`` of a training set, in that order."""

    def __init__(self, train_set, indices):
        self.train_set, self.indices = train_set, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.train_set[int(self.indices[int(i)])]


def _fit(backbone: Backbone, model, train_set, config: TrainConfig, objective, *, evaluate=None,
         model_cfg=None, progress=None) -> tuple[Backbone, dict]:
    if config.out_dir is None:
        raise UsageError("config.out_dir is needed")
    row = Trainer(model, backbone.tokenizer, backbone.preprocess, train_set, config, evaluate,
                  model_cfg=model_cfg, progress=progress, objective=objective,
                  preprocess_cfg=backbone.preprocess_cfg).fit()
    model.eval().requires_grad_(True)
    return Backbone(model, model_cfg=model_cfg or backbone.model_cfg, preprocess_cfg=backbone.preprocess_cfg,
                    tokenizer=backbone.tokenizer, name=backbone.name, device=str(backbone.device),
                    precision=backbone.precision), row


def finetune_mlp(backbone: Backbone, train_set, config: TrainConfig, *, towers=TOWERS,
                 layers: int | Sequence[int] | None = None, evaluate: Callable | None = None,
                 progress: bool | None = None) -> Backbone:
    """Fine-tune a copy of a dense model with InfoNCE, only the chosen blocks' MLPs trainable.

    How each member of the multiplet is made (the reference's ``--lock-except-mlp``),
    and the dense baseline of the same training budget.

    Parameters
    ----------
    backbone : Backbone
        Dense; untouched.
    train_set : map-style dataset of ``(image, captions)``
    config : TrainConfig
        ``loss`` is ignored (InfoNCE); ``out_dir`` receives metrics and the final checkpoint.
    towers, layers
        As for :func:`upcycle`.

    Returns
    -------
    Backbone
    """
    model = copy.deepcopy(backbone.model)
    layout = _layout(model, 1, 1, towers, layers)
    model.requires_grad_(False)
    blocks = {"visual": model.visual.transformer.resblocks, "text": model.transformer.resblocks}
    for tower, idx in layout["layers"].items():
        for i in idx:
            blocks[tower][i].mlp.requires_grad_(True)
    bb, _ = _fit(backbone, model, train_set, config, InfoNCELoss(), evaluate=evaluate, progress=progress)
    return bb


def train_moe(backbone: Backbone, train_set, config: TrainConfig, *, aux_weight: float = 0.01,
              trainable: str = "moe", evaluate: Callable | None = None,
              progress: bool | None = None) -> Backbone:
    """Train an upcycled Backbone with :class:`MoEObjective` through the Trainer.

    Parameters
    ----------
    backbone : Backbone
        Made by :func:`upcycle`; untouched (a copy trains).
    train_set : map-style dataset of ``(image, captions)``
    config : TrainConfig
        ``loss`` is ignored; checkpoints in ``config.out_dir`` carry the MoE layout
        and load with :func:`cliplab.load` (``local-dir:OUT/checkpoints/step_N``).
    aux_weight : float, default 0.01
    trainable : {"router", "moe", "all"}, default "moe"
        See :func:`set_trainable`.

    Returns
    -------
    Backbone
        The trained model, in eval mode.
    """
    if not moe_modules(backbone.model):
        raise UsageError("this backbone has no mixture-of-experts blocks; upcycle it first")
    model = set_trainable(copy.deepcopy(backbone.model), trainable)
    bb, _ = _fit(backbone, model, train_set, config, MoEObjective(aux_weight), evaluate=evaluate,
                 model_cfg=backbone.model_cfg, progress=progress)
    return bb


# -------------------------------------------------------------- the multiplet
@dataclass
class Multiplet:
    """The outcome of :func:`diversified_multiplet`.

    Attributes
    ----------
    experts : list of Backbone
        E dense models, member e fine-tuned on cluster e.
    indices : numpy.ndarray of shape (N,)
        The training-set items that were clustered.
    labels : numpy.ndarray of shape (N,)
        Their cluster, 0..E-1.
    centers : numpy.ndarray of shape (E, 2 D)
        k-means centres of the concatenated (image, caption) features.
    """

    experts: list
    indices: np.ndarray
    labels: np.ndarray
    centers: np.ndarray


def _first_captions(train_set, indices) -> tuple[np.ndarray, list[str]]:
    images, captions = [], []
    for i in indices:
        image, caps, *_ = train_set[int(i)]
        images.append(np.asarray(image))
        captions.append(caps[0])
    return np.stack(images), captions


def diversified_multiplet(backbone: Backbone, train_set, config: TrainConfig, *, experts: int = 4,
                          n_samples: int = 2048, towers=TOWERS, layers: int | Sequence[int] | None = None,
                          seed: int = 0, progress: bool | None = None) -> Multiplet:
    """Cluster training features into E groups and fine-tune one MLP copy per group.

    Parameters
    ----------
    backbone : Backbone
        The dense model (untouched).
    train_set : map-style dataset of ``(image, captions)``
        Images as uint8 arrays at the model's size (or what ``encode_images`` reads).
    config : TrainConfig
        The fine-tuning run of each member (``steps``, ``batch_size``, ``lr``...);
        member e writes to ``<out_dir>/expert_<e>``; ``seed`` + e seeds it.
    experts : int, default 4
        E, the number of clusters and of members.
    n_samples : int, default 2048
        Items drawn (seeded, without replacement) from the training set and
        clustered; each member trains on its cluster's items only.
    towers, layers
        The MLPs fine-tuned (as for :func:`upcycle`; pass the same to it).
    seed : int, default 0
        Seeds the sample and k-means (``KMeans(n_init=10)`` of scikit-learn).

    Returns
    -------
    Multiplet

    Raises
    ------
    UsageError
        A cluster smaller than 2 items, or fewer samples than experts.
    """
    from sklearn.cluster import KMeans

    check_positive_int("experts", experts)
    n = min(check_positive_int("n_samples", n_samples), len(train_set))
    if n < 2 * experts:
        raise UsageError(f"{n} samples cannot make {experts} clusters of at least 2 items")
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(len(train_set), size=n, replace=False))
    images, captions = _first_captions(train_set, indices)
    fi = backbone.encode_images(images, progress=progress).features            # (N, D)
    ft = backbone.encode_texts(captions, progress=progress)                     # (N, D)
    km = KMeans(n_clusters=experts, n_init=10, random_state=seed).fit(np.hstack([fi, ft]))
    labels = km.labels_.astype(np.int64)                                       # (N,)
    sizes = np.bincount(labels, minlength=experts)
    logger.info("multiplet clusters: sizes %s", sizes.tolist())
    if sizes.min() < 2:
        raise UsageError(f"a cluster has {sizes.min()} item(s); draw more samples (n_samples)")
    out_dir = config.out_dir or tempfile.mkdtemp(prefix="cliplab-multiplet-")
    members = []
    for e in range(experts):
        subset = _Subset(train_set, indices[labels == e])
        cfg = replace(config, out_dir=f"{out_dir}/expert_{e}", seed=config.seed + e,
                      batch_size=min(config.batch_size, len(subset)))
        logger.info("multiplet member %d/%d: %d items, %d steps", e + 1, experts, len(subset), cfg.steps)
        members.append(finetune_mlp(backbone, subset, cfg, towers=towers, layers=layers, progress=progress))
    return Multiplet(members, indices, labels, km.cluster_centers_.astype(np.float32))
