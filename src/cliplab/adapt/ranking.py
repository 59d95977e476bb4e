"""Ranking-aware adapter: order images by a text instruction ("by how many objects").

"Learning to Rank Pre-trained Vision-Language Models for Downstream Tasks" — the
ranking-aware adapter of Yu et al., ICLR 2025, arXiv:2412.06760; reference code
uynaes/RankingAwareCLIP (``libs/open_clip/src/open_clip/clip_model_adapter.py``
``RankAdapterV2``, ``coca_model_adapter.py`` ``CrossModalQKVFusion``, ``loss.py``
``ClipAdapterLossV2``), commit 05fc5c5.

Algorithm
---------
The image and text towers are frozen.  Inputs: the patch tokens ``V`` (N, T, W) of the
visual tower (:meth:`cliplab.models.Backbone.image_tokens`) and the per-position outputs
``E`` (1, L, W) of the text tower for the instruction
(:meth:`cliplab.models.Backbone.text_tokens`).

1. Text: ``[s_1..s_M; E]`` with M = 32 learnable scalars, each broadcast over the width.
2. Cross-modal fusion, 2 layers of [self-attention on the image tokens, then
   cross-attention: image queries, text keys/values], LayerNorm, projection (W x W).
3. Post-fusion encoder: ``nn.TransformerEncoder`` (2 layers, 8 heads, FFN W, dropout 0.1).
4. Regression head: LayerNorm, sum over tokens, MLP (Linear-LN-ReLU x 2, Linear) -> score
   ``ŷ_i`` (N,).
5. Ranking-aware attention: 16 learnable queries ``Q``; for every ordered pair (i, j) of the
   batch, keys/values ``K = LN(kv_proj(X))`` of both images, one softmax over the 2T tokens:
   ``a = softmax(Q [K_i; K_j]ᵀ / √d_h)``, ``h_ij = a_i K_i − a_j K_j`` (values are the keys,
   as in the reference), ``out_proj``, sum over the queries, MLP (LN, 3 x [Linear-LN-ReLU],
   Linear) -> pair logit ``o_ij`` (N, N).
6. Loss: ``BCE(o_ij, 1[y_i > y_j])`` over all N² ordered pairs
   ``+ 0.2 · log(1 + SmoothL1(ŷ, y))``; AdamW, weight decay 0.01.

Ranking: sort by ``ŷ`` (the pair head only trains the shared layers).

The pair attention is computed without the (N², 2T, d) concatenation: with
``Z_i = Σ_t exp(q·k_it)`` and ``U_i = Σ_t exp(q·k_it) k_it`` (per head and query, with a
max shift), ``h_ij = (U_i − U_j) / (Z_i + Z_j)`` — the same numbers, O(N T) attention
work instead of O(N² T).  So ``h_ii = 0`` (``o_ii`` is one constant) and ``h_ji = −h_ij``.

Deviations from the reference
-----------------------------
- Targets are standardised (zero mean, unit variance on the training set) before the
  regression loss; :meth:`RankingAdapter.predict` maps the scores back to target units.
  The reference regresses raw values (counts); sizes in pixels would saturate the log.
- Few-shot defaults: lr 1e-3 with a linear warm-up and cosine decay, 30 epochs,
  mini-batches of 16 (the reference: lr 5e-5, batches of 64 drawn from one category with
  20 % negatives of other categories, target 0).  Here one prompt, so no negatives.
- The fusion's output projection is initialised N(0, W^-1); the reference leaves it
  ``torch.empty`` (its ``init_parameters`` is never called).
- When the text tower is narrower or wider than the visual tower, a linear map brings the
  text tokens to the visual width (the reference's backbone has one width).
- ``heads`` sets the heads of the fusion, the post-fusion encoder and the pair attention
  alike; the reference fixes the fusion and the pair attention at 8 (its default here).
- No image augmentation (the reference flips horizontally).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ..errors import DataError, UsageError
from ..validation import check_number, check_positive_int

logger = logging.getLogger(__name__)

__all__ = ["RankingAdapter", "RankAdapterNet", "CrossModalFusion", "RankAwareAttention", "pair_labels",
           "ranking_loss", "save_ranker", "load_ranker"]

META_METHOD = "ranking"


# ---------------------------------------------------------------- pure functions
def pair_labels(targets: torch.Tensor) -> torch.Tensor:
    """``1[y_i > y_j]`` for every ordered pair: float (N, N); row i, column j."""
    y = targets.reshape(-1)
    return (y[:, None] > y[None, :]).to(torch.float32)


def ranking_loss(scores: torch.Tensor, pair_logits: torch.Tensor, targets: torch.Tensor, *,
                 reg_weight: float = 0.2) -> dict:
    """The dual loss of the ranking-aware adapter (the reference's components ``regression rank``).

    Parameters
    ----------
    scores : Tensor (N,)
        Regression head ``ŷ``.
    pair_logits : Tensor (N, N)
        ``o_ij``: logit that image i has more of the attribute than image j.
    targets : Tensor (N,)
    reg_weight : float, default 0.2

    Returns
    -------
    dict
        ``{"rank": BCE(o_ij, 1[y_i > y_j]) over the N² pairs,
        "regression": reg_weight · log(1 + SmoothL1(ŷ, y))}``.
    """
    rank = F.binary_cross_entropy_with_logits(pair_logits.reshape(-1), pair_labels(targets).reshape(-1))
    reg = torch.log(F.smooth_l1_loss(scores.reshape(-1), targets.reshape(-1)) + 1.0)
    return {"rank": rank, "regression": reg_weight * reg}


# ------------------------------------------------------------------------ blocks
class CrossModalFusion(nn.Module):
    """Step 2: ``layers`` x [self-attention on image tokens, cross-attention to text], LN, projection.

    Blocks are open_clip's ``ResidualAttentionBlock`` (pre-LN; the cross-attention block
    normalises keys/values with ``ln_1_kv``); parameter names as the reference's
    ``CrossModalQKVFusion``.
    """

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        from open_clip.transformer import ResidualAttentionBlock

        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])
        self.cross_attn = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio, is_cross_attention=True)
                                         for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        self.projection = nn.Parameter(torch.randn(width, width) * width ** -0.5)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = image                                                 # (N, T, W)
        for self_block, cross_block in zip(self.resblocks, self.cross_attn):
            x = self_block(x)
            x = cross_block(x, k_x=text, v_x=text)                # queries: image; keys/values: text
        return self.ln_final(x) @ self.projection                 # (N, T, W)


def _mlp_head(width: int, n_hidden: int, norm_first: bool) -> nn.Sequential:
    """``[LN,] n_hidden x [Linear, LN, ReLU]`` (xavier-normal weights), as the reference's heads."""
    layers: list[nn.Module] = [nn.LayerNorm(width)] if norm_first else []
    for _ in range(n_hidden):
        lin = nn.Linear(width, width)
        nn.init.xavier_normal_(lin.weight)
        layers += [lin, nn.LayerNorm(width), nn.ReLU()]
    return nn.Sequential(*layers)


