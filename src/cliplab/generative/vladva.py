"""VladVA's usable part on a CLIP Backbone: joint contrastive and next-token training of the
text tower, adapted by soft prompts and LoRA.

Ouali, Bulat, Xenos, Zaganidis, Maniadis Metaxas, Martinez, Tzimiropoulos, "Discriminative
Fine-tuning of Large Vision-Language Models" (VladVA), CVPR 2025, arXiv:2412.04378.  No
public code was found; the checks here are closed-form (hand-computed losses, frozen
weights compared bit for bit).

The paper
---------
One LVLM (LLaVA-1.5) gives both embeddings and next tokens.  Image-text pairs of two
granularities train it: short captions (< 30 tokens) with a contrastive loss between the
image and text embeddings, long captions (30-500 tokens) with a next-token prediction loss
conditioned on the image::

    L = L_con + λ · L_NTP

Adaptation is parameter-efficient: learnable soft prompt vectors plus LoRA adapters on the
language model; the vision encoder is frozen.

Here (small scale)
------------------
The CLIP text tower plays the language model: its transformer is causal already.

1. **Soft prompt** ``P`` (M, W): M learnable vectors that the text transformer reads before
   every sequence (:func:`attach_soft_prompt`; they take no positional embedding, and their
   outputs are dropped after the transformer, so pooling, shapes and every caller of the
   Backbone are unchanged).  Initialised N(0, 0.02²) like CoOp's generic context.  CoOp's
   :class:`cliplab.adapt.prompts.SoftPrompts` is not reused: it builds the prompts of a
   fixed list of class names, while this prompt must precede any text, in every
   ``encode_texts`` call, so it lives inside the tower.
2. **LoRA** on every linear layer of the text tower's residual blocks
   (:func:`cliplab.surgery.lora.apply_lora`, ``towers=("text",)``), rank 4, alpha 8.
3. **Contrastive term** on short captions: ``L_con = symmetric_cross_entropy(t · f(x) g(c)ᵀ)``
   (:func:`cliplab.train.losses.infonce.symmetric_cross_entropy`), ``f`` the frozen image
   tower, ``g`` the adapted text tower, ``t`` the model's (frozen) temperature.
4. **Next-token term** on long captions: the frozen image embedding ``f(x)`` (D,) is mapped
   by a trained linear projector to K token embeddings (K, W) placed before the caption
   (no positional embedding, like the prompt), the causal text transformer runs over
   ``[P, image tokens, SOS, c_1 .. c_n, EOT]`` and an LM head predicts ``c_{i+1}`` from the
   output at ``c_i``:  ``L_NTP = mean_i CE(s · cos(h_i, E_V), c_{i+1})``.  The LM head is
   **tied** to the frozen token embedding ``E``, restricted to the vocabulary V of the
   training long captions, as cosine logits times one learned scale ``s = exp(σ)``
   (initialised at 10; with the raw products ``h E_Vᵀ`` of CLIP's small token embeddings
   the loss started at ln|V| and fell by only 0.2 nats in 30 steps of a trial run).
5. Trainable: P, the LoRA factors, the image projector and σ; everything else frozen.  One
   :class:`VladVAObjective` trained by :class:`cliplab.train.Trainer`;
   :func:`train_vladva` returns the adapted Backbone (the projector and head are NTP-only
   and are not part of it).

Defaults: M = 8 prompt vectors, K = 2 image tokens, LoRA rank 4 / alpha 8, λ = 1, AdamW
lr 3e-3, weight decay 0.01 (matrices only), batch 32, 120 steps, 10 % warm-up then cosine.

Measured on ShapesWorld (``benchmarks/vladva_shapes.py``, docs/generative.md): λ = 1 raises
zero-shot count accuracy over contrastive-only training (0.117 -> 0.182) but lowers
text -> image R@1 (0.757 -> 0.681); λ = 0.1 stays within noise of contrastive only.

Deviations
----------
- A CLIP text tower of 3 layers stands for LLaVA's 7B LLM; the image embedding used by
  the contrastive loss is the frozen CLIP image tower's, not the LVLM's summary token
  ("Summarize above image in one word:"), so only the text side adapts.
- The image enters the NTP pass as K projected tokens of the pooled image embedding
  (LLaVA feeds all patch tokens through its pretrained projector); the projector here is
  new and trained.
- The LM head is tied to the frozen token embedding over the caption vocabulary (|V| = 66
  token ids on the long captions of 1,024 ShapesWorld scenes) instead of the full
  49,408-token softmax; targets outside V are ignored (none in the next 8,000 scenes:
  ``python benchmarks/vladva_shapes.py --vocabulary``, benchmarks/results/vladva_vocabulary.json).
- Long captions are cut to the text tower's context (32 tokens for shapes-tiny), so the
  NTP target is the first ~30 tokens of a 28-110-token ShapesWorld long caption.
- One soft prompt serves both passes (the embedding and the next-token one); the paper
  places its soft prompts in the LVLM's prompt templates (where exactly: not verified).
- Not verified in the paper text available here: λ, the number of soft prompt vectors,
  the LoRA rank/targets, learning rate, batch size and schedule.  The values above are
  this module's choices.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointMismatch, ModelLoadError, UsageError
from ..models.backbone import encode_token_embeddings
from ..train.datasets import SceneItems
from ..train.losses.base import Batch, ModelOutputs, Objective, gather_with_grad
from ..train.losses.infonce import symmetric_cross_entropy
from ..validation import check_backbone, check_number, check_positive_int

logger = logging.getLogger(__name__)

__all__ = ["SoftPrefix", "VladVAModel", "VladVAObjective", "VladVASet", "attach_soft_prompt",
           "adapt_backbone", "ntp_vocabulary", "load_vladva", "ntp_loss", "save_vladva", "soft_prompt_of",
           "train_vladva", "vladva_world"]

PROMPT_ATTR = "soft_prompt"
"""Name of the :class:`SoftPrefix` submodule on the text transformer (``model.transformer``)."""

_FORMAT = "cliplab-vladva-1"
HEAD_SCALE_INIT = 10.0
"""Initial multiplier ``s`` of the tied LM head's cosine logits."""


