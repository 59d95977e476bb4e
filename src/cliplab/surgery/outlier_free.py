"""Outlier-free attention: clipped softmax and gated attention in open_clip towers.

Bondarenko, Del Chiaro & Nagel, "Quantizable Transformers: Removing Outliers by Helping
Attention Heads Do Nothing", NeurIPS 2023, arXiv 2306.12929; reference code
``Qualcomm-AI-research/outlier-free-transformers`` (``transformers_language/models/softmax.py``
and ``bert_attention.py``).

Heads that want to "do nothing" push their softmax inputs towards ±∞ to reach exact zeros,
which grows a few huge activations in the residual stream; per-tensor INT8 then loses the
rest of the range.  Two fixes, each a drop-in replacement of the ``nn.MultiheadAttention``
of every open_clip ``ResidualAttentionBlock`` (:class:`OutlierFreeAttention`):

- **clipped softmax** (paper Eq. 4.1): ``clip((ζ − γ)·softmax(x) + γ, 0, 1)`` with
  ``ζ ≥ 1``, ``γ ≤ 0``.  Exact zeros are reached with finite logits and clipped entries
  get no gradient.  The sequence-length rule of the reference: ``γ = −α / T`` for the
  tower's sequence length ``T`` (:func:`gamma_for_length`).  Rows are not renormalised.
- **gated attention** (paper Eq. 4.2): the output of head ``h`` at token ``t`` is
  multiplied by ``σ(g_h(x_t^{(h)}))``, where ``x_t^{(h)}`` is the ``h``-th ``d_head`` slice
  of the attention layer's input (no projection) and ``g_h`` a per-head ``Linear(d_head, 1)``
  (``"linear"``) or ``Linear(d_head, d_head/4)–ReLU–Linear(·, 1)`` (``"mlp"``); the gate
  bias starts at ``logit(π_init)``.  For fine-tuning a pretrained model the gate's last
  layer starts at zero and the gated output is multiplied by ``1/π_init``, so the model
  starts exactly as the original (see :class:`OutlierFreeAttention` for the deviation).

Both are applied by :func:`apply_outlier_free`, which returns a new Backbone.  The
attention is computed explicitly (no fused kernel), which is slower than PyTorch's
``scaled_dot_product_attention``.  The module itself lives in
:mod:`cliplab.models.attention`, so that the model loader can rebuild it: the returned
Backbone's ``model_cfg["cliplab"]["attention"]`` records the softmax, ``γ`` per tower, ``ζ``,
the gate and its init, ``Backbone.save``, Trainer checkpoints and ``cliplab bundle`` write it
to ``open_clip_config.json`` (a top-level ``"cliplab"`` key that open_clip ignores), and
``cliplab.load`` re-applies it before loading the weights.

Training from scratch: ``cliplab train --recipe shapes-tiny --attention clipped |
gated-linear | gated-mlp`` (:func:`cliplab.train.recipes.get_recipe`), with the presets of
:data:`cliplab.models.attention.ATTENTION_PRESETS` (the reference's scripts: clipped
``α = 3.2``, i.e. its BERT ``γ = −0.025`` at ``T = 128``; linear gate ``π_init = 0.25`` as
its OPT, MLP gate ``π_init = 0.5``; gate weights start as ``nn.Linear``'s).

Deviations from the reference:

- the gate acts on the LayerNorm output that feeds the attention (open_clip blocks are
  pre-LN; the reference's BERT gates its block input, which there is the same tensor);
- only self-attention blocks of the built-in towers are swapped; only the reference's
  ``conditional_per_token`` gate (linear and MLP), not its per-head, unconditional or
  all-features variants, nor attention-probability dropout (open_clip uses none);
- from scratch the gate bias always starts at ``logit(π_init)`` (the reference's BERT MLP
  gate keeps PyTorch's default bias; its linear gate sets it as here);
- for fine-tuning the gate's last layer starts at zero instead of ``N(0, 0.01)`` (see
  :class:`OutlierFreeAttention`);
- ``γ = −α/T`` uses each tower's own ``T`` (image tokens incl. the class token, or the
  text context length), where the reference has one sequence length.
"""

from __future__ import annotations

import copy

from ..errors import UsageError
from ..models.attention import (ATTENTION_PRESETS, OutlierFreeAttention, attention_modules, clipped_softmax,
                                gamma_for_length, swap_attention)

__all__ = ["clipped_softmax", "gamma_for_length", "OutlierFreeAttention", "apply_outlier_free",
           "attention_modules", "ATTENTION_PRESETS"]


def apply_outlier_free(backbone, *, softmax: str = "clipped", gamma: float | None = None, alpha: float = 4.0,
                       zeta: float = 1.0, gate: str | None = None, pi_init: float = 0.5,
                       init_std: float | None = 0.01, towers: str = "both"):
    """A new Backbone whose attention blocks use clipped softmax and/or gated attention.

    Parameters
    ----------
    backbone : Backbone
        Left unchanged (its model is deep-copied).
    softmax : {"clipped", "vanilla"}, default "clipped"
    gamma : float, optional
        Clipped-softmax ``γ``; default ``−alpha / T`` per tower (:func:`gamma_for_length`),
        with ``T`` the number of image tokens (patches + class token) or the context length.
    alpha : float, default 4.0
        The sequence-length rule's ``α`` when ``gamma`` is not given.
    zeta : float, default 1.0
    gate : {None, "linear", "mlp"}
    pi_init, init_std : float
        See :class:`OutlierFreeAttention`: a number is the fine-tuning init (the model
        starts as the original), ``None`` the from-scratch one.
    towers : {"both", "image", "text"}

    Returns
    -------
    Backbone
        Named ``<name>+clipped`` / ``+gated-<kind>``.

    Raises
    ------
    UsageError
        Bad option, or a model without open_clip residual attention blocks.
    """
    if towers not in ("both", "image", "text"):
        raise UsageError(f"towers must be both, image or text, got {towers!r}")
    model = copy.deepcopy(backbone.model)
    spec = {"softmax": softmax, "alpha": alpha, "zeta": zeta, "gate": gate, "pi_init": pi_init,
            "towers": ["image", "text"] if towers == "both" else [towers]}
    if gamma is not None:
        spec["gamma"] = gamma
    try:
        resolved = swap_attention(model, spec, init_std=init_std)
    except UsageError as e:
        raise UsageError(f"{backbone.name}: {e}") from None
    tag = "+".join(t for t in (softmax if softmax != "vanilla" else "", f"gated-{gate}" if gate else "") if t)
    cfg = {**backbone.model_cfg, "cliplab": {**backbone.model_cfg.get("cliplab", {}), "attention": resolved}}
    return backbone.with_model(model, name=f"{backbone.name}+{tag or 'explicit-attention'}", model_cfg=cfg)