class ScoreHead(nn.Module):
    """MLP to one logit: ``pre_linear_block`` then ``output_head`` (reference ``MLPLayer`` /
    ``PairwiseDiffBlockV2``)."""

    def __init__(self, width: int, n_hidden: int, norm_first: bool):
        super().__init__()
        self.pre_linear_block = _mlp_head(width, n_hidden, norm_first)
        self.output_head = nn.Linear(width, 1)
        nn.init.xavier_normal_(self.output_head.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_head(self.pre_linear_block(x)).squeeze(-1)


class RankAwareAttention(nn.Module):
    """Step 5: learnable queries attend over the tokens of both images of each ordered pair.

    ``forward(q, x) -> (N, N, Q, W)``: entry ``[i, j]`` is ``out_proj(a_i K_i − a_j K_j)``
    with one softmax over the 2T keys of images i and j (reference
    ``MultiHeadRankawareAttentionV2``).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise UsageError(f"the width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.ln_q = nn.LayerNorm(width)
        self.ln_kv = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, width)
        self.kv_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def pair_values(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``h_ij = a_i K_i − a_j K_j`` before ``out_proj``: (N, N, Q, W)."""
        N, T, W = x.shape
        H, d = self.heads, W // self.heads
        qh = self.ln_q(self.q_proj(q)).view(-1, H, d).transpose(0, 1)            # (H, Q, d)
        kv = self.ln_kv(self.kv_proj(x)).view(N, T, H, d).transpose(1, 2)         # (N, H, T, d)
        s = torch.einsum("hqd,nhtd->nhqt", qh, kv) * d ** -0.5                   # (N, H, Q, T)
        m = s.amax(dim=-1)                                                        # (N, H, Q)
        e = torch.exp(s - m[..., None])
        z = e.sum(dim=-1)                                                         # (N, H, Q) Z_i / e^m_i
        u = torch.einsum("nhqt,nhtd->nhqd", e, kv)                               # (N, H, Q, d) U_i / e^m_i
        mm = torch.maximum(m[:, None], m[None, :])                                # (N, N, H, Q) shared shift
        wi, wj = torch.exp(m[:, None] - mm), torch.exp(m[None, :] - mm)           # (N, N, H, Q)
        den = (wi * z[:, None] + wj * z[None, :])[..., None]                     # Z_i + Z_j
        h = (wi[..., None] * u[:, None] - wj[..., None] * u[None, :]) / den      # (U_i − U_j) / (Z_i + Z_j)
        return h.permute(0, 1, 3, 2, 4).reshape(N, N, -1, W)                      # (N, N, Q, W)

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.pair_values(q, x))                             # (N, N, Q, W)


