"""LightCLIP: softened instance labels, patch-word alignment and image-conditioned MLM.

LightCLIP: Learning Multi-Level Interaction for Lightweight Vision-Language Models
(Nie et al., arXiv:2312.00674, 2023).  No reference code was published; only the
paper's abstract was available to us, so the three parts follow its description and
every detail it does not fix is a choice listed under "Deviations" below.

With L2-normalised image features x_i and text features y_j (N pairs), temperature
t = exp(logit_scale), logits ``z_ij = t x_i.y_j``, training step s of S, and per pair
the unit-length patch tokens v_ip (p = 1..P, the vision tower's patch outputs mapped
by its output projection) and word tokens w_jk (k in K_j, the caption's word
positions, mapped by the text projection), numbered here as in the code below:

    (W)   alpha_s = alpha_max * s / S                  the softening grows linearly from 0
    (Q)   q_ij = softmax_{j' != i}(z_ij'.detach()) for j != i, q_ii = 0
          the negatives' share of the label, by similarity
    (Y)   Y = (1 - alpha_s) I + alpha_s Q              progressively softened labels
    (I)   L_ins = [ CE(z, Y) + CE(z^T, Y') ] / 2       Y' from z^T likewise; CE with soft targets
    (M)   m_ij = 1/|K_j| sum_{k in K_j} max_p v_ip.w_jk
          relaxed bipartite matching: every word takes its best patch (patches may be shared)
    (T)   L_tok = [ CE(t m, I) + CE(t m^T, I) ] / 2    InfoNCE on the token-level scores
    (F)   h = TextTower_fused(caption with 15 % of its words replaced by a learned [MASK]);
          after chosen blocks of the text tower, a cross-attention block lets the text
          stream attend to the (unmasked) image's patch tokens
    (P)   L_mlm = mean over masked positions of CE(head(h_k), token_k); the head's decoder
          is tied to the token embedding
    (L)   L = L_ins + lambda_tok L_tok + lambda_mlm L_mlm

Defaults: ``alpha_max = 0.2``, ``token_weight = 1``, ``mlm_weight = 1``,
``mask_prob = 0.15``, fusion after the last block of each third of the text tower
(blocks 1, 2, 3 of a 3-layer tower; 4, 8, 12 of a 12-layer one), fusion heads as the
text tower's, the learnable CLIP temperature starting at 1/0.07.  The fusion blocks,
the [MASK] embedding and the MLM head belong to the objective (built by
:meth:`LightCLIPLoss.setup` for the model's widths), are trained with the model, live
in the checkpoint's ``trainer_state.pt`` and are dropped at inference: the saved
model is a plain open_clip CLIP.

Deviations (no reference code; the abstract does not fix these):

- the soft labels (Q) spread alpha_s over the negatives by the model's own detached
  similarities; a softmax over *all* columns (positive included) would make the
  soft term's gradient vanish (the target would equal the prediction);
  ``soft_labels="uniform"`` spreads it evenly (label smoothing over negatives);
- the schedule (W) is linear over the run's optimizer steps; the paper's schedule,
  alpha_max and the loss weights were not available to us (our values above);
- the token score (M) uses one direction (word -> patch), as the brief's relaxation;
  word positions are those between the start and end tokens (punctuation included);
- MLM replaces every chosen word with the [MASK] embedding (no 80/10/10), and the
  text tower stays causal, so a masked word is predicted from the words before it
  and from the image; the fusion blocks are pre-LN cross-attention + MLP blocks of
  our design, not the paper's module;
- which words are masked is a function of (``seed``, step, position in the global
  batch), so a resumed or data-parallel run masks exactly as one process does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...errors import UsageError
from . import register_loss
from .base import Batch, ModelOutputs, Objective, gather_with_grad
from .infonce import symmetric_cross_entropy


def label_softening_weight(step: int, total_steps: int | None, alpha_max: float) -> float:
    """alpha_s of eq. (W): 0 at step 0, rising linearly to ``alpha_max`` at ``total_steps``.

    Parameters
    ----------
    step : int
        The optimizer step (from 0).
    total_steps : int or None
        Steps of the run; None (outside the Trainer) gives ``alpha_max``.
    alpha_max : float
        The final weight, in [0, 1].

    Returns
    -------
    float
    """
    if not total_steps:
        return float(alpha_max)
    return float(alpha_max) * min(max(step, 0) / total_steps, 1.0)   # eq. (W)


def softened_labels(logits: torch.Tensor, alpha: float, soft: str = "similarity") -> torch.Tensor:
    """Targets of eqs. (Q)-(Y): ``(1 - alpha)`` on the positive, ``alpha`` spread over the negatives.

    Parameters
    ----------
    logits : torch.Tensor of shape (N, M)
        Row i's positive is column i (M >= N >= 2); the weights are computed without gradient.
    alpha : float
        The negatives' total share.
    soft : {"similarity", "uniform"}, default "similarity"
        Spread by ``softmax`` of the row's logits over its negatives, or evenly.

    Returns
    -------
    torch.Tensor of shape (N, M)
        Rows summing to 1; ``alpha = 0`` gives the one-hot labels of InfoNCE.

    Raises
    ------
    ValueError
        Unknown ``soft``.
    """
    n, m = logits.shape
    eye = torch.eye(n, m, dtype=torch.bool, device=logits.device)
    if soft == "similarity":
        q = torch.softmax(logits.detach().masked_fill(eye, float("-inf")), dim=1)   # eq. (Q), (N, M)
    elif soft == "uniform":
        q = (~eye).to(logits.dtype) / (m - 1)
    else:
        raise ValueError(f"soft must be 'similarity' or 'uniform', got {soft!r}")
    return (1 - alpha) * eye.to(logits.dtype) + alpha * q                             # eq. (Y)


def soft_label_nce(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
                   alpha: float, soft: str = "similarity") -> torch.Tensor:
    """Symmetric InfoNCE against progressively softened labels (eq. I).

    Parameters
    ----------
    image_features, text_features : torch.Tensor of shape (N, D)
        L2-normalised; row i of both is a matching pair.
    logit_scale : torch.Tensor or float
        The temperature t (already exponentiated).
    alpha : float
        alpha_s of eq. (W); 0 gives CLIP's InfoNCE exactly.
    soft : {"similarity", "uniform"}, default "similarity"

    Returns
    -------
    torch.Tensor
        A scalar.
    """
    logits = logit_scale * image_features @ text_features.T                           # (N, N)
    i2t = F.cross_entropy(logits, softened_labels(logits, alpha, soft))
    t2i = F.cross_entropy(logits.T, softened_labels(logits.T, alpha, soft))
    return (i2t + t2i) / 2                                                             # eq. (I)


def relaxed_matching_scores(patch_tokens: torch.Tensor, word_tokens: torch.Tensor,
                            word_mask: torch.Tensor) -> torch.Tensor:
    """Token-level image-text scores by relaxed bipartite matching (eq. M).

    Parameters
    ----------
    patch_tokens : torch.Tensor of shape (N, P, D)
        Unit-length patch tokens of N images.
    word_tokens : torch.Tensor of shape (M, T, D)
        Unit-length word tokens of M captions.
    word_mask : torch.Tensor of shape (M, T), bool
        The word positions of each caption (at least one per caption).

    Returns
    -------
    torch.Tensor of shape (N, M)
        ``m_ij``: the mean over caption j's words of the word's best patch similarity in image i.
    """
    sim = torch.einsum("ipd,jtd->ijtp", patch_tokens, word_tokens)                   # (N, M, T, P)
    best = sim.amax(dim=-1)                                                            # (N, M, T) word -> best patch
    mask = word_mask.to(best.dtype)                                                    # (M, T)
    return (best * mask).sum(-1) / mask.sum(-1).clamp_min(1)                           # eq. (M), (N, M)


def token_alignment_nce(patch_tokens: torch.Tensor, word_tokens: torch.Tensor, word_mask: torch.Tensor,
                        logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE on the token-level scores of eq. (M) (eq. T); arguments as :func:`relaxed_matching_scores`."""
    logits = logit_scale * relaxed_matching_scores(patch_tokens, word_tokens, word_mask)   # (N, N)
    return symmetric_cross_entropy(logits)                                             # eq. (T)


