"""Knowledge-preserved stretching of the text positional embedding (Long-CLIP).

Long-CLIP: Unlocking the Long-Text Capability of CLIP (Zhang et al., ECCV 2024,
arXiv:2403.15378).  Reference code: ``beichenzbc/Long-CLIP``, ``model/longclip.py``
(``load_from_clip``) and ``model/model_longclip.py`` (``CLIP.encode_text``).

Algorithm
---------
CLIP's text tower learns its first positions well and the later ones poorly (most
captions are short).  Long-CLIP keeps the first ``keep`` rows of the positional table
``P`` (L x W) unchanged and stretches the rest by linear interpolation, so the new
table ``P'`` (L' x W) has ``L' = keep + ratio (L - keep)`` rows; with CLIP's L = 77,
keep = 20 and ratio = 4 it has 248.  Row ``j`` of ``P'`` reads ``P`` at the fractional
position ``s = keep + (j - keep) / ratio``:

    P'[j] = P[j]                                     j < keep                   (1)
    P'[j] = (1 - w) P[i] + w P[i + 1]                i = floor(s) <= L - 2       (2)
    P'[j] = P[L-1] + (s - (L - 1)) (P[L-1] - P[L-2]) s > L - 1 (past the end)   (3)

with ``w = s - i``.  The reference writes (2) for ratio 4 as ``3 P[i]/4 + P[i+1]/4``
and so on, and (3) for the last ``ratio`` rows: the same numbers, bit for bit (the
weights r/4 are exact in binary).  Training then freezes rows < keep (the
reference's frozen ``positional_embedding`` beside a trainable
``positional_embedding_res`` for the rest; :class:`cliplab.surgery.longclip.LongCLIPLoss`).

Because the text tower is causal and pools the end-of-text token, a caption whose
end-of-text token sits before position ``keep`` never sees a changed row: its
features are exactly those of the original model.

Deviations
----------
- Any new length ``L' > L`` is accepted (``ratio = (L' - keep) / (L - keep)``); the
  reference fixes ratio 4.  The default is the reference's ``keep + 4 (L - keep)``.
- One table ``P'`` is stored (a plain open_clip model, loadable anywhere) instead of
  the reference's two masked tables; the objective freezes the kept rows instead.

The result is a new :class:`~cliplab.models.backbone.Backbone` whose model config,
causal mask and tokenizer have the new context length; ``Backbone.save`` and
``cliplab.load`` round-trip it.  The input Backbone is not changed.
"""

from __future__ import annotations

import copy
import logging

import torch

from ..errors import UsageError
from ..models.backbone import Backbone
from ..validation import check_backbone

logger = logging.getLogger(__name__)

__all__ = ["KEEP", "RATIO", "stretch_position_table", "stretch_positions", "stretched_length"]

KEEP = 20
"""Rows of the positional table Long-CLIP keeps unchanged (the reference's ``keep_len``)."""

RATIO = 4
"""The reference's stretching factor of the remaining rows (77 -> 248 positions)."""


def stretched_length(length: int, keep: int = KEEP, ratio: int = RATIO) -> int:
    """``keep + ratio (length - keep)``: the reference's new context (248 for 77, 68 for 32)."""
    return keep + ratio * (length - keep)