# ------------------------------------------------------------------------ soft prompt
def _causal_mask(n: int, like: torch.Tensor) -> torch.Tensor:
    """Additive causal mask (n, n): 0 on and below the diagonal, -inf above (open_clip's)."""
    return torch.full((n, n), float("-inf"), dtype=like.dtype, device=like.device).triu_(1)


class SoftPrefix(nn.Module):
    """M learnable vectors read by a causal transformer before every sequence.

    Attached to an open_clip text transformer by :func:`attach_soft_prompt`: a forward
    pre-hook prepends the vectors to the input (B, L, W) and widens the causal mask to
    M + L; a forward hook drops their M outputs, so the transformer still returns (B, L, W)
    and every position attends to the prompt.

    Parameters
    ----------
    n : int
        M, the number of vectors.
    width : int
        W, the transformer width.
    init_std : float, default 0.02
    generator : torch.Generator, optional

    Attributes
    ----------
    vectors : Parameter (M, W)
    """

    def __init__(self, n: int, width: int, *, init_std: float = 0.02, generator=None):
        super().__init__()
        self.vectors = nn.Parameter(torch.randn(n, width, generator=generator) * init_std)   # (M, W)

    def _prepend(self, module, args, kwargs):
        x = args[0]                                                          # (B, L, W)
        B, L = x.shape[0], x.shape[1]
        M = self.vectors.shape[0]
        p = self.vectors.to(x.dtype).unsqueeze(0).expand(B, -1, -1)          # (B, M, W)
        mask = _causal_mask(M + L, x)                                        # (M+L, M+L)
        if "attn_mask" in kwargs or len(args) < 2:
            kwargs = {**kwargs, "attn_mask": mask}
            args = (torch.cat([p, x], dim=1),) + tuple(args[1:])
        else:
            args = (torch.cat([p, x], dim=1), mask) + tuple(args[2:])
        return args, kwargs

    def _drop(self, module, args, kwargs, output):
        return output[:, self.vectors.shape[0]:]                             # (B, L, W)


