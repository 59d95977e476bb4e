"""LightCap: captioning from CLIP concepts and grid features with a light decoder.

Wang et al., "Efficient Image Captioning for Edge Devices", AAAI 2023, arXiv:2212.08985
(no public code; 136.6 CIDEr on COCO Karpathy test with 40 M parameters, 188 ms per image
on a phone CPU).  LightCap keeps CLIP frozen and adds three small parts:

1. **Concept extractor.**  A vocabulary V of concept words is embedded by CLIP's text tower,
   ``t_v = normalize(text("a photo of a {v}"))``; the image and its regions r (boxes of a
   tiny class-agnostic detector) are embedded, ``e_r``; a concept's score is the best
   region's, ``s_v = max_r p_r(v)`` with ``p_r = softmax_v(100 cos(e_r, t_v))``, and the
   top-K concepts are kept (K = 20, a Visual Genome vocabulary).
2. **Cross-modal modulator.**  The concept embeddings give channel weights of the CLIP grid
   features: ``m = sigmoid(FC(ReLU(FC(c))))``, ``g' = g * m``, here with ``c = mean_k t_k``.
3. **Fusion and decoding** of the modulated grid features and the concepts by a small
   transformer (TinyBERT with ensemble heads in the paper).

Here (:class:`ConceptExtractor`, :class:`Modulator`, :class:`LightCap`) the decoder is
:class:`~cliplab.generative.captioner.CaptionDecoder` (open_clip's ``MultimodalTransformer``:
causal self-attention, then cross-attention), width 64 against the plain captioner's 128,
cross-attending to ``[Linear(g'); Linear(t_k)]``; it trains with the plain captioner's
teacher-forced cross-entropy (:class:`~cliplab.generative.captioner.CaptionObjective`)
through the one Trainer, the CLIP model frozen.  Defaults: 2 layers, 4 heads, top 3 colours
+ 3 shapes + 1 size + 3 positions (K = 10), modulator reduction 4.

Deviations from the paper:

- vocabulary: the ShapesWorld colours, shapes, sizes and positions (8 + 10 + 2 + 9 words),
  not Visual Genome's; the softmax runs within each kind, and the top concepts are kept per
  kind (K = 10 in all, not 20);
- regions: the whole image, its four quadrants and its centre (half-side crops resized to
  the model input), not the boxes of a detector;
- score: ``s_v = p_whole(v) + max_crops p_r(v)``, not the plain max over regions: the 64 px
  model's softmax saturates at 1 on several crops (fragments of an object), and the whole
  image then breaks the tie (on 200 test scenes the top shape of one-object scenes is right
  for 78 % with this score, 62 % with the plain max; the scenes' shapes are in the top 3 for
  0.75 either way);
- the extractor is CLIP-only (zero-shot, nothing of it trained);
- concepts enter the decoder as their (frozen) CLIP text embeddings through one linear map,
  not as word tokens of a BERT vocabulary;
- one autoregressive decoder, not TinyBERT with an ensemble of heads; no distillation from a
  large captioner, no pre-training: trained on ShapesWorld captions only.

Size and latency are measured against the plain captioner by ``benchmarks/caption_shapes.py``
(:func:`~cliplab.generative.captioner.head_size`,
:func:`~cliplab.generative.captioner.caption_latency`); the extractor's crops cost five more
passes of the (frozen) image tower per image.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from .captioner import CAPTION_HEADS, POSITIONS, CaptionHead, _base_config, _vision_width

TEMPLATE = "a photo of a {}"
"""The concept prompt (LightCap's retrieval text)."""

DEFAULT_TOP_K = {"color": 3, "shape": 3, "size": 1, "position": 3}
"""Concepts kept per kind (K = 10 in all)."""

REGIONS = ((0.0, 0.0), (0.0, 0.5), (0.5, 0.0), (0.5, 0.5), (0.25, 0.25))
"""Top-left corners (y, x), as fractions of the side, of the half-side crops (quadrants, centre)."""


def shapes_concepts() -> dict[str, list[str]]:
    """The concept vocabulary of ShapesWorld: kind -> words."""
    from ..data.shapes import COLORS, SHAPES, SIZES

    return {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES), "position": list(POSITIONS)}


