"""Image-caption alignment scores and misaligned-word detection.

**CLIPScore** (Hessel et al., "CLIPScore: A Reference-free Evaluation Metric for Image
Captioning", EMNLP 2021, arXiv:2104.08718; reference jmhessel/clipscore ``clipscore.py``):

- CLIP-S(c, v) = w * max(cos(E_v, E_c), 0), w = 2.5, the caption prefixed with
  "A photo depicts " (eq. 1);
- RefCLIP-S(c, R, v) = H-Mean(CLIP-S(c, v), max(max_{r in R} cos(E_c, E_r), 0)) (eq. 2), the
  references encoded with the same prefix.  Deviation: the reference code leaves out the
  ``max(., 0)`` on the reference side; it only matters when every reference has a negative
  cosine, and a harmonic mean of 0 and anything is 0 here (the code divides 0 by 0).

**CLIP4DM** (Nam et al., "Extract Free Dense Misalignment from CLIP", AAAI 2025,
arXiv:2412.18404; naver-ai/CLIP4DM, whose code was not public when this was written):
attribution of the image-text cosine to the caption's tokens through the text tower's
attention, without a positive clamp and summed over layers instead of rolled out:

    R = (1 / |L|) sum_{l in L} mean_heads(dcos/dA_l * A_l),   L = the last 3 layers,

the token score r_i = R[EOT, i] for the tokens between start and end of text; a word's score
is the mean over its BPE tokens (punctuation and the prefix dropped).  A negative score marks
a word that pulls the caption away from the image.  Words are flagged as misaligned by
``mode="most_negative"`` (the argmin; FOIL-style single-error captions) or
``mode="threshold"`` (r < eps, eps = -5e-5 for ViT-B/32; the scale depends on the model).

**F-CLIPScore** = S_neg * (1 - CLIP-S / w), S_neg the sum of the flagged words' scores
(<= 0); closer to 0 means better aligned.  This is the form of the method notes taken from
the authors' evaluation code; the printed equation of the paper was not checked.
"""

from __future__ import annotations

import logging
import math
import string
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError, UsageError
from ..validation import check_choice, check_number, check_positive_int

logger = logging.getLogger(__name__)

__all__ = ["PREFIX", "clip_score", "ClipScorer", "ref_clip_score", "f_clip_score", "WordScores", "word_attributions",
           "flag_words"]

#: The caption prefix of CLIPScore and CLIP4DM.
PREFIX = "A photo depicts "
_PUNCT = set(string.punctuation)


