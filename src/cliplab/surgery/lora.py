"""LoRA on open_clip towers, including the fused qkv projection.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022,
arXiv:2106.09685.

Algorithm
---------
A frozen weight W (out, in) gets a trainable low-rank update (eq. 3 of the paper)::

    W' = W + (alpha / r) B A        A: (r, in), B: (out, r)

A is initialised like a Linear layer (Kaiming-uniform), B with zeros, so ``B A = 0``
and the adapted model equals the original at init.  Every other parameter of
the model is frozen.  Defaults: ``rank=4``, ``alpha=8``; targets are the
attention input (qkv) and output projections and both MLP layers of every
residual block of both towers.

Implementation
--------------
* ``mlp.c_fc`` / ``mlp.c_proj`` (``nn.Linear``) become :class:`LoRALinear`,
  ``y = x Wᵀ + b + (alpha/r) (x Aᵀ) Bᵀ`` (W is never materialised with the delta).
* ``nn.MultiheadAttention`` reads ``in_proj_weight`` and ``out_proj.weight``
  directly (it never calls ``out_proj.forward``), so both carry a
  ``torch.nn.utils.parametrize`` parametrization :class:`LoRADelta` that returns
  ``W + (alpha/r) B A``.  The fused qkv weight (3W, W) gets **one** A/B pair over
  the whole fused matrix (A: (r, W), B: (3W, r)), as ``peft`` does for fused
  projections; q, k and v therefore share the rank-r input subspace A.

Adapter tensors are named ``<layer>.lora_A`` / ``<layer>.lora_B`` where
``<layer>`` is the path of the adapted layer in the open_clip model, with the fused
projection spelled ``...attn.in_proj`` (e.g. ``transformer.resblocks.0.attn.in_proj.lora_A``).

Merge and unmerge
-----------------
:func:`merge_lora` returns a new plain model with ``W + ΔW`` folded in; it keeps
a copy of the adapter (A, B, alpha, rank) on the merged model, so
:func:`unmerge_lora` subtracts the same ΔW again and re-attaches the adapter.
The merged weight is ``W + ΔW`` rounded once, so unmerge recovers W to within
one rounding of ``|W| + |ΔW|`` (about 1e-7 relative in fp32), not bit-exactly.

Deviations
----------
No LoRA dropout (the paper's GPT-3 experiments use none either).  A and B have
the dtype of the weight they adapt.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..errors import CheckpointMismatch, UsageError
from ..models.backbone import Backbone
from ..validation import check_choice, check_positive_int
from .layers import LORA_META_ATTR, TARGETS, TOWERS, find_layers

__all__ = ["LoRADelta", "LoRALinear", "apply_lora", "merge_lora", "unmerge_lora",
           "lora_state_dict", "save_lora", "load_lora"]

_MERGED_ATTR = "_cliplab_lora_merged"  # the same plus the adapter tensors, on a merged model
_FORMAT = "cliplab-lora-1"


# --------------------------------------------------------------------------- layers
class LoRADelta(nn.Module):
    """Parametrization ``W -> W + (alpha/r) B A`` of a (out, in) weight."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, *,
                 dtype=None, device=None):
        super().__init__()
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)            # (out, in), eq. 3

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta()


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a LoRA branch; keeps the ``weight``/``bias`` names of the layer."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float) -> "LoRALinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias            # shared: caller copied the model
        new.lora = LoRADelta(linear.out_features, linear.in_features, rank, alpha,
                             dtype=linear.weight.dtype, device=linear.weight.device)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo = self.lora
        return F.linear(x, self.weight, self.bias) + lo.scaling * F.linear(F.linear(x, lo.lora_A), lo.lora_B)

    def to_linear(self, merge: bool = True) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        dtype=self.weight.dtype, device=self.weight.device)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.lora.delta() if merge else self.weight)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