def soft_prompt_of(model: nn.Module) -> SoftPrefix | None:
    """The :class:`SoftPrefix` of an open_clip model's text transformer, or None."""
    transformer = getattr(model, "transformer", None)
    return getattr(transformer, PROMPT_ATTR, None) if transformer is not None else None


def attach_soft_prompt(model: nn.Module, n: int, *, generator=None) -> SoftPrefix:
    """Give ``model``'s causal text transformer M soft prompt vectors, in place.

    Parameters
    ----------
    model : open_clip.CLIP
        With the built-in causal text tower (``transformer``, ``attn_mask``).
    n : int
        M, the number of vectors.
    generator : torch.Generator, optional
        For the N(0, 0.02²) initialisation.

    Returns
    -------
    SoftPrefix
        The new submodule ``model.transformer.soft_prompt`` (trainable).

    Raises
    ------
    UsageError
        The model has no causal text transformer or already has a soft prompt.
    """
    check_positive_int("n_prompts", n)
    if getattr(model, "attn_mask", None) is None or not hasattr(model, "transformer"):
        raise UsageError("soft prompts need an open_clip CLIP with its built-in causal text tower")
    if soft_prompt_of(model) is not None:
        raise UsageError("this model already has a soft prompt")
    transformer = model.transformer
    width = model.token_embedding.weight.shape[1]
    prefix = SoftPrefix(n, width, generator=generator).to(model.token_embedding.weight.device)
    transformer.add_module(PROMPT_ATTR, prefix)
    # bound methods: a deep copy of the model re-binds them to the copied prompt
    transformer.register_forward_pre_hook(prefix._prepend, with_kwargs=True)
    transformer.register_forward_hook(prefix._drop, with_kwargs=True)
    return prefix


# ------------------------------------------------------------------------------ model
def ntp_vocabulary(tokenize, captions) -> torch.Tensor:
    """Sorted token ids (V,) of ``captions``: the next-token head's vocabulary.

    Start-of-text excluded, end-of-text included.  (The captioner's
    :func:`cliplab.generative.captioner.caption_vocabulary` is another thing: a word list
    with an unknown slot.)
    """
    tokens = tokenize(list(captions))                                        # (N, T)
    ids = torch.unique(tokens[:, 1:])
    return ids[ids != 0]


def ntp_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose target is not -100.

    Parameters
    ----------
    logits : Tensor (B, L, V)
    targets : LongTensor (B, L)
        Indices into V; -100 where nothing is predicted (padding).
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


