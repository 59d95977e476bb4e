"""Outlier-free self-attention for open_clip towers: clipped softmax and per-head gates.

The attention module of Bondarenko, Del Chiaro & Nagel, "Quantizable Transformers: Removing
Outliers by Helping Attention Heads Do Nothing", NeurIPS 2023, arXiv 2306.12929 (reference
code ``Qualcomm-AI-research/outlier-free-transformers``).  The method, its equations and its
deviations from the reference are described in :mod:`cliplab.surgery.outlier_free`, which
applies it to a Backbone; this module holds the parts a *checkpoint* needs, so that the
model loader can rebuild a model trained with it:

- :class:`OutlierFreeAttention`, :func:`clipped_softmax`, :func:`gamma_for_length`;
- :func:`swap_attention`: replace the attention of an open_clip model in place, from an
  *attention spec* (a JSON-able dict), and return the resolved spec;
- the spec is recorded in ``model_cfg["cliplab"]["attention"]``.  cliplab writes it to the
  top-level ``"cliplab"`` key of ``open_clip_config.json`` (open_clip ignores it) and
  :func:`cliplab.models.loading.build_model` re-applies it before the weights are loaded.

Attention spec (all keys optional but ``softmax``)::

    {"softmax": "clipped" | "vanilla",
     "gamma": {"image": -0.049, "text": -0.1} or one number,   # else -alpha / T per tower
     "alpha": 3.2, "zeta": 1.0,
     "gate": null | "linear" | "mlp", "pi_init": 0.5,
     "fine_tuning": false,          # true: gated output scaled by 1 / pi_init
     "towers": ["image", "text"]}

:func:`swap_attention` returns the resolved form (``gamma`` per tower, no ``alpha``), which
is what cliplab records.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UsageError

__all__ = ["attention_spec", "clipped_softmax", "gamma_for_length", "OutlierFreeAttention", "attention_modules",
           "swap_attention", "ATTENTION_PRESETS"]

SOFTMAX_KINDS = ("vanilla", "clipped")
GATE_KINDS = (None, "linear", "mlp")


def clipped_softmax(x: torch.Tensor, gamma: float = 0.0, zeta: float = 1.0, dim: int = -1) -> torch.Tensor:
    """``clip((ζ − γ)·softmax(x) + γ, 0, 1)`` along ``dim`` (paper Eq. 4.1).

    Parameters
    ----------
    x : Tensor
        Logits; ``-inf`` entries (masked keys) give probability 0 before clipping, so
        exactly 0 after it when ``γ ≤ 0``.
    gamma : float, default 0.0
        The lower stretch ``γ ≤ 0``; ``γ = 0, ζ = 1`` is the plain softmax.
    zeta : float, default 1.0
        The upper stretch ``ζ ≥ 1``.

    Raises
    ------
    UsageError
        ``gamma > 0`` or ``zeta < 1``.
    """
    if gamma > 0 or zeta < 1:
        raise UsageError(f"clipped softmax needs gamma <= 0 and zeta >= 1, got gamma={gamma}, zeta={zeta}")
    p = torch.softmax(x, dim=dim)
    if gamma == 0 and zeta == 1:
        return p
    return torch.clamp((zeta - gamma) * p + gamma, 0.0, 1.0)


def gamma_for_length(alpha: float, length: int) -> float:
    """The reference's sequence-length rule ``γ = −α / T`` (``--alpha`` with ``ζ = 1``).

    The reference's BERT-base setting is ``γ = −0.025`` at ``T = 128`` (``α ≈ 3.2``);
    OPT-125m uses ``α = 12`` at ``T = 512``.
    """
    if alpha < 0 or length < 1:
        raise UsageError(f"gamma_for_length needs alpha >= 0 and length >= 1, got {alpha}, {length}")
    return -float(alpha) / int(length)


class _HeadGates(torch.nn.Module):
    """Per-head gate logits ``g_h(x^{(h)})``: (B, L, H, d_head) -> (B, L, H)."""

    def __init__(self, heads: int, d_head: int, kind: str, pi_init: float, init_std: float | None):
        super().__init__()
        hidden = max(1, d_head // 4) if kind == "mlp" else None
        bias = math.log(pi_init / (1 - pi_init))
        if kind == "linear":
            self.w1 = torch.nn.Parameter(torch.empty(heads, d_head, 1))
            self.b1 = torch.nn.Parameter(torch.full((heads, 1), bias))
        else:
            self.w1 = torch.nn.Parameter(torch.empty(heads, d_head, hidden))
            self.b1 = torch.nn.Parameter(torch.zeros(heads, hidden))
            self.w2 = torch.nn.Parameter(torch.empty(heads, hidden, 1))
            self.b2 = torch.nn.Parameter(torch.full((heads, 1), bias))
        self.kind = kind
        last = "w2" if kind == "mlp" else "w1"
        for name in ("w1", "w2"):
            w = getattr(self, name, None)
            if w is None:
                continue
            if init_std is None:   # training from scratch: nn.Linear's default, per head
                bound = 1 / math.sqrt(w.shape[1])
                torch.nn.init.uniform_(w, -bound, bound)
            elif name == last:     # fine-tuning: the gate logit starts at logit(pi_init) exactly
                torch.nn.init.zeros_(w)
            else:
                torch.nn.init.normal_(w, 0.0, init_std)

    def forward(self, xh: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("blhd,hdk->blhk", xh, self.w1) + self.b1                     # (B, L, H, k)
        if self.kind == "mlp":
            z = torch.einsum("blhd,hdk->blhk", torch.relu(z), self.w2) + self.b2       # (B, L, H, 1)
        return z.squeeze(-1)                                                            # (B, L, H)


class OutlierFreeAttention(torch.nn.Module):
    """Self-attention of an open_clip block with a clipped softmax and/or per-head gates.

    Takes over the parameters of the ``nn.MultiheadAttention`` it replaces (same names,
    ``in_proj_weight``, ``in_proj_bias``, ``out_proj``), so state dicts stay compatible
    apart from the gate's own parameters (``gates.*``).  With ``softmax="vanilla"`` and no
    gate it equals the original module.

    Parameters
    ----------
    mha : torch.nn.MultiheadAttention
        Self-attention with packed in-projection (what open_clip builds).
    softmax : {"vanilla", "clipped"}
    gamma, zeta : float
        Clipped-softmax stretch (ignored for ``"vanilla"``).
    gate : {None, "linear", "mlp"}
    pi_init : float, default 0.5
        Initial gate probability (the reference: 0.5 for BERT, 0.25 for OPT).
    init_std : float or None, default None
        None: gates initialised for training from scratch.  A number: fine-tuning init —
        the gate's last layer starts at zero (so the logit is ``logit(pi_init)`` for every
        token), an ``"mlp"`` gate's hidden layer at ``N(0, init_std)``, and the output is
        scaled by ``1/pi_init``: the model starts exactly as the original and every gate
        weight gets a gradient.  Deviation: the reference draws all gate weights from
        ``N(0, 0.01)``, which starts near, not at, the original (on the tiny test model
        features move by 2e-3).

    Forward: ``(query, key, value, need_weights=False, attn_mask=None)`` as
    ``nn.MultiheadAttention`` (self-attention only: ``key``/``value`` must be ``query``),
    returning ``(output, None)``.  ``attn_mask`` is an additive float mask (L, L) or a
    boolean mask where True means "may not attend".
    """

    def __init__(self, mha: torch.nn.MultiheadAttention, *, softmax: str = "vanilla", gamma: float = 0.0,
                 zeta: float = 1.0, gate: str | None = None, pi_init: float = 0.5, init_std: float | None = None):
        super().__init__()
        if softmax not in SOFTMAX_KINDS:
            raise UsageError(f"softmax must be one of {', '.join(SOFTMAX_KINDS)}, got {softmax!r}")
        if gate not in GATE_KINDS:
            raise UsageError(f"gate must be one of none, linear, mlp, got {gate!r}")
        if not 0 < pi_init < 1:
            raise UsageError(f"pi_init must be in (0, 1), got {pi_init}")
        if mha.in_proj_weight is None or not getattr(mha, "_qkv_same_embed_dim", True):
            raise UsageError("only self-attention with a packed in-projection can be replaced")
        if softmax == "clipped":
            clipped_softmax(torch.zeros(1), gamma, zeta)  # validates gamma/zeta
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.batch_first = mha.batch_first
        self.in_proj_weight, self.in_proj_bias, self.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj
        self.softmax, self.gamma, self.zeta = softmax, float(gamma), float(zeta)
        self.gate, self.pi_init, self.init_std = gate, float(pi_init), init_std
        d_head = self.embed_dim // self.num_heads
        self.gates = None if gate is None else _HeadGates(self.num_heads, d_head, gate, pi_init, init_std)
        self.gate_scale = 1.0 / pi_init if (gate is not None and init_std is not None) else 1.0
        #: Called on the input (B, L, W) of the in-projection; the W8A8 simulation
        #: (:mod:`cliplab.surgery.quantize`) puts its activation quantizer here.
        self.pre_in_proj = torch.nn.Identity()

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, heads={self.num_heads}, softmax={self.softmax}, "
                f"gamma={self.gamma:g}, zeta={self.zeta:g}, gate={self.gate}")

    def attention_probs(self, q: torch.Tensor, k: torch.Tensor, attn_mask=None) -> torch.Tensor:
        """(B, H, L, L) attention weights from per-head q, k (B, H, L, d)."""
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask.to(scores.dtype)
        if self.softmax == "clipped":
            return clipped_softmax(scores, self.gamma, self.zeta)
        return torch.softmax(scores, dim=-1)

    def forward(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None, **_):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise UsageError("OutlierFreeAttention supports self-attention only")
        x = query if self.batch_first else query.transpose(0, 1)                           # (B, L, W)
        B, L, W = x.shape
        H = self.num_heads
        q, k, v = F.linear(self.pre_in_proj(x), self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, L, H, W // H).transpose(1, 2) for t in (q, k, v))         # (B, H, L, d)
        probs = self.attention_probs(q, k, attn_mask)
        o = (probs @ v).transpose(1, 2)                                                   # (B, L, H, d)
        if self.gates is not None:
            g = torch.sigmoid(self.gates(x.reshape(B, L, H, W // H)))                      # (B, L, H)
            o = o * (g.unsqueeze(-1) * self.gate_scale)
        out = self.out_proj(o.reshape(B, L, W))
        out = out if self.batch_first else out.transpose(0, 1)
        return out, (probs.mean(1) if need_weights else None)


def attention_modules(model: torch.nn.Module):
    """``(name, block)`` of every open_clip residual block whose ``attn`` is self-attention."""
    for name, module in model.named_modules():
        attn = getattr(module, "attn", None)
        if isinstance(attn, (torch.nn.MultiheadAttention, OutlierFreeAttention)) and hasattr(module, "ln_1"):
            if isinstance(attn, torch.nn.MultiheadAttention) and getattr(attn, "kdim", None) != attn.embed_dim:
                continue   # cross-attention (attentional poolers): left alone
            yield name, module


SPEC_KEYS = ("softmax", "gamma", "alpha", "zeta", "gate", "pi_init", "fine_tuning", "towers")
TOWERS = ("image", "text")

ATTENTION_PRESETS = {
    "clipped": {"softmax": "clipped", "alpha": 3.2, "zeta": 1.0},
    "gated-linear": {"softmax": "vanilla", "gate": "linear", "pi_init": 0.25},
    "gated-mlp": {"softmax": "vanilla", "gate": "mlp", "pi_init": 0.5},
}
"""Attention specs for training from scratch, after the reference's scripts: clipped softmax
with ``α = 3.2`` (its BERT-base setting ``γ = −0.025`` at ``T = 128``; the threshold
``−γ/(ζ−γ)`` is then about 3.1× the uniform weight ``1/T`` as here), ``ζ = 1``; a linear gate
per head with ``π_init = 0.25`` (its OPT setting) and an MLP gate with ``π_init = 0.5`` (its
BERT setting leaves the bias at PyTorch's default, near 0 = logit(0.5)).  Gate weights start
as ``nn.Linear``'s."""


def _towers(model) -> dict:
    """``{"image": (transformer, T), "text": (transformer, T)}`` of an open_clip CLIP."""
    out = {}
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "transformer"):
        grid = getattr(visual, "grid_size", None)
        if grid is None:
            raise UsageError("clipped softmax needs a ViT image tower (no grid_size found)")
        out["image"] = (visual.transformer, int(grid[0]) * int(grid[1]) + 1)   # patches + class token
    text = getattr(model, "transformer", None)
    if text is not None:
        out["text"] = (text, int(getattr(model, "context_length", 77)))
    return out


