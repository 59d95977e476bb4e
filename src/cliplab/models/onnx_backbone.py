"""Run an ONNX export of a Backbone with ONNX Runtime: :class:`OnnxBackbone`.

A folder written by :func:`cliplab.models.export.export_onnx` (``cliplab export MODEL
--format onnx``) holds the two towers as ONNX files and a manifest,
:data:`MANIFEST`.  ``cliplab.load(folder)`` recognises the manifest and returns an
:class:`OnnxBackbone`: a :class:`~cliplab.models.backbone.Backbone` whose forward passes
are ONNX Runtime sessions on the CPU.  Everything around the forward passes is the
Backbone's own code, unchanged: the tokenizer, image decoding and preprocessing, batching,
skipped-image records and the final L2 normalisation.  So ``cliplab classify``,
``cliplab embed``, the zero-shot classifiers and the feature cache take an export as
they take any model, and the features equal the PyTorch model's (tested to 1e-5 in fp32).

What an export cannot do: patch or per-position token outputs (``image_tokens``,
``text_tokens``), surgery and fine-tuning (``with_model``), saving weights (``save``);
these raise :class:`~cliplab.errors.UsageError`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelLoadError, UsageError
from .backbone import Backbone

logger = logging.getLogger(__name__)

__all__ = ["MANIFEST", "FORMAT", "OnnxBackbone", "OnnxTowers", "is_onnx_export", "read_manifest",
           "load_onnx_export", "require"]

MANIFEST = "cliplab_export.json"
"""File name of the manifest that marks a folder as an export."""

FORMAT = "cliplab-onnx"
"""The manifest's ``format``; :data:`FORMAT_VERSION` its ``version``."""
FORMAT_VERSION = 1

TOWERS = ("image", "text")

_KEYS = ("model", "precision", "files", "inputs", "outputs", "embed_dim", "context_length",
         "logit_scale", "model_cfg", "preprocess_cfg")


def require(*modules: str, what: str = "ONNX export") -> None:
    """Check that optional packages are installed.

    Raises
    ------
    UsageError
        Naming the missing packages and the install command (exit code 2).
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"{what} needs {' and '.join(missing)}, which is not installed: "
                         "pip install 'cliplab[export]'")


def is_onnx_export(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding an export manifest (:data:`MANIFEST`)."""
    path = Path(path)
    return path.is_dir() and (path / MANIFEST).is_file()


def read_manifest(folder: str | Path) -> dict:
    """The manifest of an export folder, checked for the keys the loader needs.

    Raises
    ------
    ModelLoadError
        Not JSON, another format or version, or a key missing; the message names the file.
    """
    from .convert import read_json_object

    path = Path(folder) / MANIFEST
    manifest = read_json_object(path)
    if manifest.get("format") != FORMAT:
        raise ModelLoadError(f"{path}: not a cliplab ONNX export manifest (format {manifest.get('format')!r}, "
                             f"expected {FORMAT!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise ModelLoadError(f"{path}: manifest version {manifest.get('version')!r}; this cliplab reads "
                             f"version {FORMAT_VERSION}: export the model again")
    missing = [k for k in _KEYS if k not in manifest]
    if missing or not all(t in manifest["files"] for t in TOWERS):
        raise ModelLoadError(f"{path}: the manifest lacks {', '.join(missing) or 'a tower in files'}; "
                             "export the model again")
    return manifest


class OnnxTowers:
    """The two towers of an export as ONNX Runtime sessions, with open_clip's method names.

    :class:`OnnxBackbone` runs these where a Backbone runs an open_clip model: its
    :meth:`encode_image` and :meth:`encode_text` take and return torch tensors, and
    compute with ONNX Runtime (the tensors are only containers).

    Parameters
    ----------
    folder : path
        The export folder.
    manifest : dict
        Its manifest (:func:`read_manifest`).
    threads : int, optional
        ONNX Runtime intra-op threads (default: ONNX Runtime's choice, one per core).

    Raises
    ------
    ModelLoadError
        A tower file is missing or ONNX Runtime cannot load it.
    """

    def __init__(self, folder: str | Path, manifest: dict, *, threads: int | None = None):
        require("onnxruntime", what="running an ONNX export")
        import onnxruntime as ort

        folder = Path(folder)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        self.sessions = {}
        for tower in TOWERS:
            path = folder / manifest["files"][tower]["path"]
            if not path.is_file():
                raise ModelLoadError(f"{path}: the {tower} tower of this export is missing")
            try:
                self.sessions[tower] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own classes (InvalidProtobuf, Fail...)
                raise ModelLoadError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: "
                                     f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
        self.input_names = {t: manifest["inputs"][t]["name"] for t in TOWERS}
        self.output_names = {t: manifest["outputs"][t]["name"] for t in TOWERS}

    def eval(self) -> "OnnxTowers":
        return self

    def _run(self, tower: str, x: np.ndarray) -> torch.Tensor:
        out = self.sessions[tower].run([self.output_names[tower]], {self.input_names[tower]: x})[0]
        return torch.from_numpy(out)                                    # (B, D)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Features (B, D) of preprocessed images (B, 3, H, W), float32."""
        return self._run("image", image.detach().cpu().float().numpy())

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Features (B, D) of token ids (B, T), T the export's context length."""
        return self._run("text", tokens.detach().cpu().to(torch.int64).numpy())


