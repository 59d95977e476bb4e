"""A small image captioner: a text decoder cross-attending to a frozen Backbone's image tokens.

The decoder is open_clip's own :class:`open_clip.transformer.MultimodalTransformer` (CoCa's
text decoder: per layer a causal self-attention block, then a cross-attention block over
the image tokens, each with its MLP), fed with learned token and position embeddings and
projected onto the caption vocabulary.  It reads the patch tokens of the Backbone's vision
tower (B, T, W) through one linear map; the Backbone is frozen (it is not a submodule of the
head, its weights never change, and its ``requires_grad`` flags and train mode are switched
off only while :func:`train_captioner` runs, then restored) and only the decoder trains, through the one
:class:`~cliplab.train.Trainer`, with :class:`CaptionObjective`: teacher-forced next-token
cross-entropy on the Backbone's own tokenizer's ids::

    h = Decoder(E[w_<t] + P, Linear(tokens(image)))            # causal self-attn + cross-attn
    L = - sum_t log softmax(h_t W_out)[w_t] / #tokens         # over tokens up to end-of-text

Captions are decoded greedily (or by beam search, ``beam > 1``) from the start-of-text token
to the end-of-text token.  The trained head is saved as ``captioner.safetensors`` (decoder
weights only) with ``captioner.json`` (architecture, vocabulary, the Backbone's spec and
fingerprint) and read back by :func:`load_captioner`, which refuses a missing, corrupt or
mismatched file with :class:`~cliplab.errors.ModelLoadError` (exit code 3).

Caption quality: :func:`cider` (CIDEr-D of ``pycocoevalcap``, the COCO caption scorer; extra
``generative``) and :func:`attribute_accuracy` (colours, shapes and counts parsed from the
captions by :func:`parse_caption`, against a ShapesWorld scene's ground truth).

Design choices (deviations from a full-size captioner such as CoCa's):

- the output layer covers only the token ids that occur in the training captions (a
  sub-vocabulary of the Backbone's BPE tokenizer, :func:`caption_vocabulary`, plus an
  unknown-token slot), not all 49,408 BPE ids: with a 128-wide decoder the full output
  layer would hold 6.3 M parameters and dominate the compute, for ~60 words of ShapesWorld;
- no KV cache in decoding: captions are short (< 32 tokens) and the decoder tiny.

Examples
--------
>>> import cliplab                                                    # doctest: +SKIP
>>> from cliplab.generative.captioner import Captioner, train_captioner
>>> bb = cliplab.load("shapes-tiny")                                  # doctest: +SKIP
>>> head = train_captioner(Captioner.build(bb), steps=300, out_dir="runs/cap")  # doctest: +SKIP
>>> head.generate(images)                                             # doctest: +SKIP
['a small red star at the top left']
"""

from __future__ import annotations

import abc

import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.images import DEFAULT_MAX_PIXELS
from ..errors import CheckpointMismatch, DataError, ModelLoadError, UsageError
from ..registry import Registry
from ..train.losses.base import Batch, Objective

logger = logging.getLogger("cliplab.generative.captioner")

FORMAT = "cliplab-caption-head"
FORMAT_VERSION = 1
CONFIG_NAME = "captioner.json"
WEIGHTS_NAME = "captioner.safetensors"
UNK = -1
"""BPE id recorded for the unknown-token slot of a sub-vocabulary (no BPE id)."""
MAX_BEAM = 64
"""The widest beam :meth:`CaptionHead.generate_ids` accepts (each image decodes ``beam`` hypotheses)."""

POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
"""The position words of ShapesWorld captions (where an object's centre lies on a 3x3 grid)."""

CAPTION_HEADS: Registry = Registry("caption head")
"""The caption heads: classes with ``build(backbone, **options)`` (:class:`Captioner`,
:class:`~cliplab.generative.lightcap.LightCap`), each with a one-line ``help``."""

_INSTALL_HINT = "caption scores need pycocoevalcap: pip install 'cliplab[generative]'"


# --------------------------------------------------------------------------- vocabulary
def caption_vocabulary(tokenizer, texts: Sequence[str]) -> list[int]:
    """The BPE ids a head may read and emit: start, end, an unknown slot, then every id of ``texts``.

    Parameters
    ----------
    tokenizer : open_clip tokenizer
        With ``encode``, ``sot_token_id`` and ``eot_token_id`` (``SimpleTokenizer``).
    texts : sequence of str
        Captions covering the words to be generated.

    Returns
    -------
    list of int
        ``[sot, eot, UNK, id_1 < id_2 < ...]``; position in the list = output index.
    """
    if not hasattr(tokenizer, "encode") or not hasattr(tokenizer, "eot_token_id"):
        raise UsageError(f"captioning needs a BPE tokenizer with encode(); got {type(tokenizer).__name__}")
    ids = {int(i) for t in texts for i in tokenizer.encode(t)}
    ids -= {tokenizer.sot_token_id, tokenizer.eot_token_id}
    return [int(tokenizer.sot_token_id), int(tokenizer.eot_token_id), UNK, *sorted(ids)]


