"""SoftPromptComp: a long caption compressed into k soft tokens that the frozen text tower reads.

Adapting LLMs for Efficient Context Processing through Soft Prompt Compression (Wang et
al., 2024, arXiv:2404.04997).  The paper feeds a frozen language model a compact
representation of a long document D, ``C = f_LM(S ⊕ f_S(f_NL(D)))``: a natural-language
summary ``f_NL(D)`` turned into summary vectors ``f_S``, next to trainable soft prompts
``S``, all trained for the downstream task with the language model frozen.  For CLIP the
"document" is a caption longer than the text tower's context (32 tokens for shapes-tiny,
77 for OpenAI's CLIP) and the downstream task is matching it with its image.

The compressor (:class:`SoftPromptCompressor`)
-----------------------------------------------
With ``E`` the frozen token embedding (W wide), a long caption of L <= ``max_tokens``
token ids ``w`` and ``k`` learned queries ``Q`` (k, W):

    (1) H = Enc(E[w] + P)                    one pre-norm transformer layer over the whole
                                             caption (P: learned positions, max_tokens x W)
    (2) S = Q + Linear(Attn(Q, H, H))        k soft tokens (k, W): cross-attention pooling
    (3) g = f_text([E[sot], S, E[eot]])      the frozen text tower on k + 2 positions, pooled
                                             at the end token (``encode_token_embeddings``)

``k + 2`` must fit the context.  Only ``P``, ``Enc``, ``Q``, the attention and the linear
map train; every weight of the CLIP model stays as it is (tested bit for bit).

The objective (:class:`SoftPromptCompLoss`)
-------------------------------------------
The paper trains its soft prompts on the downstream task's loss through the frozen model.
Here the task is text -> image retrieval, so the loss is CLIP's symmetric InfoNCE between
the frozen image features x_i and the compressed caption features g_i, at the model's own
(fixed) temperature t:

    (4) L = [CE(t X G^T, I) + CE(t G X^T, I)] / 2

Defaults: k = 8, max_tokens 128, one encoder layer, AdamW lr 1e-3, batch 64, 300 steps,
warm-up a tenth of the steps, no weight decay; training data: the ``train`` split of the
Long-CLIP world (:func:`cliplab.surgery.longclip.longclip_world`, seed 2, 1-3 objects),
disjoint from the ``test`` scenes of the benchmark.

Deviations from the paper (no reference code is published):

- no natural-language summary is put next to the soft tokens (``f_NL`` and ``f_S`` are
  replaced by one learned encoder over the caption's own token embeddings); the
  summary-in-text route is :mod:`cliplab.generative.capsulator`;
- the "weighting mechanism" that trades information retention against utility is not
  modelled: the one loss is the downstream (retrieval) loss (4);
- the frozen model is a CLIP text tower, not a decoder LLM, and the loss contrastive, not
  next-token prediction.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointMismatch, ModelLoadError, UsageError
from ..models.backbone import encode_token_embeddings
from ..train.datasets import SceneItems
from ..train.freezing import frozen
from ..train.losses.base import Batch, ModelOutputs, Objective, gather_with_grad
from ..train.losses.infonce import symmetric_cross_entropy
from ..train.trainer import Trainer, TrainConfig
from ..validation import check_backbone, check_positive_int

logger = logging.getLogger(__name__)

__all__ = ["LongCaptionIds", "SoftPromptComp", "SoftPromptCompLoss", "SoftPromptCompressor",
           "long_token_ids", "load_softpromptcomp", "train_softpromptcomp"]

MAX_TOKENS = 128
"""Default longest caption (token ids with start and end) the compressor reads; longer ones are cut."""

_FORMAT = "cliplab-softpromptcomp"


def _check_text_tower(backbone) -> None:
    from open_clip.model import CLIP

    m, tok = backbone.model, backbone.tokenizer
    if (not isinstance(m, CLIP) or getattr(m, "attn_mask", None) is None
            or m.text_pool_type not in ("argmax", "eos") or not hasattr(tok, "encode")):
        raise UsageError(f"soft prompt compression needs an open_clip CLIP with its built-in causal text "
                         f"tower, end-token pooling and a BPE tokenizer; {backbone.name} has "
                         f"{type(m).__name__} and {type(tok).__name__}")


def long_token_ids(tokenizer, texts: Sequence[str], max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """Token ids (N, max_tokens) of whole captions: start, words, end, zero padding.

    Unlike :meth:`~cliplab.models.Backbone.tokenize` the context length does not cut them;
    captions longer than ``max_tokens`` are cut there (keeping the end token).
    """
    out = torch.zeros(len(texts), max_tokens, dtype=torch.long)            # (N, L)
    for i, t in enumerate(texts):
        row = [tokenizer.sot_token_id] + tokenizer.encode(t)[:max_tokens - 2] + [tokenizer.eot_token_id]
        out[i, :len(row)] = torch.tensor(row)
    return out


class SoftPromptCompressor(nn.Module):
    """Eqs. (1)-(2): long-caption token ids (B, L) -> k soft tokens (B, k, W).

    The CLIP model whose token embedding it reads is not a submodule (it is not trained,
    saved or moved with this module): pass it to :meth:`forward` and :meth:`encode`.

    Parameters
    ----------
    width : int
        The text tower's width W.
    k : int, default 8
        Soft tokens.
    max_tokens : int, default 128
    heads : int, default 4
    layers : int, default 1
        Transformer layers of eq. (1).
    init_std : float, default 0.02
    """

    def __init__(self, width: int, *, k: int = 8, max_tokens: int = MAX_TOKENS, heads: int = 4, layers: int = 1,
                 init_std: float = 0.02):
        super().__init__()
        self.config = {"width": int(width), "k": int(k), "max_tokens": int(max_tokens), "heads": int(heads),
                       "layers": int(layers)}
        self.positions = nn.Parameter(torch.randn(max_tokens, width) * init_std)             # P (L, W)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.queries = nn.Parameter(torch.randn(k, width) * init_std)                      # Q (k, W)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.out = nn.Linear(width, width)

    @property
    def k(self) -> int:
        return self.config["k"]

    def forward(self, clip_model, ids: torch.Tensor) -> torch.Tensor:
        """Soft tokens (B, k, W) of long-caption ids (B, L) (zero = padding)."""
        ids = ids[:, :self.config["max_tokens"]]
        pad = ids == 0                                                          # (B, L)
        with torch.no_grad():
            x = clip_model.token_embedding(ids)                                 # (B, L, W)
        h = self.encoder(x + self.positions[:ids.shape[1]], src_key_padding_mask=pad)   # eq. (1)
        q = self.queries.unsqueeze(0).expand(len(ids), -1, -1)                  # (B, k, W)
        a, _ = self.attn(q, h, h, key_padding_mask=pad, need_weights=False)
        return q + self.out(a)                                                  # eq. (2) (B, k, W)

    @staticmethod
    def encode(clip_model, soft: torch.Tensor, sot: int, eot: int) -> torch.Tensor:
        """Eq. (3): the frozen text tower on ``[start, soft tokens, end]``; (B, D), not normalised.

        ``sot``/``eot`` are the tokenizer's start and end ids; any k with k + 2 <= the context.
        """
        B, k, _ = soft.shape
        ends = clip_model.token_embedding(torch.tensor([sot, eot], device=soft.device))   # (2, W)
        x = torch.cat([ends[:1].expand(B, 1, -1), soft.to(ends.dtype), ends[1:].expand(B, 1, -1)], dim=1)
        tokens = torch.zeros(B, k + 2, dtype=torch.long, device=soft.device)    # (B, k + 2)
        tokens[:, 0], tokens[:, -1] = sot, eot
        return encode_token_embeddings(clip_model, x, tokens)                   # (B, D)


class _Trainable(nn.Module):
    """What the Trainer trains: the compressor, with the frozen CLIP model held outside its modules."""

    def __init__(self, compressor: SoftPromptCompressor, clip_model, ends: tuple[int, int]):
        super().__init__()
        self.compressor = compressor
        self._clip = (clip_model,)                       # not a submodule: not trained, saved or moved
        self.ends = ends

    @property
    def clip(self):
        return self._clip[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """L2-normalised compressed-caption features (B, D)."""
        return F.normalize(self.encode_soft(self.compressor(self.clip, ids)), dim=-1)

    def encode_soft(self, soft: torch.Tensor) -> torch.Tensor:
        """Eq. (3) on soft tokens (B, k, W): (B, D) float32, not normalised."""
        return self.compressor.encode(self.clip, soft, *self.ends).float()


class SoftPromptCompLoss(Objective):
    """Eq. (4): InfoNCE of frozen image features against compressed long captions.

    Items are ``(image, None, {"targets": {"ids": long token ids (L,)}})``
    (:class:`LongCaptionIds`); the model is the Trainer's wrapper around a
    :class:`SoftPromptCompressor`.  The temperature is the CLIP model's, held fixed.
    """

    needs_captions = False
    needs_targets = True

    def forward_model(self, model, batch: Batch) -> ModelOutputs:
        clip = model.clip
        with torch.no_grad():
            x = F.normalize(clip.encode_image(batch.images).float(), dim=-1)      # (B, D)
            t = clip.logit_scale.exp().float()
        return ModelOutputs(x, model(batch.targets["ids"]), t)

    def forward(self, outputs: ModelOutputs, batch: Batch | None = None) -> dict:
        x, g = gather_with_grad([outputs.image_features, outputs.text_features], self.world_size)
        return {"contrastive": symmetric_cross_entropy(outputs.logit_scale * x @ g.T)}       # eq. (4)


class LongCaptionIds(SceneItems):
    """A ShapesWorld split as SoftPromptComp training items.

    Items are ``(image, None, {"targets": {"ids": int64 (max_tokens,)}})``: the scene's
    :attr:`~cliplab.data.shapes.Scene.long_caption` as whole-caption token ids
    (:func:`long_token_ids`).

    Parameters
    ----------
    world : ShapesWorld
    tokenizer : open_clip tokenizer
        With ``encode``, ``sot_token_id`` and ``eot_token_id`` (a Backbone's ``tokenizer``).
    split : str, default "train"
    n : int, optional
        The first ``n`` scenes of the split (default: all).
    max_tokens : int, default 128
    """

    def __init__(self, world, tokenizer, split: str = "train", n: int | None = None, max_tokens: int = MAX_TOKENS):
        super().__init__(world, split, n)
        self.tokenizer, self.max_tokens = tokenizer, int(max_tokens)

    def items(self, scenes):
        ids = long_token_ids(self.tokenizer, [s.long_caption for s in scenes], self.max_tokens).numpy()
        return [None] * len(scenes), [{"targets": {"ids": row}} for row in ids]


class SoftPromptComp:
    """A trained compressor bound to its Backbone: long captions -> features or soft tokens.

    Parameters
    ----------
    backbone : Backbone
        The CLIP model whose text tower reads the soft tokens (not modified).
    compressor : SoftPromptCompressor

    Examples
    --------
    >>> comp = train_softpromptcomp(cliplab.load("shapes-tiny"), steps=300)   # doctest: +SKIP
    >>> comp.encode_long_texts([scene.long_caption]).shape                      # doctest: +SKIP
    (1, 128)
    """

    def __init__(self, backbone, compressor: SoftPromptCompressor):
        check_backbone("backbone", backbone)
        _check_text_tower(backbone)
        ctx = backbone.context_length
        if compressor.k + 2 > ctx:
            raise UsageError(f"k={compressor.k} soft tokens plus start and end do not fit the context of {ctx}")
        width = backbone.model.token_embedding.weight.shape[1]
        if compressor.config["width"] != width:
            raise CheckpointMismatch(f"the compressor is {compressor.config['width']} wide; "
                                     f"{backbone.name}'s text tower is {width}")
        self.backbone = backbone
        tok = backbone.tokenizer
        self.module = _Trainable(compressor.to(backbone.device).eval(), backbone.model,
                                 (tok.sot_token_id, tok.eot_token_id))

    @property
    def k(self) -> int:
        """Soft tokens per caption."""
        return self.module.compressor.k

    def _ids(self, texts) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise UsageError("long texts must be strings")
        return long_token_ids(self.backbone.tokenizer, texts,
                              self.module.compressor.config["max_tokens"]).to(self.backbone.device)

    def soft_tokens(self, texts: str | Sequence[str], *, batch_size: int = 256) -> np.ndarray:
        """The k soft tokens of each text: float32 (N, k, W), W the text tower's width."""
        ids = self._ids(texts)
        with torch.inference_mode(), frozen(self.backbone.model):
            out = [self.module.compressor(self.backbone.model, ids[s:s + batch_size]).float().cpu()
                   for s in range(0, len(ids), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.k, self.module.compressor.config["width"]),
                                                            np.float32)

    def encode_soft_tokens(self, soft) -> np.ndarray:
        """Eq. (3) on given soft tokens (N, k', W), any k' <= context - 2: L2-normalised float32 (N, D)."""
        soft = torch.as_tensor(np.asarray(soft, np.float32), device=self.backbone.device)
        if soft.ndim != 3 or soft.shape[2] != self.module.compressor.config["width"]:
            raise UsageError(f"soft tokens must be (N, k, {self.module.compressor.config['width']}); "
                             f"got {tuple(soft.shape)}")
        if soft.shape[1] + 2 > self.backbone.context_length:
            raise UsageError(f"{soft.shape[1]} soft tokens plus start and end exceed the context "
                             f"{self.backbone.context_length}")
        with torch.inference_mode(), frozen(self.backbone.model):
            g = self.module.encode_soft(soft)
        return F.normalize(g, dim=-1).cpu().numpy()

    def encode_long_texts(self, texts: str | Sequence[str], *, batch_size: int = 256) -> np.ndarray:
        """Features of whole long captions through their soft tokens: L2-normalised float32 (N, D)."""
        ids = self._ids(texts)
        with torch.inference_mode(), frozen(self.backbone.model):
            out = [self.module(ids[s:s + batch_size]).cpu() for s in range(0, len(ids), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.backbone.embed_dim), np.float32)

    def save(self, path: str | Path) -> Path:
        """Write the compressor (only its own weights and config) to a safetensors file."""
        from safetensors.torch import save_file

        path = Path(path)
        state = {k: v.detach().cpu().contiguous() for k, v in self.module.compressor.state_dict().items()}
        save_file(state, str(path), metadata={"format": _FORMAT,
                                              "config": json.dumps(self.module.compressor.config)})
        return path


def load_softpromptcomp(backbone, path: str | Path) -> SoftPromptComp:
    """A compressor written by :meth:`SoftPromptComp.save`, bound to ``backbone``.

    Raises
    ------
    ModelLoadError
        No such file, or not a readable safetensors file (exit code 3 in the CLI).
    CheckpointMismatch
        Not a SoftPromptComp file, or its config or width does not fit the text tower.
    """
    from safetensors import safe_open

    from ..models.state_dicts import read_state_dict

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"compressor file not found: {path}")
    state = read_state_dict(path)                          # ModelLoadError for a corrupt file
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != _FORMAT:
        raise CheckpointMismatch(f"{path} is not a SoftPromptComp compressor (write it with SoftPromptComp.save)")
    try:
        config = json.loads(meta.get("config", ""))
        compressor = SoftPromptCompressor(**config)
        compressor.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointMismatch(f"{path}: the compressor's config or weights do not fit ({first})") from None
    return SoftPromptComp(backbone, compressor)