class OnnxBackbone(Backbone):
    """A :class:`~cliplab.models.backbone.Backbone` whose towers run in ONNX Runtime.

    Build one with ``cliplab.load(folder)`` on a folder written by
    :func:`cliplab.models.export.export_onnx`; ``encode_images``, ``encode_texts``,
    ``tokenize``, ``logit_scale`` and ``fingerprint`` behave as a Backbone's.

    Parameters
    ----------
    folder : path
        The export folder.
    threads : int, optional
        ONNX Runtime intra-op threads.

    Attributes
    ----------
    manifest : dict
        The export's manifest.
    precision : {"fp32", "int8"}
        The precision of the exported weights (int8: dynamically quantized).

    Raises
    ------
    ModelLoadError
        A bad manifest, or a tower ONNX Runtime cannot load.
    UsageError
        onnxruntime is not installed.

    Notes
    -----
    The ONNX graphs return L2-normalised features; :meth:`encode_images` and
    :meth:`encode_texts` normalise them once more (the Backbone's code), which changes
    them by float rounding only.  Texts always run the full context length (the
    length-bucketed fast path needs the PyTorch text tower).
    """

    def __init__(self, folder: str | Path, *, threads: int | None = None):
        from .loading import make_tokenizer

        folder = Path(folder)
        manifest = read_manifest(folder)
        super().__init__(OnnxTowers(folder, manifest, threads=threads), model_cfg=manifest["model_cfg"],
                         preprocess_cfg=manifest["preprocess_cfg"], tokenizer=make_tokenizer(manifest["model_cfg"]),
                         name=folder.name, precision=manifest["precision"])
        self.folder = folder
        self.manifest = manifest

    def __repr__(self) -> str:
        return (f"OnnxBackbone(name={self.name!r}, embed_dim={self.embed_dim}, image_size={self.image_size}, "
                f"precision={self.precision!r}, source={self.manifest['model']!r})")

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def context_length(self) -> int:
        return int(self.manifest["context_length"])

    @property
    def logit_scale(self) -> float:
        return float(self.manifest["logit_scale"])

    @property
    def logit_bias(self) -> float | None:
        bias = self.manifest.get("logit_bias")
        return None if bias is None else float(bias)

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the manifest and the bytes of both ONNX files (int8 and fp32 differ)."""
        h = hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode())
        for tower in TOWERS:
            with open(self.folder / self.manifest["files"][tower]["path"], "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
        return h.hexdigest()

    def _unsupported(self, what: str):
        raise UsageError(f"{self.name} is an ONNX export: {what} needs the PyTorch model "
                         f"({self.manifest['model']}); load that instead")

    def state_dict(self) -> dict:
        self._unsupported("state_dict")

    def save(self, out):
        self._unsupported("save")

    def with_model(self, model, *, name: str):
        self._unsupported("with_model (surgery, fine-tuning)")

    def image_tokens(self, images, **kwargs):
        self._unsupported("image_tokens")

    def image_token_batch(self, images):
        self._unsupported("image_token_batch")

    def text_tokens(self, texts):
        self._unsupported("text_tokens")


def load_onnx_export(folder: str | Path, *, device: str = "cpu", precision: str = "fp32",
                     **unused) -> OnnxBackbone:
    """:class:`OnnxBackbone` of an export folder, refusing load options that do not apply.

    Parameters
    ----------
    folder : path
    device : {"cpu"}
        ONNX Runtime's CPU execution provider is used.
    precision : {"fp32"}
        The default; an export runs in the precision it was written in (``manifest["precision"]``).
    **unused
        The other options of :func:`cliplab.load` (``arch``, ``config``, ``quick_gelu``,
        ``heads``): must be None.

    Raises
    ------
    UsageError
        A device other than the CPU, another precision, or an architecture option.
    """
    if str(device) != "cpu":
        raise UsageError(f"{folder} is an ONNX export, run by ONNX Runtime on the CPU; drop --device {device}")
    if precision != "fp32":
        raise UsageError(f"{folder} is an ONNX export: it runs in the precision it was exported in; "
                         f"drop --precision {precision}")
    given = sorted(k for k, v in unused.items() if v is not None)
    if given:
        raise UsageError(f"{folder} is an ONNX export whose architecture is fixed: "
                         f"{', '.join(given)} do not apply")
    return OnnxBackbone(folder)
