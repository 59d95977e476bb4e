"""The Backbone: one object that every cliplab capability takes.

A :class:`Backbone` wraps an open_clip model together with its tokenizer, its
preprocessing and its configuration, and turns images and texts into
L2-normalised ``float32`` NumPy features of shape (N, D).

Text fast path
--------------
The CLIP text tower is causal (each position attends only to earlier ones) and
pools the feature at the end-of-text (EOT) token.  Positions after the last EOT
of a batch therefore cannot change the result, yet open_clip's ``encode_text``
always runs all ``context_length`` positions (77 for most models).
:meth:`Backbone.encode_texts` sorts prompts by length, batches prompts of
similar length together and runs each batch only up to its longest EOT.  The
features equal open_clip's ``encode_text`` to float tolerance (tested to 1e-5 in
fp32) and short prompts are encoded several times faster (see the README for
the measured ratio).

Image pipeline
--------------
:meth:`Backbone.encode_images` decodes and preprocesses ``prefetch=2`` batches ahead
of the model, writing each image into its row of a preallocated batch tensor
(:func:`cliplab.data.images.iter_filled`): open_clip's PIL steps run unchanged, its
``ToTensor`` and ``Normalize`` are done in place in that row, so the batch is the one
``torch.stack`` of the transform's outputs would give, bit for bit.  Many image files
are handled by forked worker processes (their Python code runs outside this process's
GIL; the batch buffers are shared memory), few images or images already in memory by
threads.  Every choice, and ``workers=0``, gives the same features exactly (tested).

The temperature
---------------
open_clip models store the temperature in log space: the parameter
``model.logit_scale`` is log(s), as are ``init_logit_scale`` in model configs and
recipes.  Everything above the model uses the multiplier s itself:
:attr:`Backbone.logit_scale` is ``exp(model.logit_scale)`` (100 for OpenAI's CLIP),
and so is every ``logit_scale`` argument of adapters and classifiers
(``logits = s * cosine``).  ``logit_bias`` (SigLIP) is not exponentiated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import warnings
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .._progress import progress_bar
from ..data.images import DEFAULT_MAX_PIXELS, can_fork, iter_filled, load_image
from ..data.records import EncodedImages, Skipped
from ..errors import BadImage, CliplabError, UsageError
from ..validation import check_choice, check_positive_int
from .transforms import is_model_sized, make_preprocess, uint8_to_tensor

logger = logging.getLogger(__name__)

__all__ = ["TEXT_CHUNK", "Backbone", "EncodedImages", "Skipped", "encode_token_embeddings"]

TEXT_CHUNK = 65_536
"""Texts tokenized at a time by :meth:`Backbone.encode_texts` (token ids: 40 MB at 77
positions); the length sorting of the fast path works within each chunk."""


_PARALLEL = ("auto", "threads", "processes")
MIN_ITEMS_FOR_PROCESSES = 64
"""With ``parallel="auto"``, image files or encoded bytes are decoded in worker processes
from this many images on (fewer: threads, which start at once)."""


WORKER_NICE = 0
"""Niceness added to decoding processes (see :func:`cliplab.data.images.iter_filled`)."""


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _fused_tail(transform):
    """Split an eval transform ending in ``ToTensor, Normalize`` for :func:`_to_tensor_into`.

    Returns ``(head, mean (3, 1, 1), std (3, 1, 1))``, or None for any other transform.
    """
    from torchvision.transforms import Compose, Normalize, ToTensor

    steps = getattr(transform, "transforms", None)
    if (not isinstance(transform, Compose) or len(steps) < 2 or not isinstance(steps[-2], ToTensor)
            or not isinstance(steps[-1], Normalize)):
        return None
    mean = torch.as_tensor(steps[-1].mean, dtype=torch.float32).view(-1, 1, 1)   # (3, 1, 1)
    std = torch.as_tensor(steps[-1].std, dtype=torch.float32).view(-1, 1, 1)
    return Compose(steps[:-2]), mean, std


def _to_tensor_into(img: Image.Image, out: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
    """torchvision's ``ToTensor`` then ``Normalize`` of an RGB image, written into ``out`` (3, H, W).

    The same float32 operations in the same order (``x / 255``, ``- mean``, ``/ std``),
    so the result is bit for bit torchvision's, without its intermediate tensors.
    """
    pixels = torch.from_numpy(np.array(img))                            # (H, W, 3) uint8
    out.copy_(pixels.permute(2, 0, 1))
    out.div_(255).sub_(mean).div_(std)


def encode_token_embeddings(model, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Text features (B, D) of an open_clip ``CLIP`` from token embeddings instead of ids.

    The part of ``model.encode_text`` after the embedding lookup: add positions, run the
    causal transformer, final LayerNorm, pool the EOT position of ``tokens`` and project.
    Prompt learners (:mod:`cliplab.adapt.prompts`) pass embeddings in which some positions
    are learnable vectors; the fast text path passes ``model.token_embedding(tokens)``.

    Parameters
    ----------
    model : open_clip.CLIP
        With the built-in text tower (``token_embedding``, ``transformer``, ``attn_mask``).
    x : Tensor (B, L, W)
        Token embeddings, ``L`` <= the context length (trailing padding may be cut).
    tokens : LongTensor (B, L)
        The ids the positions stand for; only used to find the pooled (EOT) position.
    """
    from open_clip.transformer import text_global_pool

    m = model
    x = encode_token_states(m, x)                                    # (B, L, W)
    x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
    if m.text_projection is not None:
        x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
    return x                                                          # (B, D)