def train_softpromptcomp(backbone, steps: int = 300, out: str | Path | None = None, *, k: int = 8,
                         max_tokens: int = MAX_TOKENS, layers: int = 1, train_set=None, world=None,
                         batch_size: int = 64, lr: float = 1e-3, warmup_steps: int | None = None,
                         weight_decay: float = 0.0, seed: int = 0, log_every: int = 10,
                         progress: bool | None = None) -> SoftPromptComp:
    """Train a SoftPromptComp compressor for ``backbone``'s frozen towers with the one Trainer.

    Parameters
    ----------
    backbone : Backbone
        Not modified (its parameters are frozen during training and restored after).
    steps : int, default 300
    out : str or path, optional
        The Trainer's run folder (``metrics.jsonl``/``csv``, last checkpoint); default a
        temporary folder, removed after.
    k, max_tokens, layers
        See :class:`SoftPromptCompressor`.
    train_set : dataset, optional
        Items ``(image, None, {"targets": {"ids": (max_tokens,)}})``; default
        :class:`LongCaptionIds` of ``world``'s train split.
    world : ShapesWorld, optional
        Default :func:`cliplab.surgery.longclip.longclip_world` (seed 2, 1-3 objects).
    batch_size, lr, weight_decay, seed, log_every
        :class:`~cliplab.train.TrainConfig` fields.
    warmup_steps : int, optional
        Default a tenth of ``steps``.

    Returns
    -------
    SoftPromptComp

    Raises
    ------
    UsageError
        Bad ``steps``/``k``/``batch_size``, or a text tower that cannot read soft tokens.
    """
    check_backbone("backbone", backbone)
    _check_text_tower(backbone)
    check_positive_int("steps", steps)
    check_positive_int("k", k)
    check_positive_int("batch_size", batch_size)
    if k + 2 > backbone.context_length:
        raise UsageError(f"k={k} soft tokens plus start and end do not fit the context of {backbone.context_length}")
    if train_set is None:
        from ..surgery.longclip import longclip_world

        train_set = LongCaptionIds(world if world is not None else longclip_world(), backbone.tokenizer,
                                   max_tokens=max_tokens)
    width = backbone.model.token_embedding.weight.shape[1]
    with torch.random.fork_rng(devices=[]):                # a seeded start that leaves the caller's RNG alone
        torch.manual_seed(seed)
        compressor = SoftPromptCompressor(width, k=k, max_tokens=max_tokens, layers=layers,
                                          heads=max(1, math.gcd(width, 4)))
    comp = SoftPromptComp(backbone, compressor)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         warmup_steps=max(steps // 10, 1) if warmup_steps is None else warmup_steps,
                         seed=seed, ckpt_every=0, log_every=log_every, device=str(backbone.device))
    with contextlib.ExitStack() as stack:
        if out is None:
            out = stack.enter_context(tempfile.TemporaryDirectory())
        config.out_dir = str(out)
        stack.enter_context(frozen(backbone.model))
        comp.module.train()
        Trainer(comp.module, None, None, train_set, config, progress=progress, objective=SoftPromptCompLoss(),
                preprocess_cfg=backbone.preprocess_cfg).fit()
    comp.module.eval()
    return comp