def region_crops(images: torch.Tensor, regions: Sequence[tuple[float, float]] = REGIONS) -> torch.Tensor:
    """The whole images and their half-side crops resized to the input: (B, 1 + R, 3, H, W)."""
    B, C, H, W = images.shape
    out = [images]
    for fy, fx in regions:
        y, x = int(round(fy * H)), int(round(fx * W))
        crop = images[:, :, y:y + H // 2, x:x + W // 2]                               # (B, 3, H/2, W/2)
        out.append(F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False))
    return torch.stack(out, 1)


class ConceptExtractor(nn.Module):
    """LightCap's concept retrieval with a frozen CLIP model (step 1 of the module docstring).

    Parameters
    ----------
    backbone : cliplab.Backbone
    concepts : dict of str to list of str, optional
        Kind -> words (default :func:`shapes_concepts`).
    top_k : dict of str to int, optional
        Concepts kept per kind (default :data:`DEFAULT_TOP_K`).

    Attributes
    ----------
    words : list of str
        All concept words, kind after kind (V).
    text : Tensor (V, D)
        L2-normalised ``"a photo of a {v}"`` embeddings (a buffer, not saved).
    """

    def __init__(self, backbone, concepts: dict | None = None, top_k: dict | None = None):
        super().__init__()
        self.concepts = {k: list(v) for k, v in (concepts or shapes_concepts()).items()}
        self.top_k = dict(top_k or DEFAULT_TOP_K)
        for kind, words in self.concepts.items():
            k = self.top_k.get(kind, 0)
            if not words or not 0 <= k <= len(words):
                raise UsageError(f"top_k[{kind!r}] = {k} must be within 0..{len(words)} (the words of that kind)")
        self.words = [w for words in self.concepts.values() for w in words]
        self.spans = []
        start = 0
        for kind, words in self.concepts.items():
            self.spans.append((kind, start, start + len(words)))
            start += len(words)
        text = torch.from_numpy(backbone.encode_texts([TEMPLATE.format(w) for w in self.words], progress=False))
        self.register_buffer("text", text, persistent=False)                          # (V, D)

    @property
    def k(self) -> int:
        """K, the number of concepts kept per image."""
        return sum(self.top_k.get(kind, 0) for kind, _, _ in self.spans)

    def scores(self, region_features: torch.Tensor) -> torch.Tensor:
        """Concept scores (B, V): per-kind softmax(100 cos) per region; whole image + max over crops.

        ``s_v = p_whole(v) + max_crops p_r(v)``: the paper's max over regions, with the whole
        image counted once more, since the small model's softmax saturates at 1 on several
        crops (fragments of an object) and the whole image then decides between them.

        Parameters
        ----------
        region_features : Tensor (B, R, D)
            Image embeddings of the whole image (first) and its crops (any scale; normalised here).
        """
        logits = 100 * F.normalize(region_features, dim=-1) @ self.text.T                # (B, R, V)
        probs = torch.cat([logits[..., a:b].softmax(-1) for _, a, b in self.spans], -1)  # per kind
        return probs[:, 0] + probs[:, 1:].amax(1)                                         # (B, V)

    def top(self, scores: torch.Tensor) -> torch.Tensor:
        """Indices (B, K) of the top concepts of each kind, kind after kind."""
        parts = [scores[:, a:b].topk(self.top_k[kind], dim=-1).indices + a
                 for kind, a, b in self.spans if self.top_k.get(kind, 0)]
        return torch.cat(parts, -1)

    def forward(self, backbone, images: torch.Tensor):
        """Concepts of preprocessed images (B, 3, H, W), read by ``backbone``'s frozen image tower.

        Returns
        -------
        (LongTensor (B, K), Tensor (B, V), Tensor (B, T, W))
            Top concept indices into :attr:`words`, all scores, and the whole image's grid
            (patch) tokens, which LightCap modulates.
        """
        B = images.shape[0]
        crops = region_crops(images)                                                 # (B, R, 3, H, W)
        pooled, tokens = backbone.image_token_batch(crops.flatten(0, 1))             # (B*R, D), (B*R, T, W)
        pooled = pooled.view(B, crops.shape[1], -1)                                  # (B, R, D)
        grid = tokens.view(B, crops.shape[1], *tokens.shape[1:])[:, 0]               # (B, T, W) whole image
        scores = self.scores(pooled)
        return self.top(scores), scores, grid

    def extract(self, backbone, images: torch.Tensor) -> list[list[str]]:
        """The top concept words of each image (kind after kind)."""
        idx, _, _ = self(backbone, images)
        return [[self.words[i] for i in row] for row in idx.tolist()]