def _check_vocab(vocab, tokenizer) -> list[int]:
    """``vocab`` as a list of ints: start, end, then ids within the tokenizer (or UNK), else UsageError."""
    size = int(getattr(tokenizer, "vocab_size", None) or len(getattr(tokenizer, "encoder", ())) or 0)
    if not isinstance(vocab, (list, tuple)) or len(vocab) < 3:
        raise UsageError(f"vocab must be a list of at least 3 token ids, got {type(vocab).__name__}")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vocab):
        raise UsageError("vocab must hold integer token ids")
    bad = [int(v) for v in vocab if v != UNK and not 0 <= v < (size or v + 1)]
    if bad:
        raise UsageError(f"vocab id {bad[0]} is outside the tokenizer's {size} ids")
    if (vocab[0], vocab[1]) != (tokenizer.sot_token_id, tokenizer.eot_token_id):
        raise UsageError("vocab must start with the tokenizer's start and end token ids")
    return [int(v) for v in vocab]


def shapes_caption_texts(world, n_scenes: int = 500) -> list[str]:
    """Texts covering the caption words of a ShapesWorld: the captions of its first
    ``n_scenes`` training scenes and every colour, shape, size and position phrase."""
    from ..data.shapes import COLORS, SHAPES, SIZES
    from ..data.shapes.captions import position_phrase

    _, scenes = world.render_batch("train", list(range(min(n_scenes, len(world.split("train"))))))
    texts = [c for s in scenes for c in s.captions]
    texts += [" ".join((*COLORS, *SHAPES, *SIZES)), " ".join(position_phrase(p) for p in POSITIONS),
              " ".join(_COUNT_WORDS) + " shapes: , and ."]
    return texts