def attention_spec(model: torch.nn.Module) -> dict | None:
    """The resolved spec of the outlier-free attention ``model`` holds, or None if it has none.

    What :func:`swap_attention` returned when it built these blocks (``gamma`` per tower,
    not ``alpha``), read from the blocks themselves: recorded in a config, it rebuilds the
    same attention even after the sequence length changed (Long-CLIP's stretched context).
    """
    found = {}
    for tower, (module, _) in _towers(model).items():
        attns = [b.attn for _, b in attention_modules(module) if isinstance(b.attn, OutlierFreeAttention)]
        if attns:
            found[tower] = attns[0]
    if not found:
        return None
    a = next(iter(found.values()))
    return {"softmax": a.softmax, "gamma": {t: m.gamma for t, m in found.items()}, "zeta": a.zeta,
            "gate": a.gate, "pi_init": a.pi_init, "fine_tuning": a.init_std is not None, "towers": list(found)}


def swap_attention(model: torch.nn.Module, spec: dict, *, init_std: float | None = None) -> dict:
    """Replace, in place, the self-attention of ``model``'s towers as ``spec`` says.

    Parameters
    ----------
    model : torch.nn.Module
        An open_clip ``CLIP`` (ViT image tower and/or a text transformer) with plain
        ``nn.MultiheadAttention`` blocks.
    spec : dict
        An attention spec (see the module docstring).
    init_std : float, optional
        Gate init of :class:`OutlierFreeAttention`; default: ``0.01`` when
        ``spec["fine_tuning"]`` is true (the output is then scaled by ``1/pi_init``), else
        the from-scratch init.  Irrelevant when weights are loaded afterwards.

    Returns
    -------
    dict
        The resolved spec: ``softmax``, ``gamma`` per tower, ``zeta``, ``gate``,
        ``pi_init``, ``fine_tuning``, ``towers``; JSON-able.

    Raises
    ------
    UsageError
        An unknown key, softmax or gate kind, a bad value, a model already swapped, or one
        without open_clip attention blocks.
    """
    if not isinstance(spec, dict):
        raise UsageError(f"an attention spec must be a JSON object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise UsageError(f"unknown attention spec key(s) {', '.join(unknown)} (known: {', '.join(SPEC_KEYS)})")
    softmax, gate = spec.get("softmax", "vanilla"), spec.get("gate")
    if softmax not in SOFTMAX_KINDS:
        raise UsageError(f"attention softmax must be one of {', '.join(SOFTMAX_KINDS)}, got {softmax!r}")
    if gate not in GATE_KINDS:
        raise UsageError(f"attention gate must be one of none, linear, mlp, got {gate!r}")
    towers = list(spec.get("towers", TOWERS))
    if not towers or any(t not in TOWERS for t in towers):
        raise UsageError(f"attention towers must be a subset of image, text, got {towers!r}")
    fine_tuning = bool(spec.get("fine_tuning", False))
    if init_std is None and fine_tuning:
        init_std = 0.01
    zeta, pi_init = float(spec.get("zeta", 1.0)), float(spec.get("pi_init", 0.5))
    gamma = spec.get("gamma")
    available = _towers(model)
    resolved = {}
    for tower in towers:
        if tower not in available:
            continue
        module, length = available[tower]
        if softmax != "clipped":
            g = 0.0
        elif gamma is None:
            g = gamma_for_length(float(spec.get("alpha", 4.0)), length)
        else:
            g = float(gamma[tower] if isinstance(gamma, dict) else gamma)
        blocks = list(attention_modules(module))
        if any(isinstance(b.attn, OutlierFreeAttention) for _, b in blocks):
            raise UsageError(f"the {tower} tower already has outlier-free attention")
        for _, block in blocks:
            block.attn = OutlierFreeAttention(block.attn, softmax=softmax, gamma=g, zeta=zeta, gate=gate,
                                              pi_init=pi_init, init_std=init_std)
        if blocks:
            resolved[tower] = g
    if not resolved:
        raise UsageError("the model has no open_clip attention blocks to replace")
    return {"softmax": softmax, "gamma": resolved, "zeta": zeta, "gate": gate, "pi_init": pi_init,
            "fine_tuning": init_std is not None, "towers": list(resolved)}