def stretch_position_table(table: torch.Tensor, new_length: int, keep: int = KEEP) -> torch.Tensor:
    """Keep the first ``keep`` rows of ``table`` and interpolate the rest to ``new_length`` rows.

    Parameters
    ----------
    table : torch.Tensor of shape (L, W)
        A positional embedding, L >= 2.
    new_length : int
        L' > L.
    keep : int, default 20
        0 <= keep < L - 1.

    Returns
    -------
    torch.Tensor of shape (L', W)
        Eqs. (1)-(3) of the module docstring, computed in ``table``'s dtype.

    Raises
    ------
    UsageError
        ``new_length <= L`` or ``keep`` out of range.
    """
    length, _ = table.shape
    if not 0 <= keep < length - 1:
        raise UsageError(f"keep must be in [0, {length - 2}] for a context of {length}, got {keep}")
    if new_length <= length:
        raise UsageError(f"the new context length must exceed the current {length}, got {new_length}")
    p = table.detach()
    out = torch.empty(new_length, p.shape[1], dtype=p.dtype, device=p.device)   # (L', W)
    out[:keep] = p[:keep]                                                       # eq. (1)
    ratio = (new_length - keep) / (length - keep)
    for j in range(keep, new_length):
        s = keep + (j - keep) / ratio
        i = int(s)
        if i <= length - 2:
            w = s - i
            out[j] = (1 - w) * p[i] + w * p[i + 1]                              # eq. (2)
        else:
            out[j] = p[length - 1] + (s - (length - 1)) * (p[length - 1] - p[length - 2])  # eq. (3)
    return out


def stretch_positions(backbone: Backbone, new_context: int | None = None, *, keep: int = KEEP) -> Backbone:
    """A copy of ``backbone`` whose text tower reads ``new_context`` tokens (Long-CLIP stretching).

    Parameters
    ----------
    backbone : Backbone
        With open_clip's built-in text transformer (``positional_embedding``, causal
        ``attn_mask``) and a BPE tokenizer.
    new_context : int, optional
        The new context length; default ``keep + 4 (L - keep)`` (77 -> 248, the
        reference's; 32 -> 68 for shapes-tiny).
    keep : int, default 20
        Leading positions kept bit-identical.

    Returns
    -------
    Backbone
        A new Backbone: positional table of eqs. (1)-(3), causal mask, ``context_length``
        of the model, ``text_cfg.context_length`` of the config and the tokenizer all at
        ``new_context``.  ``backbone`` is unchanged.

    Raises
    ------
    UsageError
        A text tower without a positional table and causal mask, a tokenizer without a
        context length, or bad ``keep`` / ``new_context``.

    Examples
    --------
    >>> import cliplab                                           # doctest: +SKIP
    >>> from cliplab.surgery import stretch_positions            # doctest: +SKIP
    >>> long = stretch_positions(cliplab.load("shapes-tiny"))     # doctest: +SKIP
    >>> long.context_length                                       # doctest: +SKIP
    68
    """
    from ..models.loading import make_tokenizer

    check_backbone("backbone", backbone)
    model = backbone.model
    pos = getattr(model, "positional_embedding", None)
    if not isinstance(pos, torch.Tensor) or getattr(model, "attn_mask", None) is None:
        raise UsageError(f"{backbone.name}: position stretching needs open_clip's built-in causal text tower")
    if not hasattr(backbone.tokenizer, "context_length") or "hf_tokenizer_name" in backbone.model_cfg["text_cfg"]:
        raise UsageError(f"{backbone.name}: position stretching needs CLIP's BPE tokenizer")
    length = pos.shape[0]
    new_context = stretched_length(length, keep) if new_context is None else int(new_context)
    table = stretch_position_table(pos, new_context, keep)                      # (L', W)

    new = copy.deepcopy(model)
    new.positional_embedding = torch.nn.Parameter(table, requires_grad=pos.requires_grad)
    new.context_length = new_context
    mask = torch.full((new_context, new_context), float("-inf"), device=model.attn_mask.device)
    new.attn_mask = mask.triu_(1).to(model.attn_mask.dtype)                     # (L', L') causal, as open_clip's
    cfg = copy.deepcopy(backbone.model_cfg)
    cfg["text_cfg"]["context_length"] = new_context
    out = Backbone(new, model_cfg=cfg, preprocess_cfg=backbone.preprocess_cfg, tokenizer=make_tokenizer(cfg),
                   name=f"{backbone.name}+long({new_context}, keep={keep})", device=str(backbone.device),
                   precision=backbone.precision)
    logger.info("stretched the text positions of %s from %d to %d (first %d kept)", backbone.name, length,
                new_context, keep)
    return out