# --------------------------------------------------------------------------- modules
class CaptionDecoder(nn.Module):
    """Token embedding + positions, open_clip's ``MultimodalTransformer``, output over the vocabulary.

    Parameters
    ----------
    vocab_size : int
        V, the size of the sub-vocabulary.
    width, layers, heads : int
        W of the decoder, decoder layers (each: causal self-attention + cross-attention), heads.
    context_length : int
        L, the longest token sequence (start token included).
    """

    def __init__(self, vocab_size: int, *, width: int, layers: int, heads: int, context_length: int):
        super().__init__()
        from open_clip.transformer import MultimodalTransformer

        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = MultimodalTransformer(width=width, layers=layers, heads=heads,
                                                 context_length=context_length, output_dim=vocab_size)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.transformer.text_projection, std=width ** -0.5)

    def forward(self, memory: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of the next token at each position.

        Parameters
        ----------
        memory : Tensor (B, M, W)
            What the cross-attention reads (image tokens, concepts).
        ids : LongTensor (B, T)
            Sub-vocabulary ids, starting with the start token; T <= L.
        """
        x = self.token_embedding(ids) + self.positional_embedding[:ids.shape[1]]   # (B, T, W)
        return self.transformer(memory, x)                                           # (B, T, V)


class CaptionHead(nn.Module, metaclass=abc.ABCMeta):
    """What every caption head shares: frozen Backbone, vocabulary, decoder, decoding, save.

    A subclass sets ``kind`` and implements :meth:`memory` (images -> what the decoder
    cross-attends to) and ``build``.

    Parameters
    ----------
    backbone : cliplab.Backbone
        Frozen; its model is read (:attr:`clip`) but is not a submodule: the head's
        ``state_dict``, ``to``, ``train`` and optimizer never see it, and its flags and
        mode are the caller's (:func:`train_captioner` freezes it only while training).
    config : dict
        JSON-serialisable architecture: ``vocab`` (BPE ids), ``width``, ``layers``,
        ``heads``, ``context_length`` and the subclass's own keys.
    """

    kind = ""

    def __init__(self, backbone, config: dict):
        super().__init__()
        self.backbone = backbone
        self.config = dict(config)
        self.tokenizer = backbone.tokenizer
        vocab = _check_vocab(self.config["vocab"], self.tokenizer)
        self.register_buffer("vocab", torch.tensor(vocab, dtype=torch.long), persistent=False)   # (V,)
        lookup = torch.full((max(max(vocab), self.tokenizer.eot_token_id) + 1,), 2, dtype=torch.long)
        for sub, bpe in enumerate(vocab):
            if bpe >= 0:
                lookup[bpe] = sub
        self.register_buffer("lookup", lookup, persistent=False)                                  # BPE -> sub id
        self.decoder = CaptionDecoder(len(vocab), width=self.config["width"], layers=self.config["layers"],
                                      heads=self.config["heads"], context_length=self.config["context_length"])

    # ------------------------------------------------------------------ model
    @property
    def clip(self) -> nn.Module:
        """The Backbone's model (not a submodule of the head)."""
        return self.backbone.model

    @abc.abstractmethod
    def memory(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoder cross-attends to: (B, M, W) from preprocessed images (B, 3, H, W)."""

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, V) of sub-vocabulary ``ids`` (B, T) given images (B, 3, H, W)."""
        return self.decoder(self.memory(images), ids)

    def to_sub_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """BPE ids (B, T) of the Backbone's tokenizer -> sub-vocabulary ids (B, T) (unknown -> slot 2)."""
        known = (tokens >= 0) & (tokens < len(self.lookup))
        return torch.where(known, self.lookup[tokens.clamp(0, len(self.lookup) - 1)], 2)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights (the Backbone is not part of the head)."""
        return dict(self.state_dict())

    def head_parameters(self) -> int:
        """Number of parameters of the head (the frozen Backbone excluded)."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def generate_ids(self, images: torch.Tensor, *, beam: int = 1, max_length: int | None = None) -> list[list[int]]:
        """Decoded BPE ids (without start/end tokens) per image of a preprocessed batch (B, 3, H, W).

        Greedy for ``beam == 1``; otherwise beam search keeping ``beam`` hypotheses per
        image, finished ones ranked by mean token log-probability (length-normalised).
        Deterministic: no sampling.
        """
        beam = self.check_beam(beam)
        L = min(int(max_length or self.config["context_length"]), self.config["context_length"])
        was_training = self.training
        self.eval()
        try:
            memory = self.memory(images)                                            # (B, M, W)
            rows = (self._greedy(memory, L) if beam == 1
                    else [self._beam(memory[i:i + 1], L, int(beam)) for i in range(len(memory))])
        finally:
            self.train(was_training)
        vocab = self.vocab.tolist()
        return [[vocab[i] for i in row if vocab[i] >= 0] for row in rows]

    def check_beam(self, beam) -> int:
        """``beam`` as an int within 1..:data:`MAX_BEAM` and the vocabulary size, else UsageError."""
        if isinstance(beam, bool) or not isinstance(beam, (int, np.integer)) or beam < 1:
            raise UsageError(f"beam must be a positive integer, got {beam!r}")
        limit = min(MAX_BEAM, len(self.config["vocab"]))
        if beam > limit:
            raise UsageError(f"beam {beam} is too wide: at most {limit} (the vocabulary has "
                             f"{len(self.config['vocab'])} tokens; the limit is {MAX_BEAM})")
        return int(beam)

    def _next_logprobs(self, memory: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(memory, ids)[:, -1].float()                           # (B, V)
        logits[:, 0] = float("-inf")   # the start token is never generated
        logits[:, 2] = float("-inf")   # nor the unknown slot
        return logits.log_softmax(-1)

    def _greedy(self, memory: torch.Tensor, L: int) -> list[list[int]]:
        B = memory.shape[0]
        ids = torch.zeros(B, 1, dtype=torch.long, device=memory.device)            # (B, 1) start token
        done = torch.zeros(B, dtype=torch.bool, device=memory.device)
        for _ in range(L - 1):
            nxt = self._next_logprobs(memory, ids).argmax(-1)                       # (B,)
            nxt = torch.where(done, torch.ones_like(nxt), nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == 1
            if bool(done.all()):
                break
        return [_until_end(row[1:]) for row in ids.tolist()]

    def _beam(self, memory: torch.Tensor, L: int, k: int) -> list[int]:
        beams = [([0], 0.0)]
        finished: list[tuple[list[int], float]] = []
        for _ in range(L - 1):
            ids = torch.tensor([b[0] for b in beams], device=memory.device)          # (k', t)
            logp = self._next_logprobs(memory.expand(len(beams), -1, -1), ids)      # (k', V)
            total = torch.tensor([b[1] for b in beams], device=memory.device)[:, None] + logp
            top = total.flatten().topk(min(k, total.numel()))
            beams = []
            for score, flat in zip(top.values.tolist(), top.indices.tolist()):
                b, tok = divmod(flat, logp.shape[1])
                seq = [*ids[b].tolist(), tok]
                if tok == 1:
                    finished.append((seq, score))
                else:
                    beams.append((seq, score))
            if len(finished) >= k or not beams:
                break
        finished.extend(beams)  # unfinished at the length limit
        best = max(finished, key=lambda f: (f[1] / (len(f[0]) - 1), -len(f[0])))
        return _until_end(best[0][1:])

    def generate(self, images: torch.Tensor, *, beam: int = 1, max_length: int | None = None) -> list[str]:
        """Captions (one string per image) of a preprocessed batch (B, 3, H, W)."""
        return [decode_text(self.tokenizer, ids)
                for ids in self.generate_ids(images, beam=beam, max_length=max_length)]

    def iter_captions(self, images, *, beam: int = 1, batch_size: int = 64, on_error: str = "raise",
                      max_pixels: int | None = DEFAULT_MAX_PIXELS, workers: int | None = 0, draft: bool = False,
                      progress: bool | None = None):
        """Caption images batch by batch: yield each batch's result as soon as it is decoded.

        Images are read, preprocessed and cast to the Backbone's device and precision by
        the Backbone's own image path (``Backbone.encode_images``' decoding: safe loading,
        ``draft``, decoding workers); arguments as in :meth:`caption`.

        Yields
        ------
        Captions
            Per batch of ``batch_size`` inputs: ``captions`` of its kept images, ``kept``
            their positions in ``images``, ``skipped`` records (positions in ``images``).
        """
        from dataclasses import replace

        from .._progress import progress_bar
        from ..validation import check_choice, check_positive_int

        check_choice("on_error", on_error, ("raise", "skip"))
        check_positive_int("batch_size", batch_size)
        beam = self.check_beam(beam)
        bb = self.backbone
        items = bb._expand(images)
        batch_size = min(int(batch_size), max(len(items), 1))
        bar = progress_bar(total=len(items), progress=progress if len(items) > batch_size else False,
                           desc="caption", unit="img")
        with bar:
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                # the Backbone's image path; fn keeps the preprocessed batch (B, 3, H, W)
                outs, kept, skipped = bb._run_images(chunk, batch_size=len(chunk), progress=False,
                                                     on_error=on_error, workers=workers, max_pixels=max_pixels,
                                                     draft=draft, fn=lambda batch: batch, desc="caption",
                                                     parallel="threads")
                captions = self.generate(torch.cat(outs), beam=beam) if outs else []
                bar.update(len(chunk))
                yield Captions(captions, [start + k for k in kept],
                               [replace(r, index=start + r.index) for r in skipped])

    def caption(self, images, *, beam: int = 1, batch_size: int = 64, on_error: str = "raise",
                max_pixels: int | None = DEFAULT_MAX_PIXELS, workers: int | None = 0, draft: bool = False,
                progress: bool | None = None) -> "Captions":
        """Caption images given as paths, PIL images, uint8 arrays or preprocessed tensors.

        Parameters
        ----------
        images : sequence of path, PIL image, uint8 array (H, W, 3) or Tensor (3, H, W)
            Decoded safely by the Backbone (``Backbone.encode_images``' image path).
        beam : int, default 1
            1 for greedy decoding, else the beam width (at most :data:`MAX_BEAM` and the
            vocabulary size).
        batch_size : int, default 64
        on_error : {"raise", "skip"}, default "raise"
            A bad image raises :class:`~cliplab.errors.BadImage`, or is skipped and listed.
        max_pixels : int or None
            Decompression-bomb guard (default: the project's limit; None: no limit).
        workers : int, default 0
            Decoding threads (0: in the calling thread; None: up to 4).
        draft : bool, default False
            Reduced-size JPEG decoding (as ``Backbone.encode_images``).

        Returns
        -------
        Captions
            ``captions`` of the kept images, ``kept`` their input positions, ``skipped`` records.

        Raises
        ------
        UsageError
            Bad ``beam``, ``batch_size`` or ``on_error``.
        BadImage
            An unreadable image with ``on_error="raise"``.
        """
        out = Captions([], [], [])
        for part in self.iter_captions(images, beam=beam, batch_size=batch_size, on_error=on_error,
                                       max_pixels=max_pixels, workers=workers, draft=draft, progress=progress):
            out.captions.extend(part.captions)
            out.kept.extend(part.kept)
            out.skipped.extend(part.skipped)
        return out

    # ------------------------------------------------------------------ files
    def save(self, out: str | Path) -> Path:
        """Write ``out/captioner.safetensors`` (head weights) and ``out/captioner.json``.

        Returns
        -------
        pathlib.Path
            The folder.
        """
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.head_state_dict().items()}
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind, "config": self.config,
                "backbone": {"spec": _loadable_spec(self.backbone.name), "fingerprint": self.backbone.fingerprint,
                             "precision": self.backbone.precision}}
        (out / CONFIG_NAME).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        return out


def _loadable_spec(name: str) -> str:
    """The Backbone's spec as recorded: a local file or folder as its absolute path (loadable
    from any working folder); anything else (a bundled or hub name, a surgery name) as is."""
    path = Path(name)
    return str(path.resolve()) if name and path.exists() else name


@dataclass
class Captions:
    """Result of :meth:`CaptionHead.caption`: captions of the kept images, in input order."""

    captions: list[str]
    kept: list[int]
    skipped: list = field(default_factory=list)


def _until_end(row: list[int]) -> list[int]:
    return row[:row.index(1)] if 1 in row else row


def decode_text(tokenizer, ids: Sequence[int]) -> str:
    """BPE ids -> text, with the tokenizer's spaces before punctuation removed."""
    text = tokenizer.decode([int(i) for i in ids]).strip()
    return re.sub(r"\s+([,.:;])", r"\1", re.sub(r"\s+", " ", text))


# --------------------------------------------------------------------------- the plain captioner
@CAPTION_HEADS.register("captioner", help="decoder cross-attending to the Backbone's patch tokens")
class Captioner(CaptionHead):
    """Decoder over the frozen Backbone's patch tokens (B, T, W_vision) mapped to width W.

    Build with :meth:`build`; see the module docstring for the model and the loss.
    """

    kind = "captioner"

    def __init__(self, backbone, config: dict):
        super().__init__(backbone, config)
        vision_width = int(self.config["vision_width"])
        self.image_proj = nn.Linear(vision_width, self.config["width"])

    @classmethod
    def build(cls, backbone, *, vocab: Sequence[int] | None = None, width: int = 128, layers: int = 2,
              heads: int = 4, context_length: int | None = None, seed: int = 0) -> "Captioner":
        """A new, untrained captioner on ``backbone``.

        Parameters
        ----------
        backbone : cliplab.Backbone
        vocab : list of int, optional
            BPE ids (:func:`caption_vocabulary`); default: the words of ShapesWorld captions.
        width, layers, heads : int, default 128, 2, 4
        context_length : int, optional
            Default: the Backbone's text context length.
        seed : int, default 0
            Seeds the initial weights.
        """
        config = _base_config(backbone, vocab, width, layers, heads, context_length)
        config["vision_width"] = _vision_width(backbone)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(backbone, config).to(backbone.device)

    def memory(self, images: torch.Tensor) -> torch.Tensor:
        _, tokens = self.backbone.image_token_batch(images)     # (B, T, W_vision)
        return self.image_proj(tokens)                          # (B, T, W)


def _base_config(backbone, vocab, width, layers, heads, context_length) -> dict:
    from ..validation import check_positive_int

    for name, value in (("width", width), ("layers", layers), ("heads", heads)):
        check_positive_int(name, value)
    if width % heads:
        raise UsageError(f"width {width} is not divisible by heads {heads}")
    if vocab is None:
        from ..data.shapes import shapes_tiny_world

        vocab = caption_vocabulary(backbone.tokenizer, shapes_caption_texts(shapes_tiny_world()))
    L = check_positive_int("context_length", backbone.context_length if context_length is None else context_length,
                           minimum=2)
    if L > backbone.context_length:
        raise UsageError(f"context_length {L} exceeds the Backbone's {backbone.context_length}")
    return {"vocab": [int(v) for v in vocab], "width": int(width), "layers": int(layers), "heads": int(heads),
            "context_length": L}


def _vision_width(backbone) -> int:
    visual = backbone.model.visual
    width = getattr(getattr(visual, "transformer", None), "width", None)
    if width is None:
        raise UsageError(f"{type(visual).__name__} does not expose patch tokens; captioning needs a ViT")
    return int(width)


# --------------------------------------------------------------------------- training
class CaptionObjective(Objective):
    """Teacher-forced next-token cross-entropy of a :class:`CaptionHead` (loss term ``caption``).

    The Trainer tokenises one caption per image with the Backbone's tokenizer (ids (B, T)
    up to the end-of-text token); the head predicts token t+1 from tokens <= t and the
    image; positions after the end-of-text token are ignored.
    """

    needs_captions = True

    def forward_model(self, model: CaptionHead, batch: Batch) -> dict:
        eot = model.tokenizer.eot_token_id
        ends = (batch.tokens == eot).int().argmax(-1)                          # (B,) end position
        L = int(ends.max()) + 1
        ids = model.to_sub_ids(batch.tokens[:, :L])                            # (B, L)
        logits = model(batch.images, ids[:, :-1])                              # (B, L-1, V)
        mask = torch.arange(L - 1, device=ids.device)[None] < ends[:, None]     # (B, L-1) targets up to eot
        return {"logits": logits, "targets": ids[:, 1:], "mask": mask}

    def forward(self, outputs: dict, batch: Batch | None = None) -> dict[str, torch.Tensor]:
        m = outputs["mask"]
        return {"caption": F.cross_entropy(outputs["logits"][m].float(), outputs["targets"][m])}


def caption_train_set(backbone, *, seed: int = 0):
    """The ShapesWorld training set of a captioner on ``backbone``: scenes of 1-3 objects of the
    shapes-tiny world (``seed``) at the Backbone's image size, all caption phrasings."""
    from ..data.shapes import shapes_tiny_world
    from ..data.shapes.worlds import task_world
    from ..train.datasets import ShapesTrainSet

    world = task_world(shapes_tiny_world(seed=seed, image_size=backbone.image_size), "captions")
    return ShapesTrainSet(world, "train")


def train_captioner(head: CaptionHead, train_set=None, *, steps: int = 300, batch_size: int = 32,
                    lr: float = 2e-3, warmup_steps: int = 20, seed: int = 0, out_dir: str | Path = "runs/caption",
                    progress: bool | None = None) -> CaptionHead:
    """Train ``head`` (in place) with :class:`CaptionObjective` through the Trainer; return it.

    Parameters
    ----------
    head : CaptionHead
    train_set : map-style dataset of (image, captions), optional
        Default :func:`caption_train_set` (ShapesWorld, 1-3 objects).
    steps, batch_size, lr, warmup_steps, seed
        Trainer settings (AdamW, warm-up then cosine decay; weight decay 0.01).
    out_dir : path
        The Trainer's folder (``metrics.jsonl``, ``checkpoints/``, which hold the head only).

    Notes
    -----
    The Backbone's parameters are frozen and its model in eval mode only while training
    (:func:`cliplab.train.frozen`); the caller's ``requires_grad`` flags and
    train mode are restored afterwards.  Training runs on the Backbone's device.

    Raises
    ------
    UsageError
        ``batch_size`` below 2 (the Trainer's minimum for caption objectives) or other bad settings.
    """
    from ..train import TrainConfig, Trainer, frozen
    from ..validation import check_positive_int

    check_positive_int("batch_size", batch_size)
    if batch_size < 2:
        raise UsageError(f"batch_size {batch_size}: the Trainer takes caption batches of at least 2")
    bb = head.backbone
    train_set = caption_train_set(bb, seed=seed) if train_set is None else train_set
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, weight_decay=0.01,
                         seed=seed, out_dir=str(out_dir), ckpt_every=0, log_every=max(1, min(50, steps // 10)),
                         device=str(bb.device))
    with frozen(bb.model):
        Trainer(head, bb.tokenize, bb.preprocess, train_set, config, objective=CaptionObjective(),
                preprocess_cfg=bb.preprocess_cfg, progress=progress).fit()
    return head.eval()


# --------------------------------------------------------------------------- loading
def caption_head(kind: str):
    """The caption head class registered as ``kind`` (imports the modules that register)."""
    from . import lightcap  # noqa: F401  (registers "lightcap")

    return CAPTION_HEADS.get(kind)


def load_captioner(path: str | Path, backbone=None, *, device: str = "cpu", precision: str | None = None) -> CaptionHead:
    """Read a head written by :meth:`CaptionHead.save`.

    Parameters
    ----------
    path : path
        The folder holding ``captioner.json`` and ``captioner.safetensors``.
    backbone : cliplab.Backbone, optional
        Default: loaded from the spec the head records (on ``device``, in ``precision``,
        default the recorded precision); either way its fingerprint, which covers the
        weights' dtype, must match the recorded one.

    Raises
    ------
    ModelLoadError
        Missing folder or files, unreadable or foreign config, corrupt weights, another
        Backbone (:class:`~cliplab.errors.CheckpointMismatch` for weights that do not fit).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if path.is_file():
        raise ModelLoadError(f"{path}: a file, not a captioner folder (give the folder 'cliplab caption --train' "
                             "wrote)")
    if not path.is_dir():
        raise ModelLoadError(f"{path}: no such captioner folder (write one with 'cliplab caption --train')")
    if not cfg_file.is_file() or not weights.is_file():
        raise ModelLoadError(f"{path}: not a captioner folder: {CONFIG_NAME} and {WEIGHTS_NAME} are needed")
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
        ok = isinstance(meta, dict) and meta.get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{cfg_file}: unreadable captioner config ({e})") from None
    if not ok:
        raise ModelLoadError(f"{cfg_file}: not a cliplab captioner config (format {FORMAT!r} expected)")
    if meta.get("version") != FORMAT_VERSION:
        raise ModelLoadError(f"{cfg_file}: captioner format version {meta.get('version')!r}; "
                             f"this cliplab reads version {FORMAT_VERSION}")
    try:
        cls = caption_head(meta["kind"])
        spec, fingerprint = meta["backbone"]["spec"], meta["backbone"]["fingerprint"]
        saved_precision = meta["backbone"].get("precision", "fp32")
        config = meta["config"]
        if not (isinstance(spec, str) and isinstance(fingerprint, str) and isinstance(config, dict)
                and saved_precision in ("fp32", "fp16", "bf16")):
            raise TypeError("backbone spec and fingerprint must be strings, precision fp32/fp16/bf16, "
                            "config an object")
    except (KeyError, TypeError, UsageError) as e:
        raise ModelLoadError(f"{cfg_file}: malformed captioner config ({type(e).__name__}: {e})") from None
    if backbone is None:
        from ..models.loading import load

        try:
            backbone = load(spec, device=device, precision=precision or saved_precision)
        except ModelLoadError as e:
            raise ModelLoadError(f"{path}: cannot load the Backbone the head records ({e}); "
                                 "pass it (backbone=, or --model SPEC on the command line)") from None
    if backbone.fingerprint != fingerprint and backbone.precision != saved_precision:
        raise CheckpointMismatch(f"{path}: this head was trained on a {saved_precision} Backbone, not on "
                                 f"{backbone.precision}: caption at {saved_precision} (the default), or train a "
                                 f"head at {backbone.precision} (--precision with --train)")
    if backbone.fingerprint != fingerprint:
        raise CheckpointMismatch(f"{path}: this head was trained on another Backbone ({spec}, {saved_precision}, "
                                 f"fingerprint {fingerprint[:12]}), not on {backbone.name} ({backbone.precision}, "
                                 f"{backbone.fingerprint[:12]})")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{weights}: corrupt or unreadable weights ({e})") from None
    try:
        _check_config(config, backbone)
        head = cls(backbone, config)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, UsageError) as e:
        reason = str(e).splitlines()[0] if str(e) else ""
        raise ModelLoadError(f"{cfg_file}: malformed captioner config ({type(e).__name__}: {reason})") from None
    missing = set(head.head_state_dict()) - set(state)
    extra = set(state) - set(head.head_state_dict())
    if missing or extra:
        raise CheckpointMismatch(f"{weights}: weights do not fit the config (missing {sorted(missing)[:3]}, "
                                 f"unexpected {sorted(extra)[:3]})")
    try:
        head.load_state_dict(state, strict=False)
    except RuntimeError as e:
        reason = str(e).splitlines()[-1].strip()
        raise CheckpointMismatch(f"{weights}: weights do not fit the config ({reason})") from None
    return head.to(backbone.device).eval()


def recorded_precision(path: str | Path) -> str:
    """The precision of the Backbone a saved head was trained with (``"fp32"`` when unreadable:
    :func:`load_captioner` then reports what is wrong)."""
    try:
        meta = json.loads((Path(path) / CONFIG_NAME).read_text(encoding="utf-8"))
        precision = meta["backbone"].get("precision", "fp32")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return "fp32"
    return precision if precision in ("fp32", "fp16", "bf16") else "fp32"


def _check_config(config: dict, backbone) -> None:
    """The architecture numbers of a head's config: positive ints within the Backbone's limits."""
    from ..validation import check_positive_int

    _check_vocab(config["vocab"], backbone.tokenizer)
    for name in ("width", "layers", "heads"):
        check_positive_int(name, config[name])
    if config["width"] % config["heads"]:
        raise UsageError(f"width {config['width']} is not divisible by heads {config['heads']}")
    if config["width"] > 8192 or config["layers"] > 64:
        raise UsageError(f"width {config['width']} / layers {config['layers']}: at most 8192 / 64")
    if config["vision_width"] != _vision_width(backbone):
        raise UsageError(f"vision_width {config['vision_width']!r} is not the Backbone's {_vision_width(backbone)}")
    L = check_positive_int("context_length", config["context_length"], minimum=2)
    if L > backbone.context_length:
        raise UsageError(f"context_length {L} exceeds the Backbone's {backbone.context_length}")


# --------------------------------------------------------------------------- size and speed
def head_size(head: CaptionHead) -> dict:
    """Parameters and float32 megabytes of the head, and of head + Backbone."""
    own = head.head_parameters()
    total = own + sum(p.numel() for p in head.clip.parameters())
    return {"params": int(own), "mb": own * 4 / 2 ** 20, "params_with_backbone": int(total),
            "mb_with_backbone": total * 4 / 2 ** 20}


def caption_latency(head: CaptionHead, images: torch.Tensor, *, runs: int = 5, beam: int = 1) -> float:
    """Median milliseconds per image of :meth:`CaptionHead.generate`, one image at a time, one thread.

    Parameters
    ----------
    images : Tensor (N, 3, H, W)
        Preprocessed images; each run captions all N, one by one (after one warm-up image).
    runs : int, default 5
    """
    images = images.to(head.backbone.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        head.generate(images[:1], beam=beam)          # warm-up
        per_run = []
        for _ in range(runs):
            tic = time.perf_counter()
            for i in range(len(images)):
                head.generate(images[i:i + 1], beam=beam)
            per_run.append((time.perf_counter() - tic) * 1000 / len(images))
    finally:
        torch.set_num_threads(threads)
    return float(np.median(per_run))


# --------------------------------------------------------------------------- caption quality
def simple_tokenize(text: str) -> str:
    """Lower-case words and punctuation marks split apart, joined by spaces (what CIDEr counts).

    Replaces the COCO toolkit's Java PTB tokenizer, which then drops punctuation; here
    punctuation is dropped too, so only words are counted.
    """
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def cider(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, np.ndarray]:
    """CIDEr-D of ``candidates`` against ``references`` (pycocoevalcap's ``Cider`` scorer).

    Parameters
    ----------
    candidates : sequence of str
        One generated caption per image (N).
    references : sequence of sequence of str
        The reference captions of each image (N lists, each non-empty).

    Returns
    -------
    (float, ndarray (N,))
        The corpus score (mean) and the per-image scores.  Document frequencies come from
        the references of these N images, as in the COCO toolkit, so scores of different
        corpora are not comparable; N >= 2 (with one image every n-gram has idf 0).

    Notes
    -----
    Captions are tokenised by :func:`simple_tokenize` (lower case, words only) instead of
    the toolkit's Java PTB tokenizer.
    """
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise UsageError(_INSTALL_HINT) from None
    if len(candidates) != len(references):
        raise UsageError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if len(candidates) < 2:
        raise UsageError("CIDEr needs at least 2 images (its idf is computed over the corpus)")
    if any(len(r) == 0 for r in references):
        raise DataError("every image needs at least one reference caption")
    gts = {i: [simple_tokenize(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [simple_tokenize(c)] for i, c in enumerate(candidates)}
    score, scores = Cider().compute_score(gts, res)
    return float(score), np.asarray(scores, dtype=np.float64)


_COUNT_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


@dataclass
class ParsedCaption:
    """Objects named by a caption: ``(colour, shape)`` pairs in order, and its count."""

    objects: list[tuple[str, str]]
    count: int


def parse_caption(text: str, colors: Sequence[str] | None = None,
                  shapes: Sequence[str] | None = None) -> ParsedCaption:
    """The ``(colour, shape)`` objects a ShapesWorld-style caption names, and how many.

    An object is ``"{colour} {shape}"`` or ``"{shape} in {colour}"`` (the two phrasings of
    ShapesWorld captions; size words may precede either).  The count is the number after a
    count word (``"three shapes"``) when the caption has one, else the number of objects.

    Examples
    --------
    >>> parse_caption("a small red star and a large circle in blue").objects
    [('red', 'star'), ('blue', 'circle')]
    """
    from ..data.shapes import COLORS, SHAPES

    colors = set(COLORS if colors is None else colors)
    shapes = set(SHAPES if shapes is None else shapes)
    words = re.findall(r"[a-z]+", text.lower())
    objects, i = [], 0
    while i < len(words):
        w = words[i]
        if w in colors and i + 1 < len(words) and words[i + 1] in shapes:
            objects.append((w, words[i + 1]))
            i += 2
        elif w in shapes and i + 2 < len(words) and words[i + 1] == "in" and words[i + 2] in colors:
            objects.append((words[i + 2], w))
            i += 3
        else:
            i += 1
    count = next((_COUNT_WORDS[w] for w, nxt in zip(words, words[1:] + [""])
                  if w in _COUNT_WORDS and nxt in ("shapes", "objects")), len(objects))
    return ParsedCaption(objects, count)


def attribute_accuracy(captions: Sequence[str], scenes) -> dict[str, float]:
    """Attributes parsed from captions (:func:`parse_caption`) against scenes' ground truth.

    Parameters
    ----------
    captions : sequence of str
    scenes : sequence of ShapesWorld scenes (``.objects`` with ``color`` and ``shape``)

    Returns
    -------
    dict
        ``color``, ``shape``, ``object``: the fraction of ground-truth objects whose colour,
        shape, colour+shape pair the caption names (multiset matching, order free);
        ``precision``: the fraction of named pairs that are in the scene; ``count``: the
        fraction of captions with the right object count; ``exact``: the fraction whose
        named pairs are exactly the scene's.
    """
    if len(captions) != len(scenes):
        raise UsageError(f"{len(captions)} captions but {len(scenes)} scenes")
    if not captions:
        raise UsageError("no captions to score")
    n_obj = n_named = hit_c = hit_s = hit_o = hit_p = n_count = n_exact = 0
    for text, scene in zip(captions, scenes):
        p = parse_caption(text)
        gt = [(o.color, o.shape) for o in scene.objects]
        got = Counter(p.objects)
        n_obj += len(gt)
        n_named += len(p.objects)
        hit_o += sum((Counter(gt) & got).values())
        hit_p += sum((got & Counter(gt)).values())
        hit_c += sum((Counter(c for c, _ in gt) & Counter(c for c, _ in p.objects)).values())
        hit_s += sum((Counter(s for _, s in gt) & Counter(s for _, s in p.objects)).values())
        n_count += p.count == len(gt)
        n_exact += got == Counter(gt)
    return {"color": hit_c / n_obj, "shape": hit_s / n_obj, "object": hit_o / n_obj,
            "precision": hit_p / max(n_named, 1), "count": n_count / len(captions), "exact": n_exact / len(captions)}