class Modulator(nn.Module):
    """LightCap's cross-modal modulator: FC-ReLU-FC-Sigmoid channel weights from concepts.

    ``m = sigmoid(W2 relu(W1 c))`` with ``c`` the mean of the K concept embeddings (B, D);
    the output (B, W_vision) multiplies every grid token's channels.
    """

    def __init__(self, concept_dim: int, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, concept_dim // reduction)
        self.fc1 = nn.Linear(concept_dim, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, concepts: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Modulated grid (B, T, W) from concept embeddings (B, K, D) and grid tokens (B, T, W)."""
        m = torch.sigmoid(self.fc2(F.relu(self.fc1(concepts.mean(1)))))            # (B, W)
        return grid * m[:, None, :]


@CAPTION_HEADS.register("lightcap", help="LightCap: CLIP concepts + modulated grid features, light decoder")
class LightCap(CaptionHead):
    """LightCap on a frozen Backbone (see the module docstring). Build with :meth:`build`."""

    kind = "lightcap"

    def __init__(self, backbone, config: dict):
        super().__init__(backbone, config)
        self.extractor = ConceptExtractor(backbone, self.config["concepts"], self.config["top_k"])
        D, Wv, W = self.extractor.text.shape[1], int(self.config["vision_width"]), self.config["width"]
        self.modulator = Modulator(D, Wv)
        self.grid_proj = nn.Linear(Wv, W)
        self.concept_proj = nn.Linear(D, W)

    @classmethod
    def build(cls, backbone, *, vocab: Sequence[int] | None = None, width: int = 64, layers: int = 2,
              heads: int = 4, context_length: int | None = None, concepts: dict | None = None,
              top_k: dict | None = None, seed: int = 0) -> "LightCap":
        """A new, untrained LightCap head on ``backbone`` (arguments as
        :meth:`Captioner.build <cliplab.generative.captioner.Captioner.build>`, plus the
        concept vocabulary and per-kind ``top_k`` of :class:`ConceptExtractor`)."""
        config = _base_config(backbone, vocab, width, layers, heads, context_length)
        config.update(vision_width=_vision_width(backbone), concepts=concepts or shapes_concepts(),
                      top_k=top_k or dict(DEFAULT_TOP_K))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(backbone, config).to(backbone.device)

    def memory(self, images: torch.Tensor) -> torch.Tensor:
        idx, _, grid = self.extractor(self.backbone, images)                            # (B, K), _, (B, T, Wv)
        concepts = self.extractor.text[idx]                                          # (B, K, D)
        grid = self.modulator(concepts, grid)                                        # (B, T, Wv)
        return torch.cat([self.grid_proj(grid), self.concept_proj(concepts)], 1)     # (B, T + K, W)

    def concepts_of(self, images: torch.Tensor) -> list[list[str]]:
        """The concept words the extractor retrieves for preprocessed images (B, 3, H, W)."""
        return self.extractor.extract(self.backbone, images)