# --------------------------------------------------------------------- finding layers
def _get(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    if key.endswith(".in_proj"):
        return model.get_submodule(key[:-len(".in_proj")]), "in_proj_weight"
    return model.get_submodule(key), "weight"


def _adapters(model: nn.Module) -> dict[str, LoRADelta]:
    """Layer key -> its :class:`LoRADelta`, for a LoRA-adapted model."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            out[name] = mod.lora
        elif parametrize.is_parametrized(mod):
            for tname, plist in mod.parametrizations.items():
                for p in plist:
                    if isinstance(p, LoRADelta):
                        out[f"{name}.in_proj" if tname == "in_proj_weight" else name] = p
    return out


# ------------------------------------------------------------------------ public API
def _attach(model: nn.Module, rank: int, alpha: float, targets, towers) -> None:
    """Freeze ``model`` and add LoRA to its target layers, in place."""
    layers = find_layers(model, targets, towers)
    model.requires_grad_(False)
    for key, (mod, attr) in layers.items():
        if isinstance(mod, nn.Linear) and attr == "weight" and not key.endswith("out_proj"):
            parent_name, _, child = key.rpartition(".")
            setattr(model.get_submodule(parent_name), child, LoRALinear.from_linear(mod, rank, alpha))
        else:  # fused qkv and MHA out_proj: read as tensors by nn.MultiheadAttention
            w = getattr(mod, attr)                                    # (out, in)
            parametrize.register_parametrization(
                mod, attr, LoRADelta(w.shape[0], w.shape[1], rank, alpha, dtype=w.dtype, device=w.device))
            getattr(mod.parametrizations, attr).original.requires_grad_(False)
    setattr(model, LORA_META_ATTR, {"rank": int(rank), "alpha": float(alpha),
                                "targets": list(targets), "towers": list(towers)})


def apply_lora(backbone: Backbone, *, rank: int = 4, alpha: float = 8,
               targets=TARGETS, towers=TOWERS) -> Backbone:
    """Return a new Backbone with LoRA adapters on its towers; ``backbone`` is untouched.

    Parameters
    ----------
    backbone : Backbone
    rank : int, default=4
        r, the rank of each update ``B A``.
    alpha : float, default=8
        Scale numerator; the update is ``(alpha / r) B A``.
    targets : subset of ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")
    towers : subset of ("visual", "text")

    Returns
    -------
    Backbone
        A deep copy whose parameters are all frozen except the LoRA ``lora_A``
        (r, in) and ``lora_B`` (out, r) tensors.  Outputs equal the input's at init.
    """
    check_positive_int("rank", rank)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise UsageError(f"alpha must be a positive number; got {alpha!r}")
    if getattr(backbone.model, LORA_META_ATTR, None) is not None:
        raise UsageError("this backbone already has LoRA adapters; merge_lora it first")
    targets = check_choice("targets", targets, TARGETS, many=True)
    towers = check_choice("towers", towers, TOWERS, many=True)
    model = copy.deepcopy(backbone.model)
    _attach(model, rank, alpha, targets, towers)
    return backbone.with_model(model, name=f"{backbone.name}+lora(r={rank})")


def _meta(model: nn.Module) -> dict:
    meta = getattr(model, LORA_META_ATTR, None)
    if meta is None:
        raise UsageError("this backbone has no LoRA adapters; use apply_lora or load_lora first")
    return meta


def lora_state_dict(backbone: Backbone) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: ``{"<layer>.lora_A": (r, in), "<layer>.lora_B": (out, r)}``."""
    _meta(backbone.model)
    out = {}
    for key, d in _adapters(backbone.model).items():
        out[f"{key}.lora_A"] = d.lora_A.detach().clone()
        out[f"{key}.lora_B"] = d.lora_B.detach().clone()
    return out


def _load_tensors(model: nn.Module, tensors: dict) -> None:
    adapters = _adapters(model)
    expected = {f"{k}.lora_{m}" for k in adapters for m in "AB"}
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise CheckpointMismatch(f"LoRA adapter does not fit this model: {len(missing)} missing "
                                 f"(e.g. {sorted(missing)[:1]}), {len(unexpected)} unexpected "
                                 f"(e.g. {sorted(unexpected)[:1]})")
    with torch.no_grad():
        for key, d in adapters.items():
            for m, p in (("A", d.lora_A), ("B", d.lora_B)):
                t = tensors[f"{key}.lora_{m}"]
                if tuple(t.shape) != tuple(p.shape):
                    raise CheckpointMismatch(f"{key}.lora_{m}: shape {tuple(t.shape)} in the "
                                             f"adapter, {tuple(p.shape)} in the model (check rank)")
                p.copy_(t)


def _strip_parametrizations(mod: nn.Module) -> None:
    """Replace every parametrized tensor of ``mod`` by a plain parameter holding its value.

    ``parametrize.remove_parametrizations`` deletes the property from the module's
    class, which a deep copy shares with the module it was copied from (breaking
    the original); here only this instance's class pointer is changed.
    """
    with torch.no_grad():
        values = {t: getattr(mod, t).detach().clone() for t in mod.parametrizations}
    mod.__class__ = mod.__class__.__bases__[0]   # parametrize injects one subclass per module
    del mod._modules["parametrizations"]
    for t, v in values.items():
        mod.register_parameter(t, nn.Parameter(v))


def merge_lora(backbone: Backbone) -> Backbone:
    """Return a new Backbone with ``W + (alpha/r) B A`` folded into plain weights.

    The result has no LoRA modules and every parameter trainable, like a loaded
    model.  It remembers the adapter so :func:`unmerge_lora` can take it out again.
    """
    meta = _meta(backbone.model)
    record = {**meta, "tensors": lora_state_dict(backbone)}
    model = copy.deepcopy(backbone.model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, mod.to_linear(merge=True))
        elif parametrize.is_parametrized(mod):
            _strip_parametrizations(mod)
    delattr(model, LORA_META_ATTR)
    setattr(model, _MERGED_ATTR, record)
    model.requires_grad_(True)
    return backbone.with_model(model, name=f"{backbone.name}+merged")


def unmerge_lora(backbone: Backbone) -> Backbone:
    """Inverse of :func:`merge_lora`: subtract the remembered update, re-attach the adapter.

    Returns a new LoRA Backbone equal to the one that was merged: same adapter
    tensors, base weights within one float rounding (see the module notes).
    """
    record = getattr(backbone.model, _MERGED_ATTR, None)
    if record is None:
        raise UsageError("this backbone was not made by merge_lora; nothing to unmerge")
    model = copy.deepcopy(backbone.model)
    delattr(model, _MERGED_ATTR)
    scaling = record["alpha"] / record["rank"]
    with torch.no_grad():
        for key in {k.rsplit(".", 1)[0] for k in record["tensors"]}:
            mod, attr = _get(model, key)
            A, B = record["tensors"][f"{key}.lora_A"], record["tensors"][f"{key}.lora_B"]
            getattr(mod, attr).sub_(scaling * (B @ A))                # W = (W + ΔW) - ΔW
    _attach(model, record["rank"], record["alpha"], record["targets"], record["towers"])
    _load_tensors(model, record["tensors"])
    return backbone.with_model(model, name=backbone.name.removesuffix("+merged"))


def save_lora(backbone: Backbone, path: str | Path) -> Path:
    """Write only the adapter (and rank, alpha, targets, towers) to a safetensors file."""
    from safetensors.torch import save_file

    meta = _meta(backbone.model)
    path = Path(path)
    save_file({k: v.contiguous() for k, v in lora_state_dict(backbone).items()}, str(path),
              metadata={"format": _FORMAT, "config": json.dumps(meta)})
    return path


def load_lora(base_backbone: Backbone, path: str | Path, rank: int | None = None,
              alpha: float | None = None) -> Backbone:
    """Apply a saved adapter to ``base_backbone``: a new LoRA Backbone.

    ``rank`` and ``alpha`` default to the values stored in the file; when given
    they must agree with it.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"LoRA adapter file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != _FORMAT:
        raise CheckpointMismatch(f"{path} is not a cliplab LoRA adapter (write it with save_lora)")
    cfg = json.loads(meta["config"])
    for name, given in (("rank", rank), ("alpha", alpha)):
        if given is not None and float(given) != float(cfg[name]):
            raise UsageError(f"{name}={given} does not match the adapter's {name}={cfg[name]}")
    bb = apply_lora(base_backbone, rank=cfg["rank"], alpha=cfg["alpha"],
                    targets=cfg["targets"], towers=cfg["towers"])
    _load_tensors(bb.model, load_file(str(path), device=str(bb.device)))
    return bb
