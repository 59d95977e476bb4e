"""CLIP-SVD: train only the singular values of every linear layer of both towers.

"Singular Value Few-shot Adaptation of Vision-Language Models", arXiv:2509.03740;
reference code HealthX-Lab/CLIP-SVD (``svf_utils/svf_torch.py`` SVD_Linear).

Algorithm
---------
1. Every linear layer of both towers — the attention q, k, v and output
   projections and the MLP ``c_fc``/``c_proj`` — is factorised at full rank,
   ``W = U diag(s) Vᵀ`` (thin SVD, k = min(out, in) singular values).
2. The layer computes ``y = x (U diag(s) Vᵀ)ᵀ + b`` with U, V and b frozen.
   Since the factorisation is exact, the model is unchanged at init (up to
   float rounding; tested to 1e-5 on features in fp32).
3. Only s is trained (the reference's AdamW lr 5e-4, wd 0.01, cosine schedule,
   200·K iterations for K shots belong to the training recipe, not here).

The fused qkv weight of ``nn.MultiheadAttention`` (3W, W) is split into its
q, k and v blocks (W, W), each factorised on its own, as the reference does by
replacing the attention with separate q/k/v Linears; so it carries 3W singular
values.  Per residual block of width W with MLP width 4W that is 6W trainable
values (ViT-B/16 + text: 92,160 in all).

Deviations
----------
* open_clip's attention module is kept; instead ``in_proj_weight``,
  ``out_proj.weight``, ``c_fc.weight`` and ``c_proj.weight`` are
  re-parametrised (``torch.nn.utils.parametrize``) to ``U diag(s) Vᵀ``.  The
  weight is rebuilt once per forward rather than applied as ``U(s ⊙ Vᵀx)``;
  the result is the same function.
* Checked against HealthX-Lab/CLIP-SVD@022b1eda ``svf_utils/svf_torch.py`` (``resolver``
  and ``SVD_Linear`` run unmodified, in float64: its ``vector_S`` is float64): a Linear
  with bias and a fused qkv weight split in 3 blocks give the reference's outputs at init
  and after adding the same deltas to the singular values: MATCH, max diff 3e-15.
  The reference's ``resolver`` replaces only ``nn.Linear`` modules (open_clip's fused
  attention needs its separate-q/k/v attention class first); cliplab reparametrises the
  fused weights in place to the same function.
* The SVD is computed in float64 and U, s, V are stored in the weight's dtype;
  in fp16/bf16 the reconstruction is only as exact as that dtype (the reference
  keeps fp32 weights and uses autocast; do the same).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import UsageError
from ..models.backbone import Backbone
from .layers import LORA_META_ATTR, TARGETS, TOWERS, find_layers

__all__ = ["SVDWeight", "apply_svd"]


class SVDWeight(nn.Module):
    """Parametrization ``s -> U diag(s) Vᵀ`` for a weight made of ``blocks`` stacked row blocks.

    Registered on a weight W (blocks·m, n), it stores frozen buffers U (blocks, m, k)
    and Vh (blocks, k, n), k = min(m, n), and turns the parameter into the
    singular values s (blocks, k), the only trainable tensor.
    """

    def __init__(self, weight: torch.Tensor, blocks: int = 1):
        super().__init__()
        out, n = weight.shape
        if out % blocks:
            raise UsageError(f"a ({out}, {n}) weight does not split into {blocks} row blocks")
        self.blocks = blocks
        W = weight.detach().double().reshape(blocks, out // blocks, n)  # (blocks, m, n)
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)           # (blocks, m, k), (blocks, k), (blocks, k, n)
        self.register_buffer("U", U.to(weight.dtype))
        self.register_buffer("Vh", Vh.to(weight.dtype))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        W = (self.U * s[:, None, :]) @ self.Vh                       # (blocks, m, n): U diag(s) Vᵀ
        return W.reshape(-1, W.shape[-1])                            # (blocks·m, n)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """s_i = u_iᵀ W v_i: exact for the W factorised in ``__init__``, a projection otherwise."""
        W = weight.detach().double().reshape(self.blocks, -1, weight.shape[-1])  # (blocks, m, n)
        s = torch.einsum("bmk,bmn,bkn->bk", self.U.double(), W, self.Vh.double())
        return s.to(weight.dtype)                                    # (blocks, k)


def apply_svd(backbone: Backbone, *, towers=TOWERS) -> Backbone:
    """Return a new Backbone whose tower linear layers train only their singular values.

    Parameters
    ----------
    backbone : Backbone
        Left untouched.
    towers : subset of ("visual", "text"), default both

    Returns
    -------
    Backbone
        A deep copy in which every parameter is frozen except the singular
        values ``...parametrizations.<weight>.original`` of shape (blocks, k).
    """
    if getattr(backbone.model, LORA_META_ATTR, None) is not None:
        raise UsageError("this backbone has LoRA adapters; merge_lora it before apply_svd")
    model = copy.deepcopy(backbone.model)
    layers = find_layers(model, TARGETS, towers)
    model.requires_grad_(False)
    for key, (mod, attr) in layers.items():
        weight = getattr(mod, attr)
        if weight.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise UsageError(f"{key}: cannot factorise a {weight.dtype} weight")
        blocks = 3 if attr == "in_proj_weight" else 1                # q, k, v
        parametrize.register_parametrization(mod, attr, SVDWeight(weight, blocks))
        getattr(mod.parametrizations, attr).original.requires_grad_(True)
    return backbone.with_model(model, name=f"{backbone.name}+svd")