class VladVAModel(nn.Module):
    """What VladVA trains: the adapted CLIP plus the image projector and the tied LM head.

    Parameters
    ----------
    clip : open_clip.CLIP
        With LoRA on its text tower and a soft prompt (:func:`attach_soft_prompt`); its
        other weights frozen.
    vocabulary : LongTensor (V,)
        Token ids the LM head predicts.
    n_image_tokens : int, default 2
        K, the image tokens placed before a caption in the next-token pass.
    generator : torch.Generator, optional
        For the projector's initialisation.

    Attributes
    ----------
    image_proj : nn.Linear (D -> K·W)
    head_scale : Parameter ()
        σ; the LM logits are ``exp(σ) · cos(h, E_V)``, σ = ln 10 at init.
    """

    def __init__(self, clip: nn.Module, vocabulary: torch.Tensor, n_image_tokens: int = 2, *, generator=None):
        super().__init__()
        check_positive_int("n_image_tokens", n_image_tokens)
        self.clip = clip
        D = clip.text_projection.shape[1] if isinstance(clip.text_projection, torch.Tensor) \
            else clip.text_projection.out_features
        W = clip.token_embedding.weight.shape[1]
        self.n_image_tokens, self.width = int(n_image_tokens), int(W)
        self.image_proj = nn.Linear(D, n_image_tokens * W)
        with torch.no_grad():
            bound = 1 / math.sqrt(D)
            u = torch.rand(self.image_proj.weight.shape, generator=generator)      # nn.Linear's U(-1/√D, 1/√D)
            self.image_proj.weight.copy_(u * 2 * bound - bound)
            self.image_proj.bias.zero_()
        self.head_scale = nn.Parameter(torch.tensor(math.log(HEAD_SCALE_INIT)))
        vocabulary = torch.as_tensor(vocabulary, dtype=torch.long)
        lookup = torch.full((clip.token_embedding.weight.shape[0],), -100, dtype=torch.long)
        lookup[vocabulary] = torch.arange(len(vocabulary))
        self.register_buffer("vocabulary", vocabulary, persistent=False)     # (V,)
        self.register_buffer("lookup", lookup, persistent=False)             # (vocab_size,) id -> index in V
        self.to(clip.token_embedding.weight.device)

    @property
    def temperature(self) -> torch.Tensor:
        """The contrastive temperature t = exp(clip.logit_scale) (frozen)."""
        return self.clip.logit_scale.exp()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen, L2-normalised image embeddings (B, D) of preprocessed images (B, 3, H, W)."""
        with torch.no_grad():
            return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings (B, D) of the adapted tower (prompt and LoRA)."""
        L = int((tokens.argmax(dim=-1) + 1).max())                            # cut trailing padding
        tokens = tokens[:, :L]                                                # (B, L)
        x = encode_token_embeddings(self.clip, self.clip.token_embedding(tokens), tokens)
        return F.normalize(x.float(), dim=-1)

    def ntp_logits(self, image_features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits of captions conditioned on images.

        Parameters
        ----------
        image_features : Tensor (B, D)
        tokens : LongTensor (B, T)
            Caption ids (start-of-text, words, end-of-text, zero padding).

        Returns
        -------
        logits : Tensor (B, L-1, V)
            Position i (the output at token i) scores token i+1.
        targets : LongTensor (B, L-1)
            Indices of tokens 1..L-1 into the vocabulary; -100 on padding.
        """
        m = self.clip
        L = int((tokens.argmax(dim=-1) + 1).max())
        tokens = tokens[:, :L]                                                # (B, L)
        B, K, W = tokens.shape[0], self.n_image_tokens, self.width
        cast = m.transformer.get_cast_dtype()
        prefix = self.image_proj(image_features.to(self.image_proj.weight.dtype)).reshape(B, K, W)  # (B, K, W)
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:L].to(cast)                # (B, L, W)
        x = torch.cat([prefix.to(cast), x], dim=1)                            # (B, K+L, W)
        h = m.ln_final(m.transformer(x, attn_mask=_causal_mask(K + L, x)))   # (B, K+L, W), prompt via hooks
        h = h[:, K:K + L - 1].float()                                         # (B, L-1, W): SOS .. c_n
        E = F.normalize(m.token_embedding.weight[self.vocabulary].float(), dim=-1)   # (V, W), tied, frozen
        logits = self.head_scale.exp() * F.normalize(h, dim=-1) @ E.T               # (B, L-1, V)
        nxt = tokens[:, 1:]                                                   # (B, L-1)
        targets = torch.where(nxt == 0, torch.full_like(nxt, -100), self.lookup[nxt])
        return logits, targets


# -------------------------------------------------------------------------- objective
class VladVAObjective(Objective):
    """``L = L_con + λ · L_NTP`` on :class:`VladVASet` items.

    Items are ``(image, short captions, {"extra_captions": [long caption]})``: the sampled
    short caption (``Batch.tokens``) is contrasted with the image, the long caption
    (``Batch.extra_tokens[:, 0]``) is predicted token by token from the image.  Trains a
    :class:`VladVAModel`; an instance for :class:`cliplab.train.Trainer`, not registered
    for ``cliplab train --loss``.

    Parameters
    ----------
    ntp_weight : float, default 1.0
        λ.  With 0 the next-token pass is skipped and the loss is the contrastive term only.
    rank, world_size : int
    """

    needs_captions = True
    needs_extra_captions = True

    def __init__(self, ntp_weight: float = 1.0, *, rank: int = 0, world_size: int = 1):
        super().__init__(rank=rank, world_size=world_size)
        self.ntp_weight = check_number("ntp_weight", ntp_weight, minimum=0)

    def forward_model(self, model: VladVAModel, batch: Batch) -> ModelOutputs:
        img = model.image_features(batch.images)                              # (B, D)
        txt = model.text_features(batch.tokens)                               # (B, D)
        extras = {}
        if self.ntp_weight > 0:
            logits, targets = model.ntp_logits(img, batch.extra_tokens[:, 0])
            extras = {"ntp_logits": logits, "ntp_targets": targets}
        return ModelOutputs(img, txt, model.temperature, extras=extras)

    def forward(self, outputs: ModelOutputs, batch: Batch | None = None) -> dict[str, torch.Tensor]:
        img, txt = gather_with_grad([outputs.image_features, outputs.text_features], self.world_size)
        terms = {"contrastive": symmetric_cross_entropy(outputs.logit_scale * img @ txt.T)}   # (N, N)
        if self.ntp_weight > 0:
            terms["ntp"] = self.ntp_weight * ntp_loss(outputs.extras["ntp_logits"], outputs.extras["ntp_targets"])
        return terms


class VladVASet(SceneItems):
    """A ShapesWorld split as VladVA items: ``(image, short captions, {"extra_captions": [long]})``.

    The short captions are the scene's phrasings (:attr:`~cliplab.data.shapes.Scene.captions`,
    all under 30 tokens; the Trainer samples one per step), the long one its
    :attr:`~cliplab.data.shapes.Scene.long_caption`.

    Parameters
    ----------
    world : ShapesWorld
    split : str, default "train"
    n : int, optional
        Use the first ``n`` scenes of the split (default: all).
    """

    def items(self, scenes):
        return [list(s.captions) for s in scenes], [{"extra_captions": [s.long_caption]} for s in scenes]

    def long_captions(self, n: int):
        """The long captions of the first ``n`` scenes (for the LM head's vocabulary)."""
        return [self.world.scene(self.split, i).long_caption for i in range(min(int(n), self.n))]


def vladva_world(seed: int = 2, **options):
    """Default training world: 64 px scenes of 1-3 objects, a seed shapes-tiny was not trained on."""
    from ..data.shapes import shapes_tiny_world

    return shapes_tiny_world(seed, **{"n_objects": (1, 3), **options})


# ----------------------------------------------------------------------------- API
def _quiet_tokenizer(backbone):
    """``backbone.tokenize`` without its truncation warning: long captions are cut on purpose.

    open_clip's tokenizer itself gives the same ids (cut at the context, end-of-text kept).
    """
    def tokenize(texts):
        return backbone.tokenizer(list(texts))                                # (N, T)
    return tokenize


def adapt_backbone(backbone, *, n_prompts: int = 8, rank: int = 4, alpha: float = 8, seed: int = 0):
    """A new Backbone with LoRA on the text tower and M soft prompt vectors; ``backbone`` untouched.

    Only the LoRA factors and the prompt train; at init the LoRA update is zero, the
    prompt N(0, 0.02²).  Both initialisations are a function of ``seed`` alone.
    """
    from ..adapt.prompts import check_prompt_backbone
    from ..surgery.lora import apply_lora

    check_backbone("backbone", backbone)
    check_prompt_backbone(backbone)                  # a built-in causal text tower with EOT pooling
    with torch.random.fork_rng(devices=[]):          # LoRA's A is drawn from the global RNG: seed it here
        torch.manual_seed(int(seed))
        adapted = apply_lora(backbone, rank=rank, alpha=alpha, towers=("text",))   # a deep copy, all else frozen
    attach_soft_prompt(adapted.model, n_prompts, generator=torch.Generator().manual_seed(int(seed)))
    return adapted.with_model(adapted.model, name=f"{backbone.name}+vladva")


def train_vladva(backbone, *, steps: int = 120, ntp_weight: float = 1.0, train_set=None, world=None,
                 n_prompts: int = 8, n_image_tokens: int = 2, rank: int = 4, alpha: float = 8,
                 batch_size: int = 32, lr: float = 3e-3, weight_decay: float = 0.01,
                 warmup_steps: int | None = None, seed: int = 0, out_dir: str | Path | None = None,
                 log_every: int = 25, eval_every: int = 0, vocab_scenes: int = 1024, evaluate=None,
                 return_model: bool = False, progress: bool | None = None):
    """VladVA's joint contrastive + next-token training of soft prompts and text LoRA.

    Parameters
    ----------
    backbone : Backbone
        An open_clip CLIP with its built-in causal text tower (unchanged).
    steps : int, default 120
    ntp_weight : float, default 1.0
        λ; 0 gives the contrastive-only baseline with the same trainable parameters.
    train_set : dataset, optional
        :class:`VladVASet`-like items; default ``VladVASet(world)``.
    world : ShapesWorld, optional
        Default :func:`vladva_world` (seed 2, 1-3 objects).
    n_prompts, n_image_tokens : int
        M soft prompt vectors, K image tokens of the next-token pass.
    rank, alpha
        LoRA (:func:`cliplab.surgery.lora.apply_lora`).
    batch_size, lr, weight_decay, seed, log_every, eval_every
        :class:`~cliplab.train.TrainConfig` fields; ``seed`` also seeds the prompt and
        projector initialisation.
    warmup_steps : int, optional
        Default: a tenth of ``steps``.
    out_dir : str or path, optional
        The Trainer's run folder (metrics, last checkpoint); default a temporary folder.
    vocab_scenes : int, default 1024
        The LM head predicts the token ids of the long captions of this many training scenes.
    evaluate : callable, optional
        ``evaluate(model) -> dict``, the Trainer's callback (``model`` is the :class:`VladVAModel`).
    return_model : bool, default False
        Also return the trained :class:`VladVAModel` (projector and LM head).

    Returns
    -------
    Backbone, or (Backbone, VladVAModel)
        The adapted Backbone (LoRA on the text tower, soft prompt), in eval mode: every
        cliplab function takes it.  Save it with :func:`save_vladva`.

    Raises
    ------
    UsageError
        Bad arguments, or a backbone without a causal built-in text tower.
    """
    from ..train import TrainConfig, Trainer

    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size, minimum=2)
    adapted = adapt_backbone(backbone, n_prompts=n_prompts, rank=rank, alpha=alpha, seed=seed)
    if train_set is None:
        train_set = VladVASet(world if world is not None else vladva_world())
    tokenize = _quiet_tokenizer(adapted)
    if hasattr(train_set, "long_captions"):
        longs = train_set.long_captions(vocab_scenes)
    else:
        longs = [train_set[i][2]["extra_captions"][0] for i in range(min(vocab_scenes, len(train_set)))]
    vocabulary = ntp_vocabulary(tokenize, longs)
    logger.info("VladVA: LM head over %d token ids of %d long captions", len(vocabulary), len(longs))
    model = VladVAModel(adapted.model, vocabulary, n_image_tokens,
                        generator=torch.Generator().manual_seed(int(seed) + 1))
    objective = VladVAObjective(ntp_weight)
    with tempfile.TemporaryDirectory(prefix="vladva-") as tmp:
        config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                             warmup_steps=max(steps // 10, 1) if warmup_steps is None else warmup_steps,
                             seed=seed, ckpt_every=0, log_every=log_every,
                             eval_every=eval_every, device=str(backbone.device),
                             out_dir=str(out_dir if out_dir is not None else tmp))
        Trainer(model, tokenize, adapted.preprocess, train_set, config, evaluate, progress=progress,
                objective=objective, preprocess_cfg=adapted.preprocess_cfg).fit()
    model.eval()
    tuned = adapted.with_model(model.clip, name=f"{backbone.name}+vladva(λ={ntp_weight:g})")
    return (tuned, model) if return_model else tuned


