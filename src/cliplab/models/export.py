"""ONNX export of a Backbone's two towers, and INT8 weights through ONNX Runtime.

``cliplab export MODEL --format onnx [--int8] --out DIR`` (:mod:`cliplab.cli.export`)
calls :func:`export_onnx`.  The folder it writes:

==========================  ==============================================================
``image.onnx``              image tower: ``image`` float32 (B, 3, H, W), preprocessed as
                            the manifest's ``preprocess_cfg`` says -> ``features``
                            float32 (B, D), L2-normalised
``text.onnx``               text tower: ``tokens`` int64 (B, T), T the context length,
                            ids of the model's tokenizer -> ``features`` float32 (B, D),
                            L2-normalised
``cliplab_export.json``     the manifest: source model and fingerprint, precision, opset,
                            exporter, file sizes and SHA-256, input/output names and shapes,
                            ``embed_dim``, ``context_length``, ``logit_scale`` (the
                            multiplier s), model and preprocess configs, tokenizer, and the
                            check made at export (max abs difference to PyTorch)
==========================  ==============================================================

B is a dynamic axis; H, W and T are fixed.  The features are those of
:meth:`Backbone.encode_images` and :meth:`Backbone.encode_texts` (L2-normalised, so
``logit_scale * image @ text.T`` are CLIP's logits).  ``cliplab.load(DIR)`` runs the pair
with ONNX Runtime (:class:`~cliplab.models.onnx_backbone.OnnxBackbone`).

Exporter
--------
torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): it writes
one self-contained file per tower in well under a second for small models and needs no
package beyond ``onnx``.  torch deprecates it in favour of the ``torch.export``-based
exporter (``dynamo=True``, torch's default since 2.9), which needs ``onnxscript``; with
torch 2.14 that one exports the same towers with the same parity, but 20-30x slower
(about 5 s per tower of the bundled model) and with the weights in a separate
``.onnx.data`` file unless told otherwise, so cliplab does not use it.  The export runs
outside ``torch.no_grad``: ``nn.MultiheadAttention``'s inference fast path has no ONNX
export.

INT8
----
:func:`quantize_export` applies ONNX Runtime's dynamic quantization
(``onnxruntime.quantization.quantize_dynamic``): weights of MatMul/Gemm, the patch
convolution and the token-embedding Gather are stored as symmetric int8 (per tensor),
activations are quantized at run time from their observed range, so no calibration
data is needed.  LayerNorm, biases, positional and class embeddings stay float32.

Deviations
----------
- The text tower always runs all T positions; :meth:`Backbone.encode_texts` cuts each
  batch at its longest prompt (same features to 1e-5, fewer operations).
- Only CLIP models whose towers trace to ONNX export (open_clip ``CLIP`` with its built-in
  text tower is tested; a Hugging Face text tower may or may not export).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._progress import progress_bar
from ..errors import ModelLoadError, UsageError
from ..validation import check_choice
from .onnx_backbone import FORMAT, FORMAT_VERSION, MANIFEST, TOWERS, OnnxBackbone, read_manifest, require

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "DEFAULT_OPSET", "OPSETS", "export_onnx", "quantize_export"]

FORMATS = ("onnx",)
"""Export formats of ``cliplab export --format``."""

DEFAULT_OPSET = 18
"""ONNX opset of the export (LayerNormalization is a native op from 17 on)."""

OPSETS = (14, 20)
"""Lowest and highest opset the export writes (torch's TorchScript exporter stops at 20)."""

FILES = {"image": "image.onnx", "text": "text.onnx"}
INPUTS = {"image": "image", "text": "tokens"}
OUTPUT = "features"
CHECK_TEXTS = ["a photo of a red star.", "two small blue circles on a striped background", "a dog"]


class _ImageTower(torch.nn.Module):
    """``encode_image`` then L2 normalisation: (B, 3, H, W) -> (B, D)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        return F.normalize(self.model.encode_image(image), dim=-1)    # (B, D)


class _TextTower(torch.nn.Module):
    """``encode_text`` then L2 normalisation: (B, T) int64 -> (B, D)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return F.normalize(self.model.encode_text(tokens), dim=-1)    # (B, D)


@contextmanager
def _quiet_exporters():
    """Silence the exporters' deprecation and advanced-indexing warnings, and ONNX Runtime's
    quantizer, which logs a pre-processing hint on the root logger for every model."""
    root = logging.getLogger()
    hint = _DropMessage("pre-processing before quantization")
    root.addFilter(hint)
    for handler in root.handlers:
        handler.addFilter(hint)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
            warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=r".*aten::index operator of advanced indexing.*")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            yield
    finally:
        root.removeFilter(hint)
        for handler in root.handlers:
            handler.removeFilter(hint)


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _check_exportable(backbone) -> None:
    from .backbone import Backbone

    if isinstance(backbone, OnnxBackbone):
        raise UsageError(f"{backbone.name} is an ONNX export already; export the PyTorch model "
                         f"({backbone.manifest['model']})")
    if not isinstance(backbone, Backbone):
        raise UsageError(f"export_onnx takes a Backbone (cliplab.load(...)), got {type(backbone).__name__}")
    if backbone.device.type != "cpu" or backbone.precision != "fp32":
        raise UsageError(f"export an fp32 model on the CPU (got {backbone.precision} on {backbone.device}); "
                         "load it with device='cpu', precision='fp32'")


