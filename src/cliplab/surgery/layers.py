"""The layers that surgery adapts, shared by LoRA (:mod:`.lora`) and CLIP-SVD (:mod:`.svd`).

Both methods act on the same linear weights of the residual blocks of open_clip's
transformer towers: the fused attention input projection (``attn.in_proj``, the
``in_proj_weight`` of ``nn.MultiheadAttention``), the attention output projection and
both MLP layers.  This module names them (:data:`TARGETS`, :data:`TOWERS`), finds them
(:func:`find_layers`) and counts what an adapted model trains
(:func:`trainable_parameters`).
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from ..errors import UsageError
from ..validation import check_choice

__all__ = ["TARGETS", "TOWERS", "LORA_META_ATTR", "find_layers", "trainable_parameters"]

TARGETS = ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")
TOWERS = ("visual", "text")
LORA_META_ATTR = "_cliplab_lora"
"""Attribute set on a LoRA-adapted model: ``{"rank", "alpha", "targets", "towers"}``."""


def _tower(name: str) -> str:
    return "visual" if name == "visual" or name.startswith("visual.") else "text"


def find_layers(model: nn.Module, targets=TARGETS, towers=TOWERS) -> dict[str, tuple[nn.Module, str]]:
    """Layer key -> (module holding the weight, weight attribute name), in model order.

    Keys are module paths; the fused qkv weight of an attention module ``m`` is
    ``"<m>.in_proj"`` (attribute ``in_proj_weight``).

    Raises
    ------
    UsageError
        ``targets`` or ``towers`` is not a non-empty subset of :data:`TARGETS` /
        :data:`TOWERS`, or a requested tower has no matching layer.
    """
    targets = check_choice("targets", targets, TARGETS, many=True)
    towers = check_choice("towers", towers, TOWERS, many=True)
    found: dict[str, tuple[nn.Module, str]] = {}
    for name, mod in model.named_modules():
        if _tower(name) not in towers or ".parametrizations." in name:
            continue
        last2 = ".".join(name.split(".")[-2:])
        if ("attn.in_proj" in targets and name.endswith("attn")
                and getattr(mod, "in_proj_weight", None) is not None):
            found[f"{name}.in_proj"] = (mod, "in_proj_weight")
        elif last2 in targets and last2 != "attn.in_proj" and isinstance(mod, nn.Linear):
            found[name] = (mod, "weight")
    for tower in towers:
        if not any(_tower(k) == tower for k in found):
            raise UsageError(f"no layers {list(targets)} found in the {tower!r} tower; "
                             "only open_clip transformer towers are supported (drop it from towers=)")
    return found


def trainable_parameters(backbone) -> tuple[int, int]:
    """``(n_trainable, n_total)``: numbers of trainable and of all stored weights.

    ``n_total`` counts every parameter, plus the buffers of weight parametrizations
    (the frozen factors ``U`` and ``Vh`` of CLIP-SVD layers stand in for the weights
    they replace; LoRA's parametrizations hold parameters only).
    """
    model = backbone.model
    params = list(model.parameters())
    n_train = sum(p.numel() for p in params if p.requires_grad)
    n_total = sum(p.numel() for p in params)
    n_total += sum(b.numel() for m in model.modules() if parametrize.is_parametrized(m)
                   for plist in m.parametrizations.values() for p in plist
                   for b in p.buffers(recurse=False))
    return n_train, n_total
