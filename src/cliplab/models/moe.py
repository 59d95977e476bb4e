"""Mixture-of-experts MLP blocks inside open_clip towers, and the config that records them.

An upcycled model (:func:`cliplab.surgery.moe.upcycle`) replaces the ``mlp`` of chosen
residual blocks by a :class:`MoEMLP`.  Its ``model_cfg`` carries the layout in cliplab's
part of the config, ``model_cfg["cliplab"][MOE_KEY]``, ``{"experts": E, "top_k": k, "layers": {"visual": [i, ...], "text": [j, ...]}}``,
so :func:`cliplab.models.loading.build_model` (hence :func:`cliplab.load`) rebuilds the same
structure before loading the weights.  The layer lives here, beside the loader that
must build it; the upcycling, the diversified multiplet and the load-balancing
objective are in :mod:`cliplab.surgery.moe`.

Routing follows CLIP-MoE's ``MoEResidualAttentionBlock`` (Zhang et al., "CLIP-MoE:
Towards Building Mixture of Experts for CLIP with Diversified Multiplet Upcycling",
EMNLP 2025, arXiv:2409.19291; code github.com/OpenSparseLLMs/CLIP-MoE,
``clipmoe/model_clipmoe.py``), per token h (width W)::

    p = softmax(h G^T)                 G: (E, W), no bias
    (w, e) = top-k of p;  w <- w / sum(w)
    y = sum_j w_j Expert_{e_j}(h)

Deviations: the expert keeps the block's own MLP (GELU or QuickGELU as the model was
built, no expert dropout, the reference's default ``dropout=0``); the gate, the experts and
``ls_2`` stay where open_clip's block has them (``mlp.gate``, ``mlp.experts.<e>.c_fc``), so
only the MLP is swapped.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MOE_KEY", "MoEMLP", "install_moe", "moe_modules", "check_layout"]

MOE_KEY = "moe"
"""Key of the MoE layout in an open_clip ``model_cfg``."""

_TOWERS = ("visual", "text")


class MoEMLP(nn.Module):
    """Top-k routed experts in place of a residual block's MLP.

    Parameters
    ----------
    experts : sequence of nn.Module
        E modules mapping (N, W) -> (N, W) (copies of the block's MLP).
    width : int
        W, the token width (the gate's input).
    top_k : int
        k, experts per token (1 <= k <= E).

    Attributes
    ----------
    gate : nn.Linear
        The router, (E, W) weight, no bias (reference ``self.gate``).
    router_logits : list of torch.Tensor of shape (N, E)
        The gate logits of every forward pass since the last :meth:`pop_router_logits`
        while ``record_router_logits`` is set (by the load-balancing objective, for one
        step); what the load-balancing loss reads.  Nothing is recorded otherwise, so a
        model trained with another objective keeps no logits (or graphs) across steps.
    record_router_logits : bool, default False
    """

    skips_parameters = True   # an expert may get no token in a step (DDP: find_unused_parameters)

    def __init__(self, experts, width: int, top_k: int):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        if not 1 <= int(top_k) <= len(self.experts):
            raise ValueError(f"top_k must be in 1..{len(self.experts)}, got {top_k}")
        self.top_k = int(top_k)
        ref = next(self.experts[0].parameters())
        self.gate = nn.Linear(width, len(self.experts), bias=False, dtype=ref.dtype, device=ref.device)
        self.router_logits: list[torch.Tensor] = []
        self.record_router_logits = False

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def c_fc(self) -> nn.Linear:
        """The first expert's input layer: open_clip reads the tower's dtype from ``mlp.c_fc``."""
        return self.experts[0].c_fc

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}"

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (N, E), top-k weights (N, k) summing to 1 per row, expert ids (N, k)."""
        logits = self.gate(h)                                             # (N, E)
        probs = F.softmax(logits, dim=-1, dtype=torch.float)              # (N, E)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)           # (N, k), (N, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)             # renormalise over the k
        return logits, weights.to(h.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])                                      # (N, W)
        logits, weights, chosen = self.route(h)
        if self.record_router_logits:
            self.router_logits.append(logits)
        out = torch.zeros_like(h)                                         # (N, W)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)                         # tokens sent to expert e, their slot
            if rows.numel() == 0:
                continue
            y = expert(h[rows]) * weights[rows, slot, None]               # (n_e, W)
            out.index_add_(0, rows, y.to(h.dtype))
        return out.reshape(shape)

    def pop_router_logits(self) -> list[torch.Tensor]:
        """The recorded router logits (each (N, E)), and forget them."""
        out, self.router_logits = self.router_logits, []
        return out


def _blocks(model: nn.Module, tower: str):
    """The residual blocks of a tower of an open_clip CLIP."""
    if tower == "visual":
        return model.visual.transformer.resblocks
    return model.transformer.resblocks


def check_layout(layout: dict) -> dict:
    """A normalised copy of an MoE layout; ``ValueError`` naming what is wrong."""
    if not isinstance(layout, dict):
        raise ValueError(f"the {MOE_KEY!r} entry of a model config must be an object, got {layout!r}")
    try:
        experts, top_k = int(layout["experts"]), int(layout["top_k"])
        layers = {t: sorted(int(i) for i in v) for t, v in dict(layout["layers"]).items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"bad MoE layout {layout!r}: needs experts, top_k and layers "
                         f"({type(e).__name__}: {e})") from None
    if experts < 1 or not 1 <= top_k <= experts:
        raise ValueError(f"bad MoE layout: experts={experts}, top_k={top_k} (need 1 <= top_k <= experts)")
    if set(layers) - set(_TOWERS) or not any(layers.values()):
        raise ValueError(f"bad MoE layout: layers must map some of {_TOWERS} to block indices, got {layers}")
    return {"experts": experts, "top_k": top_k, "layers": {t: v for t, v in layers.items() if v}}


def install_moe(model: nn.Module, layout: dict, experts_from=None) -> nn.Module:
    """Replace the MLPs named by ``layout`` with :class:`MoEMLP` blocks, in place.

    Parameters
    ----------
    model : open_clip.CLIP
    layout : dict
        ``{"experts": E, "top_k": k, "layers": {"visual": [...], "text": [...]}}``.
    experts_from : sequence of nn.Module, optional
        E models of the same architecture whose MLPs become the experts (expert e
        is a copy of ``experts_from[e]``'s MLP of the same block).  Default: E copies
        of ``model``'s own MLP.

    Returns
    -------
    nn.Module
        ``model``.  Gates are freshly initialised (``nn.Linear``'s default).

    Raises
    ------
    ValueError
        A bad layout, a block index out of range, or a block already upcycled.
    """
    layout = check_layout(layout)
    n = layout["experts"]
    if experts_from is not None and len(experts_from) != n:
        raise ValueError(f"experts_from has {len(experts_from)} models for {n} experts")
    for tower, indices in layout["layers"].items():
        blocks = _blocks(model, tower)
        for i in indices:
            if not 0 <= i < len(blocks):
                raise ValueError(f"{tower} tower has {len(blocks)} blocks; no block {i}")
            mlp = blocks[i].mlp
            if isinstance(mlp, MoEMLP):
                raise ValueError(f"{tower} block {i} is already a mixture of experts")
            sources = [mlp] * n if experts_from is None else [_blocks(m, tower)[i].mlp for m in experts_from]
            width = mlp.c_fc.in_features
            blocks[i].mlp = MoEMLP([copy.deepcopy(s) for s in sources], width, layout["top_k"])
    return model


def moe_modules(model: nn.Module) -> dict[str, list[MoEMLP]]:
    """Tower name -> its :class:`MoEMLP` blocks, in depth order (towers without any left out)."""
    out: dict[str, list[MoEMLP]] = {}
    for tower in _TOWERS:
        try:
            blocks = _blocks(model, tower)
        except AttributeError:
            continue
        found = [b.mlp for b in blocks if isinstance(getattr(b, "mlp", None), MoEMLP)]
        if found:
            out[tower] = found
    return out