def _export_tower(module, example, path: Path, *, tower: str, opset: int) -> None:
    name = INPUTS[tower]
    try:  # not under no_grad: nn.MultiheadAttention's inference fast path has no ONNX export
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[name], output_names=[OUTPUT],
                          dynamic_axes={name: {0: "batch"}, OUTPUT: {0: "batch"}})
    except (OSError, UsageError):
        raise
    except Exception as e:  # the exporters raise many classes; one line says which step failed
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelLoadError(f"torch.onnx.export could not export the {tower} tower: "
                             f"{type(e).__name__}: {msg}") from e


def _file_entry(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"path": path.name, "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _prepare_out(out: str | Path) -> Path:
    """``out`` created if needed; refused when it holds files that an export does not write."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)   # OSError (unwritable, a file in the way): exit code 4
    ours = {*FILES.values(), MANIFEST}
    others = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(".export-"))
    if others:
        raise UsageError(f"{out} holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                         "give an empty or new folder, or one an earlier export wrote")
    if not os.access(out, os.W_OK):
        raise PermissionError(13, "Permission denied", str(out))
    (out / MANIFEST).unlink(missing_ok=True)  # the manifest is written last: a cut export does not load
    return out


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / f".export-{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(tmp, out / MANIFEST)


def export_onnx(backbone, out: str | Path, *, format: str = "onnx", int8: bool = False,
                opset: int = DEFAULT_OPSET, progress: bool | None = None) -> dict:
    """Export both towers of a Backbone to ONNX, checked against PyTorch with ONNX Runtime.

    Parameters
    ----------
    backbone : Backbone
        An fp32 model on the CPU (:func:`cliplab.load`).
    out : path
        Folder to write (created; may hold an earlier export, which is replaced).
    format : {"onnx"}
    int8 : bool, default=False
        Store the weights as int8 (:func:`quantize_export`); the fp32 files are made in a
        temporary folder inside ``out`` and removed.
    opset : int, default=18
        14 to 20 (:data:`OPSETS`).
    progress : bool, optional

    Returns
    -------
    dict
        The manifest written to ``out/cliplab_export.json``.  ``check`` holds the max abs
        difference of each fp32 tower to PyTorch on a batch of 3 (or, with ``int8``, the
        smallest cosine of the int8 features to PyTorch's).

    Raises
    ------
    UsageError
        Unknown format, an opset outside :data:`OPSETS`, not an fp32 CPU Backbone, onnx or
        onnxruntime not installed, or ``out`` holds other files.
    ModelLoadError
        torch cannot export a tower of this model.
    OSError
        ``out`` cannot be written.

    Examples
    --------
    >>> import cliplab
    >>> from cliplab.models.export import export_onnx
    >>> manifest = export_onnx(cliplab.load("shapes-tiny"), "tiny-onnx")   # doctest: +SKIP
    >>> cliplab.load("tiny-onnx").encode_texts(["a red star"]).shape         # doctest: +SKIP
    (1, 128)
    """
    check_choice("format", format, FORMATS)
    if not (isinstance(opset, int) and OPSETS[0] <= opset <= OPSETS[1]):
        raise UsageError(f"opset {opset!r}: the export writes opsets {OPSETS[0]} to {OPSETS[1]}")
    require("onnx", "onnxruntime", what="ONNX export")
    _check_exportable(backbone)
    out = _prepare_out(out)
    if int8:
        with tempfile.TemporaryDirectory(prefix=".export-fp32-", dir=out) as tmp:
            export_onnx(backbone, tmp, opset=opset, progress=progress)
            return quantize_export(tmp, out, reference=backbone, _replace=True)
    import onnx

    model = backbone.model
    H, W = backbone._input_shape()[1:]
    examples = {"image": torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(0)),
                "text": backbone.tokenize(CHECK_TEXTS[:2])}
    towers = {"image": _ImageTower(model).eval(), "text": _TextTower(model).eval()}
    with progress_bar(total=3, progress=progress, desc="export onnx", unit="step") as bar, _quiet_exporters():
        for tower in TOWERS:
            tmp = out / f".export-{FILES[tower]}"
            _export_tower(towers[tower], examples[tower], tmp, tower=tower, opset=opset)
            onnx.checker.check_model(str(tmp))
            os.replace(tmp, out / FILES[tower])
            bar.update(1)
        check = {t: float(np.abs(got - want).max()) for t, (got, want) in _compare(backbone, out, FILES).items()}
        bar.update(1)
    manifest = _manifest(backbone, out, precision="fp32", opset=opset,
                         check={"max_abs_diff": check, "batch": 3})
    _write_manifest(out, manifest)
    logger.info("exported %s to %s (max abs diff to PyTorch: %s)", backbone.name, out, check)
    return manifest


def _check_inputs(backbone) -> dict[str, torch.Tensor]:
    """A batch of 3 per tower, different from the export examples (the batch axis is dynamic)."""
    H, W = backbone._input_shape()[1:]
    return {"image": torch.randn(3, 3, H, W, generator=torch.Generator().manual_seed(1)),
            "text": backbone.tokenize(CHECK_TEXTS)}


def _compare(backbone, out: Path, files: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """ONNX Runtime's and PyTorch's features (3, D) per tower, on :func:`_check_inputs`."""
    import onnxruntime as ort

    inputs = _check_inputs(backbone)
    towers = {"image": _ImageTower(backbone.model).eval(), "text": _TextTower(backbone.model).eval()}
    pairs = {}
    for tower in TOWERS:
        session = ort.InferenceSession(str(out / files[tower]), providers=["CPUExecutionProvider"])
        got = session.run([OUTPUT], {INPUTS[tower]: inputs[tower].numpy()})[0]      # (3, D)
        with torch.no_grad():
            pairs[tower] = got, towers[tower](inputs[tower]).numpy()                # (3, D)
    return pairs


def _manifest(backbone, out: Path, *, precision: str, opset: int, check: dict,
              quantization: dict | None = None) -> dict:
    import onnx
    import onnxruntime

    T, D = backbone.context_length, backbone.embed_dim
    H, W = backbone._input_shape()[1:]
    tok = backbone.tokenizer
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "model": backbone.name, "fingerprint": backbone.fingerprint,
        "precision": precision, "quantization": quantization,
        "opset": opset, "exporter": "torch.onnx.export (TorchScript)",
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "files": {t: _file_entry(out / FILES[t]) for t in TOWERS},
        "inputs": {"image": {"name": INPUTS["image"], "shape": ["batch", 3, H, W], "dtype": "float32"},
                   "text": {"name": INPUTS["text"], "shape": ["batch", T], "dtype": "int64"}},
        "outputs": {t: {"name": OUTPUT, "shape": ["batch", D], "dtype": "float32", "l2_normalized": True}
                    for t in TOWERS},
        "embed_dim": D, "image_size": [H, W], "context_length": T,
        "tokenizer": {"type": type(tok).__name__, "context_length": T,
                      "hf_tokenizer_name": backbone.model_cfg.get("text_cfg", {}).get("hf_tokenizer_name")},
        "logit_scale": backbone.logit_scale, "logit_bias": backbone.logit_bias,
        "model_cfg": backbone.model_cfg, "preprocess_cfg": backbone.preprocess_cfg,
        "check": check,
    }


def quantize_export(src: str | Path, out: str | Path, *, per_channel: bool = False,
                    reference=None, _replace: bool = False) -> dict:
    """Write an int8 copy of an fp32 export with ONNX Runtime's dynamic quantization.

    Parameters
    ----------
    src : path
        An fp32 export folder (:func:`export_onnx`).
    out : path
        Folder to write (created; not ``src``).
    per_channel : bool, default=False
        One weight scale per output channel instead of per tensor.
    reference : Backbone, optional
        The PyTorch model of the export: the manifest's ``check`` then records the smallest
        cosine of the int8 features to its features (batch of 3 per tower).

    Returns
    -------
    dict
        The manifest written to ``out``; ``quantization`` holds the method, the weight
        type, ``fp32_bytes`` and ``int8_bytes`` per tower and their ``size_ratio``.

    Raises
    ------
    UsageError
        ``src`` is not an fp32 export, ``out`` is ``src`` or holds other files, or
        onnxruntime is not installed.
    ModelLoadError
        A bad manifest in ``src``, or ONNX Runtime cannot quantize a tower.
    """
    require("onnx", "onnxruntime", what="INT8 quantization")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = Path(src)
    manifest = read_manifest(src)
    if manifest["precision"] != "fp32":
        raise UsageError(f"{src} is a {manifest['precision']} export; quantize an fp32 export")
    if Path(out).resolve() == src.resolve():
        raise UsageError("write the int8 export to another folder than its fp32 source")
    out = Path(out) if _replace else _prepare_out(out)
    fp32_bytes, int8_bytes = {}, {}
    with _quiet_exporters():
        for tower in TOWERS:
            path = src / manifest["files"][tower]["path"]
            tmp = out / f".export-{FILES[tower]}"
            try:
                quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel)
            except Exception as e:
                raise ModelLoadError(f"ONNX Runtime could not quantize {path}: {type(e).__name__}: {e}") from e
            os.replace(tmp, out / FILES[tower])
            fp32_bytes[tower], int8_bytes[tower] = path.stat().st_size, (out / FILES[tower]).stat().st_size
    for leftover in out.glob("*-inferred.onnx"):  # older quantizers leave their shape-inference copy
        leftover.unlink()
    total = sum(fp32_bytes.values()) / sum(int8_bytes.values())
    quantization = {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "int8",
                    "per_channel": per_channel, "activations": "uint8, range per batch at run time",
                    "fp32_bytes": fp32_bytes, "int8_bytes": int8_bytes,
                    "size_ratio": {**{t: fp32_bytes[t] / int8_bytes[t] for t in TOWERS}, "total": total}}
    new = {**manifest, "precision": "int8", "quantization": quantization,
           "files": {t: _file_entry(out / FILES[t]) for t in TOWERS}}
    if reference is not None:
        pairs = _compare(reference, out, FILES)  # both L2-normalised: the row dot products are cosines
        new["check"] = {"min_cosine_to_pytorch": {t: float((got * want).sum(1).min())
                                                  for t, (got, want) in pairs.items()}, "batch": 3}
    else:
        new["check"] = {"fp32_source": manifest["check"]}
    _write_manifest(out, new)
    logger.info("quantized %s to int8 in %s: %.2fx smaller", src, out, total)
    return new