def word_positions(tokens: torch.Tensor) -> torch.Tensor:
    """Positions strictly between the start token and the end token (the argmax id, CLIP's BPE).

    Parameters
    ----------
    tokens : torch.Tensor of shape (B, T), long

    Returns
    -------
    torch.Tensor of shape (B, T), bool
    """
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    eot = tokens.argmax(dim=-1, keepdim=True)                                          # (B, 1)
    return (pos > 0) & (pos < eot)


def mlm_mask(word_mask: torch.Tensor, prob: float, *, seed: int, step: int, rank: int = 0,
             world_size: int = 1) -> torch.Tensor:
    """Which words to mask: each word with probability ``prob``, a function of (seed, step, global row).

    Parameters
    ----------
    word_mask : torch.Tensor of shape (B, T), bool
        This rank's word positions.
    prob : float
    seed, step : int
    rank, world_size : int
        Rank r's rows are rows ``[r B, (r + 1) B)`` of the global batch's draw.

    Returns
    -------
    torch.Tensor of shape (B, T), bool
    """
    b, t = word_mask.shape
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    u = torch.rand(b * world_size, t, generator=gen)[rank * b:(rank + 1) * b]        # (B, T)
    return word_mask & (u.to(word_mask.device) < prob)


class FusionBlock(torch.nn.Module):
    """Cross-attention from the text stream to image tokens, then an MLP; pre-LN residuals (eq. F).

    Parameters
    ----------
    width : int
        Text-tower width W.
    heads : int
    mlp_ratio : float, default 2.0
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(width)
        self.ln_kv = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = torch.nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, W) text states, ``image`` (B, P, W) image tokens -> (B, T, W)."""
        kv = self.ln_kv(image)
        x = x + self.attn(self.ln_1(x), kv, kv, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class MLMHead(torch.nn.Module):
    """BERT's prediction head: dense, GELU, LayerNorm, then the (tied) token-embedding decoder plus a bias."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.dense = torch.nn.Linear(width, width)
        self.ln = torch.nn.LayerNorm(width)
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size))

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """``h`` (M, W), ``embedding`` (V, W) -> logits (M, V)."""
        return self.ln(F.gelu(self.dense(h))) @ embedding.T + self.bias


def _image_tokens(visual, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision tower's pooled output (B, D) and its patch tokens (B, P, W), in one pass."""
    old = visual.output_tokens
    visual.output_tokens = True
    try:
        pooled, tokens = visual(images)
    finally:
        visual.output_tokens = old
    return pooled, tokens


def _project(x: torch.Tensor, proj) -> torch.Tensor:
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


@register_loss("lightclip", help="LightCLIP: softened labels + patch-word alignment + image-conditioned MLM "
                                 "(arXiv:2312.00674)")
class LightCLIPLoss(Objective):
    """LightCLIP's three objectives, with the fusion head and MLM head it owns.

    Parameters
    ----------
    rank : int, default 0
    world_size : int, default 1
    alpha_max : float, default 0.2
        Final negatives' share of the softened labels (eq. W).
    soft_labels : {"similarity", "uniform"}, default "similarity"
        How that share is spread over the negatives (eq. Q).
    token_weight : float, default 1.0
        lambda_tok of eq. (L); 0 skips the token-level term.
    mlm_weight : float, default 1.0
        lambda_mlm of eq. (L); 0 skips the masked pass (no fusion head is built).
    mask_prob : float, default 0.15
        Probability that a word is masked.
    fusion_layers : sequence of int, optional
        Text-tower blocks (0-based) after which a fusion block runs; default the last
        block of each third of the tower.
    seed : int, default 0
        Seeds the choice of masked words (with the step).

    Attributes
    ----------
    init_logit_scale : float
        log(1 / 0.07), CLIP's.
    init_logit_bias : None
    fusion : torch.nn.ModuleList or None
        One :class:`FusionBlock` per fusion layer, built by :meth:`setup`.
    image_in : torch.nn.Linear or None
        Maps patch tokens (vision width) to the text width.
    mask_embedding : torch.nn.Parameter of shape (W,) or None
    mlm_head : MLMHead or None

    Examples
    --------
    >>> from cliplab.train.losses import get_loss
    >>> get_loss("lightclip", alpha_max=0.1).name
    'lightclip'
    """

    init_logit_scale = math.log(1 / 0.07)
    init_logit_bias = None

    def __init__(self, *, rank: int = 0, world_size: int = 1, alpha_max: float = 0.2, soft_labels: str = "similarity",
                 token_weight: float = 1.0, mlm_weight: float = 1.0, mask_prob: float = 0.15,
                 fusion_layers=None, seed: int = 0):
        super().__init__(rank=rank, world_size=world_size)
        if not 0 <= alpha_max <= 1:
            raise ValueError(f"alpha_max must be in [0, 1], got {alpha_max}")
        if soft_labels not in ("similarity", "uniform"):
            raise ValueError(f"soft_labels must be 'similarity' or 'uniform', got {soft_labels!r}")
        if not 0 < mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.alpha_max, self.soft_labels = float(alpha_max), soft_labels
        self.token_weight, self.mlm_weight = float(token_weight), float(mlm_weight)
        self.mask_prob, self.seed = float(mask_prob), int(seed)
        self.fusion_layers = None if fusion_layers is None else sorted(int(i) for i in fusion_layers)
        self.fusion = self.image_in = self.mask_embedding = self.mlm_head = None

    # ------------------------------------------------------------------ model side
    def setup(self, model: torch.nn.Module, config=None) -> None:
        """Build the fusion blocks, the [MASK] embedding and the MLM head for ``model``'s widths.

        Raises
        ------
        UsageError
            The model is not an open_clip CLIP with the built-in ViT and text transformer.
        """
        _check_model(model)
        if self.mlm_weight == 0 or self.fusion is not None:
            return
        width = model.transformer.width
        layers = len(model.transformer.resblocks)
        if self.fusion_layers is None:
            self.fusion_layers = sorted({max(round(layers * k / 3) - 1, 0) for k in (1, 2, 3)})
        if any(not 0 <= i < layers for i in self.fusion_layers):
            raise UsageError(f"fusion_layers must be in [0, {layers}), got {self.fusion_layers}")
        heads = model.transformer.resblocks[0].attn.num_heads
        self.fusion = torch.nn.ModuleList(FusionBlock(width, heads) for _ in self.fusion_layers)
        self.image_in = torch.nn.Linear(model.visual.transformer.width, width)
        self.mask_embedding = torch.nn.Parameter(0.02 * torch.randn(width))
        self.mlm_head = MLMHead(width, model.token_embedding.num_embeddings)

    def forward_model(self, model, batch: Batch) -> ModelOutputs:
        """CLIP's features plus patch tokens, word tokens and the MLM logits (in ``extras``).

        ``extras``: ``patch_tokens`` (B, P, D) and ``word_tokens`` (B, T', D), unit length;
        ``word_mask`` (B, T') bool; ``mlm_logits`` (M, V) and ``mlm_targets`` (M,) over the
        M masked words (with ``mlm_weight > 0``).  T' is the longest caption of the batch.
        """
        _check_model(model)
        tokens = batch.tokens
        length = tokens.argmax(dim=-1).max() + 1                                      # last EOT + 1
        if self.world_size > 1:                           # the same length on every rank, for the gathers
            torch.distributed.all_reduce(length, op=torch.distributed.ReduceOp.MAX)
        length = int(length)
        tokens = tokens[:, :length]                       # the text tower is causal: cropping changes nothing
        pooled, patches = _image_tokens(model.visual, batch.images)                    # (B, D), (B, P, Wv)
        states = self._text_states(model, model.token_embedding(tokens))              # (B, T', W)
        from open_clip.transformer import text_global_pool

        text = text_global_pool(states, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        out = ModelOutputs(F.normalize(pooled, dim=-1), F.normalize(_project(text, model.text_projection), dim=-1),
                           model.logit_scale.exp())
        words = word_positions(tokens)                                                 # (B, T')
        out.extras["word_mask"] = words
        if self.token_weight:
            out.extras["patch_tokens"] = F.normalize(_project(patches, model.visual.proj), dim=-1)   # (B, P, D)
            out.extras["word_tokens"] = F.normalize(_project(states, model.text_projection), dim=-1)  # (B, T', D)
        if self.mlm_weight:
            if self.fusion is None:
                raise RuntimeError("LightCLIPLoss.setup(model) must run before training (the Trainer calls it)")
            masked = mlm_mask(words, self.mask_prob, seed=self.seed, step=batch.step, rank=self.rank,
                              world_size=self.world_size)                              # (B, T')
            x = model.token_embedding(tokens)
            x = torch.where(masked[..., None], self.mask_embedding.to(x.dtype), x)     # [MASK] in the masked words
            fused = self._text_states(model, x, image=self.image_in(patches))          # eq. (F), (B, T', W)
            out.extras["mlm_logits"] = self.mlm_head(fused[masked], model.token_embedding.weight)  # (M, V)
            out.extras["mlm_targets"] = tokens[masked]                                 # (M,)
        return out

    def _text_states(self, model, x: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """The text tower on embeddings ``x`` (B, T, W); with ``image``, fusion blocks after the fusion layers."""
        t = x.shape[1]
        cast = model.transformer.get_cast_dtype()
        x = x.to(cast) + model.positional_embedding[:t].to(cast)
        mask = model.attn_mask[:t, :t] if model.attn_mask is not None else None
        fuse = dict(zip(self.fusion_layers or [], self.fusion or [])) if image is not None else {}
        batch_first = model.transformer.batch_first
        for i, block in enumerate(model.transformer.resblocks):
            x = block(x if batch_first else x.transpose(0, 1), attn_mask=mask)
            x = x if batch_first else x.transpose(0, 1)
            if i in fuse:
                x = fuse[i](x, image)
        return model.ln_final(x)

    # ------------------------------------------------------------------ loss side
    def forward(self, outputs: ModelOutputs, batch: Batch | None = None) -> dict:
        """Return ``{"contrastive": (I), "token": lambda_tok (T), "mlm": lambda_mlm (P)}`` on the global batch.

        Terms whose inputs are missing from ``outputs.extras`` (or whose weight is 0) are
        left out; ``batch=None`` counts as step 0 (one-hot labels).

        Raises
        ------
        ValueError
            A logit bias.
        """
        if outputs.logit_bias is not None:
            raise ValueError("the lightclip loss takes no logit_bias; build the model without one")
        step = batch.step if batch is not None else 0
        total = batch.total_steps if batch is not None else 1
        alpha = label_softening_weight(step, total, self.alpha_max)
        img, txt = gather_with_grad([outputs.image_features, outputs.text_features], self.world_size)
        terms = {"contrastive": soft_label_nce(img, txt, outputs.logit_scale, alpha, self.soft_labels)}
        ex = outputs.extras
        if self.token_weight and "patch_tokens" in ex:
            patches, words, mask = gather_with_grad(
                [ex["patch_tokens"], ex["word_tokens"], ex["word_mask"].to(ex["word_tokens"].dtype)], self.world_size)
            terms["token"] = self.token_weight * token_alignment_nce(patches, words, mask > 0, outputs.logit_scale)
        if self.mlm_weight and "mlm_logits" in ex:
            terms["mlm"] = self.mlm_weight * self._mlm_loss(ex["mlm_logits"], ex["mlm_targets"])
        return terms

    def _mlm_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean CE over the global batch's masked words (eq. P); each rank returns W x its share of the sum.

        DDP averages gradients over the W ranks, so the gradient is that of the global mean.
        """
        total = torch.tensor(float(targets.numel()), device=logits.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(total)
        loss = F.cross_entropy(logits, targets, reduction="sum")                      # eq. (P)
        return loss * self.world_size / total.clamp_min(1)


def _check_model(model) -> None:
    for name in ("token_embedding", "transformer", "positional_embedding", "ln_final", "text_projection"):
        if not hasattr(model, name):
            raise UsageError("the lightclip loss needs an open_clip CLIP with the built-in text transformer "
                             f"(the model has no {name!r})")
    if not hasattr(model.visual, "output_tokens") or not hasattr(model.visual, "transformer"):
        raise UsageError("the lightclip loss needs a ViT image tower that exposes patch tokens")