def encode_token_states(model, x: torch.Tensor) -> torch.Tensor:
    """Per-position text-tower outputs (B, L, W) of an open_clip ``CLIP``, before pooling.

    Positions added, the causal transformer, the final LayerNorm: what
    :func:`encode_token_embeddings` pools and projects.

    Parameters
    ----------
    model : open_clip.CLIP
    x : Tensor (B, L, W)
        Token embeddings, ``L`` <= the context length.
    """
    m = model
    L = x.shape[1]
    cast = m.transformer.get_cast_dtype()
    x = x.to(cast) + m.positional_embedding[:L].to(cast)           # (B, L, W)
    x = m.transformer(x, attn_mask=m.attn_mask[:L, :L])
    return m.ln_final(x)                                              # (B, L, W)


class Backbone:
    """An open_clip model with its tokenizer, preprocessing and config.

    Build one with :func:`cliplab.load`; construct it directly only to wrap a
    model you created yourself.

    Parameters
    ----------
    model : torch.nn.Module
        An open_clip ``CLIP`` or ``CustomTextCLIP`` model.  It is put in eval mode.
    model_cfg : dict
        The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``...).
    preprocess_cfg : dict
        open_clip preprocessing config (``size``, ``mean``, ``std``, ``interpolation``,
        ``resize_mode``).
    tokenizer : callable
        An open_clip tokenizer (``SimpleTokenizer`` or ``HFTokenizer``).
    name : str
        A human-readable name, usually the spec it was loaded from.
    device : str, default="cpu"
    precision : {"fp32", "fp16", "bf16"}, default="fp32"

    Attributes
    ----------
    embed_dim : int
        D, the width of the joint embedding space.
    image_size : int
        Side of the square model input.
    context_length : int
        Number of text positions the text tower accepts.
    fingerprint : str
        SHA-256 of the weights and configs, stable across loads (for caches).

    Examples
    --------
    >>> import cliplab
    >>> bb = cliplab.load("shapes-tiny")                  # doctest: +SKIP
    >>> bb.encode_texts(["a photo of a red star."]).shape  # doctest: +SKIP
    (1, 128)
    """

    def __init__(self, model, *, model_cfg: dict, preprocess_cfg: dict, tokenizer,
                 name: str = "model", device: str = "cpu", precision: str = "fp32"):
        self.model = model.eval()
        self.model_cfg = dict(model_cfg)
        self.preprocess_cfg = dict(preprocess_cfg)
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)
        self.precision = precision
        self._truncation_warned = False
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        """Picklable / deep-copyable state: everything but the lock (a copy gets its own)."""
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def with_model(self, model, *, name: str, model_cfg: dict | None = None) -> "Backbone":
        """This Backbone with another model: same configs, tokenizer, device and precision.

        Surgery and fine-tuning build a new model from ``self.model`` (a deep copy with
        adapters, merged or mixed weights) and wrap it with this.

        Parameters
        ----------
        model : torch.nn.Module
            An open_clip model of the same architecture as ``self.model``.
        name : str
            The new Backbone's name (for example ``"shapes-tiny+lora(r=4)"``).
        model_cfg : dict, optional
            The new model's config when surgery changed what building it needs
            (for example ``model_cfg["cliplab"]["attention"]``); default: this one's.

        Returns
        -------
        Backbone
            A new Backbone; ``self`` is unchanged.
        """
        return Backbone(model, model_cfg=self.model_cfg if model_cfg is None else model_cfg,
                        preprocess_cfg=self.preprocess_cfg, tokenizer=self.tokenizer, name=name,
                        device=str(self.device), precision=self.precision)

    def __repr__(self) -> str:
        return (f"Backbone(name={self.name!r}, embed_dim={self.embed_dim}, "
                f"image_size={self.image_size}, device={str(self.device)!r}, "
                f"precision={self.precision!r})")

    # ------------------------------------------------------------------ properties
    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg.get("size", self.model_cfg["vision_cfg"].get("image_size", 224))
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", None)
                   or self.model_cfg["text_cfg"].get("context_length", 77))

    @property
    def logit_scale(self) -> float:
        """The temperature as a multiplier s = ``exp(model.logit_scale)`` (see the module notes)."""
        return float(self.model.logit_scale.detach().float().exp().reshape(-1)[0])

    @property
    def logit_bias(self) -> float | None:
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach().float().reshape(-1)[0])

    @cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg},
                            sort_keys=True, default=str).encode())
        for key, value in sorted(self.model.state_dict().items()):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    @cached_property
    def preprocess(self):
        """The eval-time image transform: PIL image -> (3, H, W) float tensor."""
        return make_preprocess(self.preprocess_cfg)

    @property
    def _dtype(self) -> torch.dtype:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)

    # ---------------------------------------------------------------------- text
    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids (N, context_length), exactly as open_clip's tokenizer makes them.

        Texts longer than the context are cut (keeping the end-of-text token); the
        first time that happens a warning says how many texts were cut.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise UsageError("tokenize expects strings; got "
                             f"{type(next(t for t in texts if not isinstance(t, str))).__name__}")
        tok = self.tokenizer
        if getattr(tok, "reduction_fn", "absent") is None and hasattr(tok, "encode"):
            return self._tokenize_bpe(texts)
        return tok(texts)

    def _tokenize_bpe(self, texts: list[str]) -> torch.Tensor:
        tok, ctx = self.tokenizer, self.context_length
        ids = [[tok.sot_token_id] + tok.encode(t) + [tok.eot_token_id] for t in texts]
        out = torch.zeros(len(ids), ctx, dtype=torch.long)  # (N, T)
        n_cut = 0
        for i, row in enumerate(ids):
            if len(row) > ctx:
                row = row[:ctx]
                row[-1] = tok.eot_token_id
                n_cut += 1
            out[i, :len(row)] = torch.tensor(row)
        if n_cut and not self._truncation_warned:
            self._truncation_warned = True
            msg = (f"{n_cut} of {len(texts)} texts are longer than the context length "
                   f"{ctx} tokens and were truncated (this warning is shown once).")
            warnings.warn(msg, UserWarning, stacklevel=3)
            logger.warning(msg)
        return out

    def _fast_text_ok(self) -> bool:
        from open_clip.model import CLIP

        m = self.model
        return (isinstance(m, CLIP) and getattr(m, "attn_mask", None) is not None
                and m.text_pool_type in ("argmax", "eos"))

    def _text_lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position of the pooled (EOT) token + 1, per row."""
        m = self.model
        if m.text_pool_type == "eos":
            return (tokens == m.text_eos_id).int().argmax(dim=-1) + 1
        return tokens.argmax(dim=-1) + 1

    @torch.inference_mode()
    def _encode_tokens(self, tokens: torch.Tensor, fast: bool) -> torch.Tensor:
        m = self.model
        tokens = tokens.to(self.device)
        if not fast:
            return m.encode_text(tokens)
        L = int(self._text_lengths(tokens).max())
        tokens = tokens[:, :L]                                        # (B, L)
        return encode_token_embeddings(m, m.token_embedding(tokens), tokens)

    def encode_texts(self, texts: str | Sequence[str], *, batch_size: int = 256,
                     progress: bool | None = None, fast: bool = True) -> np.ndarray:
        """Embed texts: L2-normalised float32 features (N, D).

        Parameters
        ----------
        texts : str or sequence of str
        batch_size : int, default=256
        progress : bool, optional
            Show a progress bar (default: on unless ``CLIPLAB_PROGRESS=0``; hidden for one batch).
        fast : bool, default=True
            Use the length-bucketed fast path when the text tower allows it (causal
            mask, EOT pooling); ``False`` runs open_clip's ``encode_text`` as is.

        Notes
        -----
        Texts are tokenized :data:`TEXT_CHUNK` at a time, so memory beyond the
        (N, D) result does not grow with N.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        check_positive_int("batch_size", batch_size)
        fast = fast and self._fast_text_ok()
        out = torch.empty(len(texts), self.embed_dim, dtype=torch.float32)   # (N, D)
        chunks = range(0, len(texts), TEXT_CHUNK)
        n_batches = sum(-(-min(TEXT_CHUNK, len(texts) - c) // batch_size) for c in chunks)
        bar = progress_bar(total=n_batches, progress=progress if n_batches > 1 else False,
                           desc="encode texts", unit="batch")
        with bar:
            for c in chunks:  # token ids cost 8 * T bytes per text: made one chunk at a time
                tokens = self.tokenize(texts[c:c + TEXT_CHUNK])              # (n, T)
                order = (torch.argsort(self._text_lengths(tokens), descending=True, stable=True)
                         if fast else torch.arange(len(tokens)))
                for s in range(0, len(tokens), batch_size):
                    idx = order[s:s + batch_size]
                    out[c + idx] = self._encode_tokens(tokens[idx], fast).float().cpu()
                    bar.update(1)
        return F.normalize(out, dim=-1).numpy()

    def text_tokens(self, texts: str | Sequence[str]) -> np.ndarray:
        """Per-position outputs of the text tower, before pooling: float32 (N, L, W).

        ``L`` is the full context length (padding positions included, as open_clip's
        ``encode_text(..., output_tokens=True)`` returns them), ``W`` the text-tower width
        (the final LayerNorm applied, no projection).  Needs the built-in CLIP text tower.

        Raises
        ------
        UsageError
            The model's text tower is not open_clip's built-in causal transformer.
        """
        if not self._fast_text_ok():
            raise UsageError(f"{self.name}: per-token text outputs need open_clip's built-in text tower")
        tokens = self.tokenize(texts).to(self.device)                  # (N, L)
        m = self.model
        with torch.inference_mode():
            out = encode_token_states(m, m.token_embedding(tokens))    # (N, L, W)
        return out.float().cpu().numpy()

    # -------------------------------------------------------------------- images
    def _prepare_into(self, item, out: torch.Tensor, max_pixels, draft, tail) -> None:
        """One input -> preprocessed (3, H, W) values written into ``out``.

        Runs in worker threads or processes.  ``tail`` is :func:`_fused_tail` of the
        transform (or None): the PIL steps run as they are, ``ToTensor`` and
        ``Normalize`` write straight into ``out``.
        """
        if isinstance(item, torch.Tensor):
            if item.ndim != 3 or item.shape[0] != 3:
                raise UsageError(f"image tensors must be preprocessed (3, H, W); got {tuple(item.shape)}")
            self._check_shape(item, out)
            out.copy_(item)
            return
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.ndim not in (2, 3):
                raise UsageError("image arrays must be uint8 (H, W) or (H, W, 3); got "
                                 f"{item.dtype} {item.shape}")
            if is_model_sized(item, self.preprocess_cfg):
                out.copy_(uint8_to_tensor([item], self.preprocess_cfg)[0])
                return
            item = Image.fromarray(item)
        img = load_image(item, max_pixels=max_pixels,
                         draft_size=self.image_size if draft else None)
        try:
            if tail is not None:
                img = tail[0](img)
                if isinstance(img, Image.Image) and img.mode == "RGB":
                    self._check_shape(img, out)
                    _to_tensor_into(img, out, tail[1], tail[2])
                    return
                img = self.preprocess.transforms[-1](self.preprocess.transforms[-2](img))
            else:
                img = self.preprocess(img)
            self._check_shape(img, out)
            out.copy_(img)
            return
        except CliplabError:
            raise
        except (ValueError, MemoryError) as exc:  # this image's failure, not the run's
            reason = f"cannot preprocess a {img.width}x{img.height} image ({type(exc).__name__}: {exc})"
        img = None  # raised outside the except block: the error keeps no decoded image
        raise BadImage(str(item) if isinstance(item, (str, os.PathLike)) else f"<{type(item).__name__}>",
                       reason)

    @staticmethod
    def _check_shape(image, out: torch.Tensor) -> None:
        shape = (3, image.height, image.width) if isinstance(image, Image.Image) else tuple(image.shape)
        if shape != tuple(out.shape):
            raise UsageError(f"preprocessed images must be {tuple(out.shape)} (the model input); got {shape}")

    def _input_shape(self) -> tuple[int, int, int]:
        size = self.preprocess_cfg.get("size", self.model_cfg["vision_cfg"].get("image_size", 224))
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return 3, int(h), int(w)

    def _expand(self, images) -> list:
        if isinstance(images, (str, Path, Image.Image, bytes, bytearray, memoryview)):
            return [images]
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return list(images)
        if isinstance(images, np.ndarray) and images.ndim in (2, 3):
            return [images]
        if isinstance(images, torch.Tensor):
            return list(images) if images.ndim == 4 else [images]
        return list(images)

    @torch.inference_mode()
    def _run_images(self, images, *, batch_size, progress, on_error, workers, max_pixels,
                    draft, fn, desc, parallel="auto"):
        check_choice("on_error", on_error, ("raise", "skip"))
        check_choice("parallel", parallel, _PARALLEL)
        check_positive_int("batch_size", batch_size)
        items = self._expand(images)
        workers = _default_workers() if workers is None else workers
        outs, kept, skipped = [], [], []
        bar = progress_bar(total=len(items), progress=progress if len(items) > batch_size else False,
                           desc=desc, unit="img")
        tail = _fused_tail(self.preprocess)
        # Decoding + preprocessing fill preallocated batches, two batches ahead of the
        # model, in worker processes (files and bytes, many of them) or threads.
        batches = iter_filled(items, batch_size, on_error=on_error, prefetch=2, workers=workers,
                              processes=self._use_processes(items, parallel),
                              item_shape=self._input_shape(), pin_memory=self.device.type == "cuda",
                              nice=WORKER_NICE,
                              fill=lambda item, out: self._prepare_into(item, out, max_pixels, draft, tail))
        with bar:
            for idx, tensor, skip in batches:
                skipped.extend(skip)
                kept.extend(idx)
                if idx:
                    batch = tensor.to(self.device, self._dtype)  # (B, 3, H, W)
                    outs.append(fn(batch).float().cpu())
                bar.update(len(idx) + len(skip))
        if skipped:
            logger.warning("skipped %d of %d images (first: %s: %s)", len(skipped), len(items),
                        skipped[0].source, skipped[0].reason)
        return outs, kept, skipped

    @staticmethod
    def _use_processes(items: list, parallel: str) -> bool:
        """Processes for many files or encoded images; threads for few, or for images in memory."""
        if parallel != "auto":
            return parallel == "processes"
        return (len(items) >= MIN_ITEMS_FOR_PROCESSES and can_fork()
                and all(isinstance(x, (str, os.PathLike, bytes)) for x in items))

    def encode_images(self, images, *, batch_size: int = 64, progress: bool | None = None,
                      on_error: str = "raise", workers: int | None = None,
                      max_pixels: int | None = DEFAULT_MAX_PIXELS,
                      draft: bool = False, parallel: str = "auto") -> EncodedImages:
        """Embed images: L2-normalised float32 features (M, D) of the M images kept.

        Parameters
        ----------
        images : path, PIL image, array or tensor, or a sequence of them
            Paths/str/bytes are decoded safely (EXIF orientation, any mode to RGB,
            pixel limit); uint8 arrays are (H, W, 3) or (N, H, W, 3); tensors must
            already be preprocessed, (3, H, W) or (N, 3, H, W).
        batch_size : int, default=64
        progress : bool, optional
        on_error : {"raise", "skip"}, default="raise"
            With ``"raise"`` a bad image raises :class:`cliplab.errors.BadImage`
            (then M = N).  With ``"skip"`` bad images are left out, counted, logged
            and listed in the result's ``skipped``.
        workers : int, optional
            Decoding workers (default: up to 4); 0 decodes in the calling thread.
        max_pixels : int or None
            Decompression-bomb guard; ``None`` disables it.
        draft : bool, default=False
            Let libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale (never below
            the model input).  Faster; features differ slightly from the exact
            path (cosine measured in the README).
        parallel : {"auto", "threads", "processes"}, default="auto"
            Where decoding and preprocessing run.  ``"auto"``: forked worker
            processes for :data:`MIN_ITEMS_FOR_PROCESSES` or more files or encoded
            images (their Python code then runs outside this process's GIL),
            threads otherwise (few images, PIL images, arrays, tensors).  Every
            choice gives the same features, bit for bit.

        Returns
        -------
        EncodedImages
            ``features`` (M, D) float32 in input order, ``kept`` (M,) the input index
            of each row, ``skipped`` a list of :class:`Skipped` records.
        """
        outs, kept, skipped = self._run_images(
            images, batch_size=batch_size, progress=progress, on_error=on_error,
            workers=workers, max_pixels=max_pixels, draft=draft, parallel=parallel,
            fn=self.model.encode_image, desc="encode images")
        feats = (F.normalize(torch.cat(outs), dim=-1).numpy() if outs
                 else np.zeros((0, self.embed_dim), dtype=np.float32))
        return EncodedImages(feats, np.asarray(kept, dtype=np.int64), skipped)

    def image_tokens(self, images, *, batch_size: int = 64, progress: bool | None = None,
                     project: bool = False, workers: int | None = None,
                     max_pixels: int | None = DEFAULT_MAX_PIXELS, draft: bool = False,
                     parallel: str = "auto") -> np.ndarray:
        """Patch tokens of the vision tower, before pooling: float32 (N, T, W).

        T is the number of patches (class token excluded), W the tower width, or
        D with ``project=True`` (tokens mapped by the tower's output projection, as
        dense methods such as MaskCLIP do).  Not L2-normalised.  Other arguments as in
        :meth:`encode_images`.
        """
        visual = self._token_tower()

        def fn(batch):
            _, tokens = self._visual_tokens(batch)                    # (B, T, W)
            if project and getattr(visual, "proj", None) is not None:
                tokens = tokens @ visual.proj                         # (B, T, D)
            return tokens

        with self._lock:  # output_tokens is toggled on the shared module
            outs, _, _ = self._run_images(images, batch_size=batch_size, progress=progress,
                                       on_error="raise", workers=workers, max_pixels=max_pixels,
                                       draft=draft, parallel=parallel, fn=fn, desc="image tokens")
        return torch.cat(outs).numpy()

    def image_token_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features and patch tokens of a preprocessed batch, no gradient, thread-safe.

        For heads that read the frozen tower inside their own forward pass (captioners):
        unlike :meth:`image_tokens` no decoding, batching or copy to the CPU.

        Parameters
        ----------
        images : Tensor (B, 3, H, W)
            Preprocessed images; cast here to the model's device and precision.

        Returns
        -------
        (Tensor (B, D), Tensor (B, T, W))
            float32 on the model's device: the image embedding (not normalised) and the
            patch tokens (class token excluded).

        Raises
        ------
        UsageError
            The vision tower does not expose patch tokens.
        """
        self._token_tower()
        with self._lock, torch.no_grad():  # output_tokens is toggled on the shared module
            pooled, tokens = self._visual_tokens(images.to(self.device, self._dtype))
        return pooled.float(), tokens.float()

    def _token_tower(self):
        visual = self.model.visual
        if not hasattr(visual, "output_tokens"):
            raise UsageError(f"{type(visual).__name__} does not expose patch tokens")
        return visual

    def _visual_tokens(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled (B, D), tokens (B, T, W)) of the vision tower; the caller holds ``_lock``."""
        visual = self.model.visual
        old = visual.output_tokens
        visual.output_tokens = True
        try:
            return visual(batch)
        finally:
            visual.output_tokens = old

    # ----------------------------------------------------------------- utilities
    def state_dict(self) -> dict:
        return self.model.state_dict()

    def save(self, out: str | Path) -> Path:
        """Write the model so that ``cliplab.load(out)`` rebuilds it exactly, with no options.

        Parameters
        ----------
        out : str or path
            A path ending in ``.safetensors``: one file whose metadata holds the
            model and preprocess configs (including ``quick_gelu``).  Anything
            else: an open_clip folder (``open_clip_config.json`` +
            ``open_clip_model.safetensors``, which carries the configs as well),
            also readable by ``open_clip.create_model("local-dir:" + out)``.

        Returns
        -------
        pathlib.Path
            ``out``.
        """
        from .convert import save_open_clip_folder
        from .state_dicts import save_state_dict

        if str(out).endswith(".safetensors"):
            return save_state_dict(out, self.model.state_dict(), model_cfg=self.model_cfg,
                                   preprocess_cfg=self.preprocess_cfg)
        return Path(save_open_clip_folder(out, self.model_cfg, self.model.state_dict(),
                                          self.preprocess_cfg))