# ------------------------------------------------------------------------- save/load
def save_vladva(backbone, out: str | Path) -> Path:
    """Write the adapter of a VladVA Backbone to folder ``out``.

    ``out/lora.safetensors`` (:func:`cliplab.surgery.lora.save_lora`) and
    ``out/soft_prompt.safetensors`` (the prompt vectors (M, W)); the base weights are not
    written.  Read back with :func:`load_vladva` on the same base model.
    """
    from safetensors.torch import save_file

    from ..surgery.lora import save_lora

    prompt = soft_prompt_of(backbone.model)
    if prompt is None:
        raise UsageError("this backbone has no soft prompt; it was not made by train_vladva")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_lora(backbone, out / "lora.safetensors")
    save_file({"vectors": prompt.vectors.detach().contiguous()}, str(out / "soft_prompt.safetensors"),
              metadata={"format": _FORMAT, "config": json.dumps({"n_prompts": int(prompt.vectors.shape[0])})})
    return out


def load_vladva(base_backbone, path: str | Path):
    """The VladVA Backbone saved by :func:`save_vladva`, rebuilt on ``base_backbone`` (unchanged).

    Raises
    ------
    ModelLoadError
        ``path`` holds no adapter written by :func:`save_vladva`, or its files are
        unreadable or corrupt (exit code 3 in the CLI).
    CheckpointMismatch
        The saved adapter does not fit ``base_backbone``.
    """
    from safetensors import safe_open

    from ..models.state_dicts import read_state_dict
    from ..surgery.lora import load_lora

    path = Path(path)
    prompt_file = path / "soft_prompt.safetensors"
    if not prompt_file.is_file():
        raise ModelLoadError(f"no VladVA adapter in {path} (write one with save_vladva)")
    state = read_state_dict(prompt_file)                   # ModelLoadError for a corrupt file
    with safe_open(str(prompt_file), framework="pt") as f:
        if (f.metadata() or {}).get("format") != _FORMAT:
            raise CheckpointMismatch(f"{prompt_file} is not a VladVA soft prompt")
    vectors = state.get("vectors")
    if vectors is None or vectors.ndim != 2 or not len(vectors):
        raise CheckpointMismatch(f"{prompt_file} holds no (M, W) 'vectors' tensor")
    lora_file = path / "lora.safetensors"
    if not lora_file.is_file():
        raise ModelLoadError(f"{path} lacks lora.safetensors (write the adapter with save_vladva)")
    read_state_dict(lora_file)                             # a corrupt file: ModelLoadError, not a traceback
    adapted = load_lora(base_backbone, lora_file)
    prompt = attach_soft_prompt(adapted.model, vectors.shape[0])
    if prompt.vectors.shape != vectors.shape:
        raise CheckpointMismatch(f"soft prompt of width {vectors.shape[1]}, "
                                 f"the text tower has {prompt.vectors.shape[1]}")
    with torch.no_grad():
        prompt.vectors.copy_(vectors)
    prompt.requires_grad_(False)
    return adapted.with_model(adapted.model, name=f"{base_backbone.name}+vladva")