def _rows(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise UsageError(f"{name} must be (N, D) features, got shape {a.shape}")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    if not np.all(norms > 0):
        raise UsageError(f"{name} has a zero vector")
    return a / norms


def clip_score(image_features, text_features, *, w: float = 2.5) -> np.ndarray:
    """CLIP-S = w * max(cos(v, c), 0) per pair (Hessel et al. 2021, eq. 1).

    Parameters
    ----------
    image_features, text_features : array (N, D)
        Paired features (normalised here); the texts encoded with :data:`PREFIX`.
    w : float, default=2.5

    Returns
    -------
    ndarray (N,)
    """
    v, c = _rows(image_features, "image_features"), _rows(text_features, "text_features")
    if v.shape != c.shape:
        raise UsageError(f"image_features {v.shape} and text_features {c.shape} must be paired")
    return w * np.clip(np.sum(v * c, axis=1), 0, None)                   # eq. (1)


class ClipScorer:
    """CLIPScore of paired images and captions with a Backbone: ``scorer(images, captions) -> (N,)``.

    The scorer that :func:`cliplab.train.caption_quality.filter_by_score` takes: each
    caption is encoded with :data:`PREFIX` and scored against its own image by
    :func:`clip_score`.

    Parameters
    ----------
    backbone : Backbone
    w : float, default=2.5
    batch_size : int, default=256
    """

    def __init__(self, backbone, *, w: float = 2.5, batch_size: int = 256):
        self.backbone, self.w, self.batch_size = backbone, w, batch_size

    def __call__(self, images, captions) -> np.ndarray:
        if len(images) != len(captions):
            raise UsageError(f"{len(images)} images but {len(captions)} captions; they must be paired")
        if not len(captions):
            return np.zeros(0)
        v = self.backbone.encode_images(list(images), batch_size=self.batch_size, progress=False).features
        c = self.backbone.encode_texts([PREFIX + t for t in captions], batch_size=self.batch_size, progress=False)
        return clip_score(v, c, w=self.w)                                    # (N,)


def ref_clip_score(image_features, text_features, references, *, w: float = 2.5) -> np.ndarray:
    """RefCLIP-S: harmonic mean of CLIP-S and the best reference cosine (Hessel et al. 2021, eq. 2).

    Parameters
    ----------
    image_features, text_features : array (N, D)
    references : sequence of N arrays (R_i, D)
        Features of each candidate's reference captions (R_i >= 1).
    w : float, default=2.5

    Returns
    -------
    ndarray (N,)
    """
    cs = clip_score(image_features, text_features, w=w)
    c = _rows(text_features, "text_features")
    if len(references) != len(c):
        raise UsageError(f"references: {len(references)} sets for {len(c)} candidates")
    ref = np.array([max(float(np.max(_rows(r, "references") @ ci)), 0.0) for r, ci in zip(references, c)])
    with np.errstate(invalid="ignore", divide="ignore"):
        h = 2 * cs * ref / (cs + ref)                                     # eq. (2)
    return np.where(cs + ref > 0, h, 0.0)


def f_clip_score(negative_sum, clip_scores, *, w: float = 2.5) -> np.ndarray:
    """F-CLIPScore = S_neg * (1 - CLIP-S / w): 0 for a caption with no flagged word, more negative = worse."""
    return np.asarray(negative_sum, dtype=np.float64) * (1 - np.asarray(clip_scores, dtype=np.float64) / w)


@dataclass
class WordScores:
    """CLIP4DM attribution of one caption.

    Attributes
    ----------
    caption : str
    words : list of str
        The caption's words (whitespace split, punctuation kept on the word).
    scores : ndarray (len(words),)
        Mean attribution of each word's tokens; NaN for a word of punctuation only.
    clip_score : float
        CLIP-S of the caption with the image.
    token_scores : ndarray (T,)
        The per-token r_i between start and end of text (prefix included).
    """

    caption: str
    words: list[str]
    scores: np.ndarray
    clip_score: float
    token_scores: np.ndarray = field(repr=False)

    def flagged(self, mode: str = "most_negative", eps: float = -5e-5) -> list[int]:
        """Indices of the words flagged as misaligned (:func:`flag_words`)."""
        return flag_words(self.scores, mode=mode, eps=eps)

    def f_clip_score(self, mode: str = "most_negative", eps: float = -5e-5, w: float = 2.5) -> float:
        """F-CLIPScore of this caption with the flagged words of ``mode``."""
        neg = float(sum(self.scores[i] for i in self.flagged(mode, eps)))
        return float(f_clip_score(neg, self.clip_score, w=w))


def flag_words(scores, *, mode: str = "most_negative", eps: float = -5e-5) -> list[int]:
    """Misaligned words: the most negative one (if negative), or all below ``eps``."""
    check_choice("mode", mode, ("most_negative", "threshold"))
    s = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(s)
    if not ok.any():
        return []
    if mode == "most_negative":
        i = int(np.nanargmin(np.where(ok, s, np.inf)))
        return [i] if s[i] < 0 else []
    return [int(i) for i in np.flatnonzero(ok & (s < eps))]


def _word_spans(tokenizer, text: str, n_prefix_words: int):
    """Per word of ``text``: (word, slice of its content tokens in ``tokenizer.encode(text)``)."""
    words, spans, pos = text.split(), [], 0
    for w in words:
        ids = tokenizer.encode(w)
        core = w.strip(string.punctuation)
        n_core = len(tokenizer.encode(core)) if core else 0
        lead = len(tokenizer.encode(w[:len(w) - len(w.lstrip(string.punctuation))])) if core else 0
        spans.append(slice(pos + lead, pos + lead + n_core))
        pos += len(ids)
    if pos != len(tokenizer.encode(text)):
        raise UsageError(f"cannot map the tokens of {text!r} back to its words")
    return words[n_prefix_words:], spans[n_prefix_words:]


def _text_with_attention(model, tokens, n_layers: int):
    """Text features (B, D) and the attention probabilities (B, H, L, L) of the last ``n_layers``.

    The forward of open_clip's text tower (as ``encode_token_embeddings``) with the attention
    of the last blocks written out, so that its probabilities take part in autograd.
    """
    import torch
    import torch.nn.functional as F
    from open_clip.transformer import text_global_pool

    m = model
    L = tokens.shape[1]
    x = m.token_embedding(tokens) + m.positional_embedding[:L]          # (B, L, W)
    mask = m.attn_mask[:L, :L]
    blocks = m.transformer.resblocks
    if not m.transformer.batch_first:
        raise UsageError("word attribution needs a batch-first open_clip text tower")
    probs = []
    for j, block in enumerate(blocks):
        if j < len(blocks) - n_layers:
            x = block(x, attn_mask=mask)
            continue
        attn = block.attn
        h = block.ln_1(x)
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)   # (B, L, W) each
        B, _, W = q.shape
        H = attn.num_heads
        q, k, v = (t.reshape(B, L, H, W // H).transpose(1, 2) for t in (q, k, v))      # (B, H, L, W/H)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(W // H) + mask, dim=-1)  # (B, H, L, L)
        if a.requires_grad:
            a.retain_grad()
        probs.append(a)
        out = (a @ v).transpose(1, 2).reshape(B, L, W)
        x = x + block.ls_1(attn.out_proj(out))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    x = m.ln_final(x)
    x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
    x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
    return x, probs


def word_attributions(backbone, image_features, captions, *, prefix: str = PREFIX, n_layers: int = 3,
                      w: float = 2.5, batch_size: int = 64) -> list[WordScores]:
    """CLIP4DM attribution of every word of every caption to its image's cosine.

    Parameters
    ----------
    backbone : Backbone
        An open_clip ``CLIP`` with its own text tower.
    image_features : array (N, D)
        Features of the images (``backbone.encode_images(...).features``).
    captions : sequence of N str
        One caption per image (without the prefix).
    prefix : str, default="A photo depicts "
    n_layers : int, default=3
        Last text layers summed (all of them in a shallower tower).
    w : float, default=2.5
        CLIPScore weight.
    batch_size : int, default=64

    Returns
    -------
    list of WordScores

    Raises
    ------
    DataError
        A caption too long for the context (its end-of-text token would be cut).
    UsageError
        A model without an open_clip text tower, or mismatched lengths.
    """
    import torch
    from open_clip.model import CLIP

    m = backbone.model
    if not isinstance(m, CLIP) or getattr(m, "attn_mask", None) is None:
        raise UsageError(f"word attribution needs an open_clip CLIP text tower; {type(m).__name__} has none")
    captions = list(captions)
    v = _rows(image_features, "image_features").astype(np.float32)
    if len(v) != len(captions):
        raise UsageError(f"{len(v)} images but {len(captions)} captions")
    n_layers = min(check_positive_int("n_layers", n_layers), len(m.transformer.resblocks))
    check_number("w", w, minimum=0, strict_minimum=True)
    tok = backbone.tokenizer
    n_prefix = len(prefix.split())
    texts = [prefix + c for c in captions]
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        ids = [[tok.sot_token_id] + tok.encode(t) + [tok.eot_token_id] for t in chunk]
        too_long = [t for t, i in zip(chunk, ids) if len(i) > backbone.context_length]
        if too_long:
            raise DataError(f"caption too long for the {backbone.context_length}-token context of "
                            f"{backbone.name}: {too_long[0]!r}")
        L = max(map(len, ids))
        tokens = torch.zeros(len(ids), L, dtype=torch.long)
        for i, row in enumerate(ids):
            tokens[i, :len(row)] = torch.tensor(row)
        tokens = tokens.to(backbone.device)
        img = torch.from_numpy(v[start:start + batch_size]).to(backbone.device)
        with torch.enable_grad():
            feats, probs = _text_with_attention(m, tokens, n_layers)
            cos = (torch.nn.functional.normalize(feats.float(), dim=-1) * img).sum(-1)     # (B,)
            cos.sum().backward()                     # each caption's cosine depends on its own A only
        R = sum((a.grad * a).mean(dim=1) for a in probs).detach() / len(probs)   # (B, L, L)
        cos = cos.detach()
        m.zero_grad(set_to_none=True)
        for i, text in enumerate(chunk):
            eot = len(ids[i]) - 1
            r = R[i, eot, 1:eot].detach().cpu().double().numpy()        # (T,) tokens of the text
            words, spans = _word_spans(tok, text, n_prefix)
            scores = np.array([r[s].mean() if s.stop > s.start else np.nan for s in spans])
            out.append(WordScores(captions[start + i], words, scores,
                                  float(w * max(float(cos[i]), 0.0)), r))
    return out