class RankAdapterNet(nn.Module):
    """The trainable part: learnable text tokens, fusion, post-fusion encoder and both heads.

    ``forward(image_tokens (N, T, W), text_tokens (1 or N, L, W_t)) -> (scores (N,),
    pair_logits (N, N) or None)``.  Parameter names follow the reference's ``RankAdapterV2``
    so its state dict loads as is.
    """

    def __init__(self, width: int, text_width: int | None = None, *, n_text_tokens: int = 32,
                 layers: int = 2, heads: int = 8, n_queries: int = 16, dropout: float = 0.1):
        super().__init__()
        if width % heads:
            raise UsageError(f"the width {width} is not divisible by {heads} heads; pick another heads=")
        text_width = width if text_width is None else text_width
        self.learnable_text_tokens = (nn.Parameter(n_text_tokens ** -0.5 * torch.randn(1, n_text_tokens))
                                      if n_text_tokens else None)
        self.text_proj = nn.Identity() if text_width == width else nn.Linear(text_width, width)
        self.crossmodal_block = CrossModalFusion(width, layers, heads)
        layer = nn.TransformerEncoderLayer(d_model=width, nhead=heads, dim_feedforward=width, dropout=dropout,
                                           batch_first=True)
        self.post_fuse_block = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.reg_tokens = nn.Parameter(width ** -0.5 * torch.randn(n_queries, width))
        self.reg_token_pooler = RankAwareAttention(width, heads)
        self.pair_regressor = ScoreHead(width, 3, norm_first=True)
        self.reg_ln = nn.LayerNorm(width)
        self.regressor = ScoreHead(width, 2, norm_first=False)

    def fuse(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Steps 1-3: fused tokens (N, T, W)."""
        N = image.shape[0]
        text = text.expand(N, -1, -1)                                             # (N, L, W_t)
        if self.learnable_text_tokens is not None:
            s = self.learnable_text_tokens.view(1, -1, 1).expand(N, -1, text.shape[-1])   # (N, M, W_t)
            text = torch.cat([s, text], dim=1)                                    # (N, M + L, W_t)
        x = self.crossmodal_block(image, self.text_proj(text))
        return self.post_fuse_block(x)                                            # (N, T, W)

    def forward(self, image: torch.Tensor, text: torch.Tensor, pairs: bool = True):
        x = self.fuse(image, text)
        scores = self.regressor(self.reg_ln(x).sum(dim=1))                       # (N,) step 4
        if not pairs:
            return scores, None
        h = self.reg_token_pooler(self.reg_tokens, x).sum(dim=2)                 # (N, N, W) step 5
        return scores, self.pair_regressor(h)                                     # (N, N)


# --------------------------------------------------------------------- estimator
class RankingAdapter(RegressorMixin, BaseEstimator):
    """Text-driven image ordering learned from a few examples, towers frozen.

    Parameters
    ----------
    backbone : Backbone
        A model with a ViT image tower and open_clip's built-in text tower.  Not saved with
        the adapter (:func:`load_ranker` gives it back).
    n_text_tokens : int, default 32
        Learnable text tokens before the instruction.
    layers : int, default 2
        Fusion layers and post-fusion encoder layers.
    heads : int, default 8
    n_queries : int, default 16
        Learnable queries of the pair attention.
    reg_weight : float, default 0.2
        Weight of ``log(1 + SmoothL1)``.
    epochs : int, default 30
    batch_size : int, default 16
        Images per step; the rank loss sees all ``batch_size²`` ordered pairs.
    lr : float, default 1e-3
    warmup_epochs : int, default 2
    weight_decay : float, default 0.01
    dropout : float, default 0.1
        Of the post-fusion encoder.
    grad_clip : float or None, default 1.0
    random_state : int, default 0
        Seeds the initialisation and the mini-batch order.
    progress : bool, optional

    Attributes
    ----------
    prompt_ : str
    text_tokens_ : ndarray (1, L, W_t)
        Text-tower outputs of the prompt (frozen tower: computed once).
    state_ : dict of str -> ndarray
        The trained weights (:class:`RankAdapterNet` state dict).
    width_, text_width_ : int
    target_mean_, target_scale_ : float
        Standardisation of the targets.
    n_trainable_ : int
    history_ : list of dict
        Mean loss terms per epoch.
    fit_time_ : float

    Examples
    --------
    >>> ranker = RankingAdapter(backbone=bb)                                  # doctest: +SKIP
    >>> ranker.fit(images, counts, prompt="Rank by the number of shapes.")   # doctest: +SKIP
    >>> ranker.rank(test_images)[:3]     # the three images with the most objects  # doctest: +SKIP
    """

    def __init__(self, backbone=None, *, n_text_tokens: int = 32, layers: int = 2, heads: int = 8,
                 n_queries: int = 16, reg_weight: float = 0.2, epochs: int = 30, batch_size: int = 16,
                 lr: float = 1e-3, warmup_epochs: int = 2, weight_decay: float = 0.01, dropout: float = 0.1,
                 grad_clip: float | None = 1.0, random_state: int = 0, progress: bool | None = None):
        self.backbone = backbone
        self.n_text_tokens = n_text_tokens
        self.layers = layers
        self.heads = heads
        self.n_queries = n_queries
        self.reg_weight = reg_weight
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.warmup_epochs = warmup_epochs
        self.weight_decay = weight_decay
        self.dropout = dropout
        self.grad_clip = grad_clip
        self.random_state = random_state
        self.progress = progress

    # ---------------------------------------------------------------- inputs
    def _need_backbone(self):
        if self.backbone is None:
            raise UsageError("RankingAdapter needs backbone= (the model whose image and text tokens it reads)")
        return self.backbone

    def _image_tokens(self, images) -> torch.Tensor:
        images = list(images) if not isinstance(images, np.ndarray) or images.ndim == 4 else [images]
        if len(images) == 0:
            raise UsageError("no images to rank")
        tok = self._need_backbone().image_tokens(images, progress=False)          # (N, T, W)
        return torch.from_numpy(np.ascontiguousarray(tok))

    def _net(self) -> RankAdapterNet:
        return RankAdapterNet(self.width_, self.text_width_, n_text_tokens=int(self.n_text_tokens),
                              layers=int(self.layers), heads=int(self.heads), n_queries=int(self.n_queries),
                              dropout=float(self.dropout))

    # ------------------------------------------------------------------- fit
    def fit(self, images, targets, prompt: str = "Rank the images by the number of objects."):
        """Train on ``images`` (paths, PIL images or uint8 arrays) and their ordinal ``targets`` (N,).

        ``prompt`` is the instruction the text tower reads.  Raises ``UsageError`` for fewer
        than two images, a length mismatch, non-finite or constant targets.
        """
        from ..train.schedule import warmup_cosine_factor
        from ._trainable import count_trainable, frozen, supervised_loop

        bb = self._need_backbone()
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("layers", self.layers)
        check_positive_int("heads", self.heads)
        check_positive_int("n_queries", self.n_queries)
        check_positive_int("n_text_tokens", self.n_text_tokens, minimum=0)
        check_number("lr", self.lr, minimum=0, strict_minimum=True)
        check_number("reg_weight", self.reg_weight, minimum=0)
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError("prompt must be a non-empty instruction, e.g. 'Rank the images by size.'")
        y = np.asarray(targets, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(y)):
            raise UsageError("targets must be finite numbers")
        X = self._image_tokens(images)                                           # (N, T, W)
        if len(y) != len(X):
            raise UsageError(f"{len(X)} images but {len(y)} targets")
        if len(y) < 2 or np.ptp(y) == 0:
            raise UsageError("a ranking needs at least two images with different targets")
        self.prompt_ = prompt
        self.text_tokens_ = bb.text_tokens([prompt])                              # (1, L, W_t)
        self.width_, self.text_width_ = int(X.shape[-1]), int(self.text_tokens_.shape[-1])
        self.target_mean_, self.target_scale_ = float(y.mean()), float(y.std())
        yt = torch.from_numpy(((y - self.target_mean_) / self.target_scale_).astype(np.float32))   # (N,)
        text = torch.from_numpy(self.text_tokens_)
        torch.manual_seed(int(self.random_state))
        net = self._net().train()
        self.n_trainable_ = count_trainable(net)
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=float(self.lr), weight_decay=float(self.weight_decay))
        per_epoch = -(-len(X) // int(self.batch_size))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: warmup_cosine_factor(
            t, warmup_steps=per_epoch * int(self.warmup_epochs), total_steps=per_epoch * int(self.epochs)))

        def batch_loss(idx):
            scores, pairs = net(X[idx], text)
            return ranking_loss(scores, pairs, yt[idx], reg_weight=float(self.reg_weight))

        tic = time.perf_counter()
        with frozen(bb.model):
            self.history_ = supervised_loop(params, batch_loss, len(X), epochs=int(self.epochs),
                                            batch_size=int(self.batch_size), optimizer=opt, scheduler=sched,
                                            generator=torch.Generator().manual_seed(int(self.random_state)),
                                            grad_clip=self.grad_clip, progress=self.progress,
                                            desc="RankingAdapter")
        self.fit_time_ = time.perf_counter() - tic
        self.state_ = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
        self._module = net.eval()
        logger.info("RankingAdapter: %d images, %d trainable parameters, %.1f s", len(X), self.n_trainable_,
                    self.fit_time_)
        return self

    # --------------------------------------------------------------- predict
    def module(self) -> RankAdapterNet:
        """The trained network (eval mode), built from ``state_`` on first use."""
        check_is_fitted(self, "state_")
        net = getattr(self, "_module", None)
        if net is None:
            net = self._net()
            net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in self.state_.items()})
            self._module = net.eval()
        return net

    def predict(self, images, batch_size: int = 64) -> np.ndarray:
        """Scores (N,) in target units; higher means more of the attribute."""
        net = self.module()
        X = self._image_tokens(images)
        text = torch.from_numpy(np.asarray(self.text_tokens_, dtype=np.float32))
        out = []
        with torch.no_grad():
            for s in range(0, len(X), int(batch_size)):
                out.append(net(X[s:s + int(batch_size)], text, pairs=False)[0])
        z = torch.cat(out).numpy().astype(np.float64)
        return z * self.target_scale_ + self.target_mean_

    def pair_proba(self, images) -> np.ndarray:
        """``sigmoid(o_ij)`` (N, N): probability that image i has more than image j (pair head)."""
        net = self.module()
        X = self._image_tokens(images)
        with torch.no_grad():
            _, o = net(X, torch.from_numpy(np.asarray(self.text_tokens_, dtype=np.float32)))
        return torch.sigmoid(o).numpy()

    def rank(self, images) -> np.ndarray:
        """Indices of ``images`` from the highest score to the lowest (ties keep input order)."""
        return np.argsort(-self.predict(images), kind="stable")

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_module", None)
        return state


# ----------------------------------------------------------------- save / load
def save_ranker(est: RankingAdapter, out, **meta) -> Path:
    """Write a fitted :class:`RankingAdapter` and its metadata (model fingerprint, data) to ``out``."""
    from .fewshot import save_fitted

    check_is_fitted(est, "state_")
    bb = est._need_backbone()
    info = {"method": META_METHOD, "prompt": est.prompt_, "fingerprint": bb.fingerprint, **meta}
    return save_fitted(est, info, out)


def load_ranker(path, backbone) -> RankingAdapter:
    """The :class:`RankingAdapter` saved in ``path``, refusing one fit on another model.

    Raises
    ------
    DataError
        Not a ranking-adapter folder.
    UsageError
        The adapter was fit on another model.
    """
    from . import load_adapter
    from .fewshot import read_meta

    meta = read_meta(path, backbone)
    if meta.get("method") != META_METHOD:
        raise DataError(f"{path}: a {meta.get('method') or 'classification'} adapter, not a ranking adapter "
                        "(make one with 'cliplab rank --fit')")
    est = load_adapter(path)
    if not isinstance(est, RankingAdapter):
        raise DataError(f"{path}: the saved estimator is {type(est).__name__}, not a RankingAdapter")
    est.backbone = backbone
    return est

