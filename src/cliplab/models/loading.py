"""``cliplab.load``: one entry point for every kind of CLIP checkpoint, offline first.

A spec is resolved by the first source of the :data:`SOURCES` registry whose ``match``
accepts it, in registration order (register more with
``@SOURCES.register(name, match=..., help=...)``):

==================  ================================================================
spec                source
==================  ================================================================
``shapes-tiny``     a model bundled inside the package
``hf-hub:org/name`` an open_clip repository on the Hugging Face Hub (or its cache)
``ARCH:TAG``        an open_clip pretrained tag, e.g. ``ViT-B-32:openai``
a folder            open_clip folder (``open_clip_config.json`` + weights), an ONNX
                    export (``cliplab_export.json``, written by ``cliplab export``: an
                    ``OnnxBackbone`` run by ONNX Runtime), a sentence-encoder model
                    (``cliplab_sentence_clip.json``: a ``SentenceBackbone``), or a
                    Hugging Face ``transformers`` CLIP folder (``config.json``)
a file              ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin``: open_clip or
                    OpenAI-format weights; architecture from ``arch=``, ``config=``,
                    the config a cliplab-written file carries, a config JSON beside
                    it, or the tensor shapes (see below)
==================  ================================================================

Tensor shapes give every size of a CLIP but not its attention head count nor its
activation (GELU or QuickGELU).  Loading never guesses them: OpenAI's own format
has certain conventions (64-wide heads, QuickGELU), anything else needs them
recorded (a config) or given (``heads=``, ``quick_gelu=``), else
:class:`cliplab.errors.AmbiguousCheckpoint` names what is missing.

Downloads keep open_clip's real path.  Without network they fail at once with
:class:`cliplab.errors.OfflineError`, whose message says where to put the files.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch

from ..errors import AmbiguousCheckpoint, CheckpointMismatch, CliplabError, ModelLoadError, OfflineError, UsageError
from ..registry import Registry
from ..validation import check_choice
from .backbone import Backbone
from .transforms import default_preprocess_cfg

logger = logging.getLogger(__name__)

__all__ = ["load", "SOURCES", "list_sources", "build_model", "LoadOptions"]

PRECISIONS = ("fp32", "fp16", "bf16")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
BUNDLED_DIR = Path(__file__).parent / "bundled"


@dataclass
class LoadOptions:
    """Everything a source needs besides the spec (see :func:`load`)."""

    device: str = "cpu"
    precision: str = "fp32"
    arch: str | None = None
    config: str | None = None
    quick_gelu: bool | None = None
    heads: int | dict | None = None
    trust_pickle: bool = False
    cache_dir: str | None = None


@dataclass
class Resolved:
    """What a source returns: config, weights and preprocessing, before building."""

    model_cfg: dict
    state_dict: dict | None
    preprocess_cfg: dict
    name: str
    model: torch.nn.Module | None = None  # set when open_clip built it already


SOURCES: Registry[Callable[[str, LoadOptions], Resolved | Backbone]] = Registry("model source")
"""Model sources: ``fn(spec, options) -> Resolved`` (or a ready Backbone: ``local`` returns
an ``OnnxBackbone`` for an ONNX export folder), registered with the metadata
``match`` (``match(spec) -> bool``: the source accepts this spec), ``example`` (a spec it
loads) and ``help`` (one line).
:func:`load` asks them in registration order; the first that matches loads the spec."""


def list_sources() -> list[str]:
    """Names of the model sources, in the order :func:`load` tries them."""
    return SOURCES.names()


# --------------------------------------------------------------------- building
def build_model(model_cfg: dict, *, precision: str = "fp32", device: str = "cpu") -> torch.nn.Module:
    """Instantiate an open_clip ``CLIP``/``CustomTextCLIP`` from a model config dict.

    cliplab's own part of the config, ``model_cfg["cliplab"]`` (stored as a top-level
    ``"cliplab"`` object beside open_clip's ``model_cfg``, which open_clip ignores), changes
    the architecture before any weights are loaded:

    - ``"attention"`` swaps the attention blocks for
      :class:`~cliplab.models.attention.OutlierFreeAttention` as recorded (clipped softmax,
      gates);
    - ``"moe"`` (written by :func:`cliplab.surgery.moe.upcycle`) turns the MLPs it names
      into mixture-of-experts blocks (:mod:`cliplab.models.moe`).

    Raises
    ------
    ModelLoadError
        The config cannot build a model, or its ``cliplab`` part names something this
        cliplab does not know.
    """
    from open_clip.factory import _set_model_device_and_precision
    from open_clip.model import CLIP, CustomTextCLIP, get_cast_dtype

    from .attention import swap_attention
    from .moe import MOE_KEY, install_moe

    cfg = {k: v for k, v in model_cfg.items() if k not in ("custom_text", "preprocess_cfg", "cliplab")}
    extra = model_cfg.get("cliplab") or {}
    unknown = sorted(set(extra) - {"attention", MOE_KEY}) if isinstance(extra, dict) else ["(not an object)"]
    if unknown:
        raise ModelLoadError(f"the model config's 'cliplab' entry has unknown key(s) {', '.join(unknown)}; "
                             "it was written by a newer cliplab, or edited")
    custom = model_cfg.get("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    cls = CustomTextCLIP if custom else CLIP
    try:
        model = cls(**cfg, cast_dtype=get_cast_dtype(precision))
        if extra.get(MOE_KEY):  # an upcycled model (cliplab.surgery.moe): the same MoE blocks
            install_moe(model, extra[MOE_KEY])
    except CliplabError:
        raise
    except (TypeError, ValueError, KeyError, AssertionError, ZeroDivisionError, RuntimeError) as e:
        # a config whose values cannot build a model (0 heads, a width heads do not divide...)
        raise ModelLoadError(f"invalid open_clip model config: {type(e).__name__}: {e}") from e
    if extra.get("attention") is not None:
        try:
            swap_attention(model, extra["attention"])
        except UsageError as e:
            raise ModelLoadError(f"the model's recorded attention (cliplab.attention) cannot be built: {e}") from None
    _set_model_device_and_precision(model, torch.device(device), precision)
    return model.eval()


def make_tokenizer(model_cfg: dict):
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    text_cfg = model_cfg.get("text_cfg", {})
    ctx = int(text_cfg.get("context_length", 77))
    hf_name = text_cfg.get("hf_tokenizer_name")
    if hf_name:
        try:
            return HFTokenizer(hf_name, context_length=ctx, **text_cfg.get("tokenizer_kwargs", {}))
        except Exception as e:  # offline hub
            raise OfflineError(f"could not load the tokenizer {hf_name!r}: {e}") from e
    return SimpleTokenizer(context_length=ctx)


def _finish(res: Resolved, opts: LoadOptions) -> Backbone:
    from open_clip.factory import _set_model_device_and_precision

    from .state_dicts import apply_heads, check_state_dict

    cfg = dict(res.model_cfg)
    if opts.heads is not None:
        if res.model is not None:
            raise UsageError(f"heads= sets the head count of weights without a config; {res.name} "
                             "is built by open_clip from its own config")
        cfg = apply_heads(cfg, opts.heads)
    if opts.quick_gelu is not None:
        cfg["quick_gelu"] = bool(opts.quick_gelu)
    model = res.model
    if model is None:
        model = build_model(cfg, precision="fp32", device="cpu")
        if res.state_dict is not None:
            check_state_dict(model, res.state_dict)
    _set_model_device_and_precision(model, torch.device(opts.device), opts.precision)
    return Backbone(model.eval(), model_cfg=cfg, preprocess_cfg=res.preprocess_cfg,
                    tokenizer=make_tokenizer(cfg), name=res.name, device=opts.device,
                    precision=opts.precision)


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"invalid device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {device!r} requested but MPS is not available; use device='cpu'")


def load(spec: str | os.PathLike, *, device: str = "cpu", precision: str = "fp32",
         arch: str | None = None, config: str | os.PathLike | None = None,
         quick_gelu: bool | None = None, heads: int | dict | None = None,
         trust_pickle: bool = False, cache_dir: str | None = None) -> Backbone:
    """Load a CLIP model as a :class:`~cliplab.models.backbone.Backbone`.

    Parameters
    ----------
    spec : str or path
        ``"shapes-tiny"``, ``"ARCH:TAG"`` (``"ViT-B-32:openai"``), ``"hf-hub:org/name"``,
        an open_clip or Hugging Face folder, a weights file, or a folder written by
        ``cliplab export --format onnx`` (an :class:`~cliplab.models.onnx_backbone.OnnxBackbone`).
    device : str, default="cpu"
    precision : {"fp32", "fp16", "bf16"}, default="fp32"
    arch : str, optional
        open_clip architecture name for a bare weights file (e.g. ``"ViT-B-32"``).
    config : path, optional
        open_clip config JSON for a bare weights file.
    quick_gelu : bool, optional
        The activation: QuickGELU (True) or GELU (False), overriding any config.
        A bare weights file records it only when cliplab wrote it; OpenAI's own
        format means QuickGELU; otherwise give it (or ``arch=`` / ``config=``).
    heads : int or {"vision": int, "text": int}, optional
        Attention heads of both towers (or of each), overriding any config; the
        shapes of a bare weights file do not show them.  Not for ``ARCH:TAG``.
    trust_pickle : bool, default=False
        Allow checkpoints that need arbitrary code to unpickle (TorchScript
        archives, pickled objects).  Only for files you trust.
    cache_dir : str, optional
        Download cache for hub models.

    Raises
    ------
    ModelLoadError, OfflineError, CheckpointMismatch, UnsafeCheckpoint
    AmbiguousCheckpoint
        A bare weights file records neither its head count nor its activation
        and is not in OpenAI's format; the message names what to pass.
    UsageError
        A bad ``precision``, ``device`` or ``heads``.
    """
    check_choice("precision", precision, PRECISIONS)
    _check_device(device)
    spec = str(spec)
    opts = LoadOptions(device=device, precision=precision, arch=arch,
                       config=None if config is None else str(config), quick_gelu=quick_gelu,
                       heads=heads, trust_pickle=trust_pickle, cache_dir=cache_dir)
    for name, fn in SOURCES.items():
        if SOURCES.meta(name)["match"](spec):
            logger.info("loading %r with the %s source", spec, name)
            res = fn(spec, opts)
            return res if isinstance(res, Backbone) else _finish(res, opts)
    raise ModelLoadError(
        f"cannot resolve model spec {spec!r}: not a bundled model ({', '.join(bundled_models())}), "
        "not 'ARCH:TAG' (see `cliplab models`), not 'hf-hub:org/name', and no such file or folder")


# ---------------------------------------------------------------------- sources
def bundled_models() -> list[str]:
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "open_clip_config.json").is_file())


def _read_open_clip_config(path: Path) -> tuple[dict, dict]:
    from .convert import read_json_object
    from .state_dicts import join_cliplab_config

    data = read_json_object(path)
    return _checked_config(join_cliplab_config(data, path), data.get("preprocess_cfg", {}), path)


def _checked_config(model_cfg, preprocess_cfg, where) -> tuple[dict, dict]:
    """``(model_cfg, preprocess_cfg)`` with the preprocessing defaults filled in, once validated."""
    if not (isinstance(model_cfg, dict) and "embed_dim" in model_cfg
            and isinstance(model_cfg.get("vision_cfg"), dict) and isinstance(model_cfg.get("text_cfg", {}), dict)):
        raise ModelLoadError(f"{where} is not an open_clip config (needs embed_dim and vision_cfg, "
                             "text_cfg objects)")
    if not isinstance(preprocess_cfg, dict):
        raise ModelLoadError(f"{where}: preprocess_cfg must be a JSON object")
    pre = default_preprocess_cfg(model_cfg)
    pre.update(preprocess_cfg)
    return model_cfg, pre


def _open_clip_folder(path: Path, opts: LoadOptions, name: str) -> Resolved:
    from .state_dicts import read_state_dict

    model_cfg, pre = _read_open_clip_config(path / "open_clip_config.json")
    weights = _find_weights(path)
    if weights is None:
        raise ModelLoadError(f"{path} has open_clip_config.json but no weights file "
                             f"({', '.join(WEIGHT_SUFFIXES)})")
    return Resolved(model_cfg, read_state_dict(weights, trust_pickle=opts.trust_pickle), pre, name)


def _find_weights(folder: Path) -> Path | None:
    preferred = ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                 "model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"]
    for fname in preferred:
        if (folder / fname).is_file():
            return folder / fname
    found = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(found) > 1:  # which one the config describes is not ours to guess
        raise ModelLoadError(f"{folder} holds several weights files ({', '.join(p.name for p in found[:5])}) "
                             "and none of the standard names: load the file itself, with "
                             f"config={folder / 'open_clip_config.json'} (--config)")
    return found[0] if found else None


@SOURCES.register("bundled", match=lambda spec: spec in bundled_models(), example="shapes-tiny",
                  help="a model shipped inside the package (shapes-tiny)")
def _load_bundled(spec: str, opts: LoadOptions) -> Resolved:
    return _open_clip_folder(BUNDLED_DIR / spec, opts, spec)


def _local_path(spec: str) -> Path:
    """A file or folder spec; open_clip's ``local-dir:`` prefix is accepted too."""
    return Path(spec.removeprefix("local-dir:")).expanduser()


def _is_local(spec: str) -> bool:
    return _local_path(spec).exists()


@SOURCES.register("local", match=_is_local, example=".",
                  help="an open_clip, Hugging Face transformers or ONNX export folder, or a weights file")
def _load_local(spec: str, opts: LoadOptions) -> Resolved | Backbone:
    from .convert import read_hf_folder, read_hf_preprocess_cfg
    from .onnx_backbone import is_onnx_export, load_onnx_export
    from .sentence import is_sentence_folder, load_sentence_folder

    path = _local_path(spec)
    if path.is_dir():
        if is_onnx_export(path):  # written by `cliplab export --format onnx`: run by ONNX Runtime
            return load_onnx_export(path, device=opts.device, precision=opts.precision, arch=opts.arch,
                                    config=opts.config, quick_gelu=opts.quick_gelu, heads=opts.heads)
        if is_sentence_folder(path):  # a sentence-encoder text tower (SentenceBackbone.save)
            return load_sentence_folder(path, device=opts.device, precision=opts.precision, arch=opts.arch,
                                        config=opts.config, quick_gelu=opts.quick_gelu, heads=opts.heads)
        if (path / "open_clip_config.json").is_file():
            return _open_clip_folder(path, opts, path.name)
        if (path / "config.json").is_file():  # read_hf_folder says what is wrong with it
            model_cfg, sd = read_hf_folder(path)
            pre = {**default_preprocess_cfg(model_cfg), **(read_hf_preprocess_cfg(path) or {})}
            return Resolved(model_cfg, sd, pre, path.name)
        raise ModelLoadError(f"{path} is a folder with neither open_clip_config.json nor a "
                             "Hugging Face CLIP config.json")
    return _weights_file(path, opts)


def _weights_file(path: Path, opts: LoadOptions) -> Resolved:
    from .state_dicts import TORCHSCRIPT_INT_ENTRIES, is_torchscript_archive, read_saved_config, read_state_dict

    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelLoadError(f"{path}: unknown weights format {path.suffix!r}; "
                             f"expected one of {', '.join(WEIGHT_SUFFIXES)}")
    sd = read_state_dict(path, trust_pickle=opts.trust_pickle)
    if any(k.startswith(("text_model.", "vision_model.")) for k in sd):
        raise CheckpointMismatch(f"{path} holds Hugging Face transformers weights: load the folder "
                                 "that contains it and its config.json instead")
    # OpenAI's own releases are TorchScript archives whose state dicts carry integer
    # entries (input_resolution, context_length, vocab_size); they need QuickGELU.
    openai_format = is_torchscript_archive(path) or any(k in sd for k in TORCHSCRIPT_INT_ENTRIES)
    for key in TORCHSCRIPT_INT_ENTRIES:
        sd.pop(key, None)
    beside = [p for p in (path.with_suffix(".json"), path.parent / "open_clip_config.json") if p.is_file()]
    if opts.arch:
        model_cfg = _arch_config(opts.arch)
        if openai_format and not model_cfg.get("quick_gelu") and opts.quick_gelu is None:
            logger.warning("%s is in OpenAI's format, trained with QuickGELU, but arch %r uses GELU: "
                        "switching to QuickGELU (pass arch='%s-quickgelu' to silence, or "
                        "quick_gelu=False to force GELU)", path.name, opts.arch, opts.arch)
            model_cfg["quick_gelu"] = True
        pre = default_preprocess_cfg(model_cfg)
    elif opts.config:
        model_cfg, pre = _read_open_clip_config(Path(opts.config))
    elif (saved := read_saved_config(path)) is not None:  # written by cliplab: exact
        model_cfg, pre = _checked_config(*saved, f"{path} (its open_clip_config metadata)")
    elif beside:
        model_cfg, pre = _read_open_clip_config(beside[0])
    else:
        model_cfg = _infer_config(path, sd, openai_format, opts)
        pre = default_preprocess_cfg(model_cfg)
    return Resolved(model_cfg, sd, pre, path.stem)


def _infer_config(path: Path, sd: dict, openai_format: bool, opts: LoadOptions) -> dict:
    """Model config of bare weights from their shapes; refuses what the shapes cannot tell."""
    from .state_dicts import infer_model_cfg

    model_cfg = infer_model_cfg(sd, heads=None)  # checks the layout first
    if openai_format:  # OpenAI's conventions are certain: 64-wide heads, QuickGELU
        heads = "openai" if opts.heads is None else opts.heads
        quick_gelu = True if opts.quick_gelu is None else bool(opts.quick_gelu)
    else:
        missing, args = [], []
        if opts.heads is None:
            widths = f"vision width {model_cfg['vision_cfg']['width']}, text width {model_cfg['text_cfg']['width']}"
            missing.append(f"its attention head count ({widths})")
            args.append("heads= (--heads)")
        if opts.quick_gelu is None:
            missing.append("its activation (GELU or QuickGELU)")
            args.append("quick_gelu= (--quick-gelu / --no-quick-gelu)")
        if missing:
            raise AmbiguousCheckpoint(
                f"{path.name} records neither a config nor {' nor '.join(missing)}, and tensor shapes "
                f"cannot tell: pass arch= (--arch, e.g. ViT-B-32 or ViT-B-32-quickgelu), or "
                f"{' and '.join(args)}, or put its open_clip config beside it as {path.with_suffix('.json').name}")
        heads, quick_gelu = opts.heads, bool(opts.quick_gelu)
    from .state_dicts import apply_heads

    try:
        model_cfg = apply_heads(model_cfg, heads)
    except AmbiguousCheckpoint as e:
        raise AmbiguousCheckpoint(f"{path.name}: {e}") from e
    model_cfg["quick_gelu"] = quick_gelu
    logger.info("%s: architecture inferred from the tensor shapes (heads %s, quick_gelu=%s)",
             path.name, heads, quick_gelu)
    return model_cfg


def _arch_config(arch: str) -> dict:
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ModelLoadError(f"unknown open_clip architecture {arch!r}; `cliplab models --all` lists them")
    cfg = dict(cfg)
    if arch.endswith("-quickgelu"):
        cfg["quick_gelu"] = True
    return cfg


# ---------------------------------------------------------------------- network
def _hub_endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(_hub_endpoint(), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached(repo_id: str, filename: str, cache_dir: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    return isinstance(hit, str)


def _offline_message(what: str, repo_id: str, filenames: list[str], hint: str) -> str:
    host, _ = _hub_endpoint()
    return (f"cannot download {what}: the Hugging Face Hub ({host}) is not reachable and the files "
            f"are not in the cache. Either run once with network access (files go to "
            f"~/.cache/huggingface/hub, or HF_HOME), or download {' / '.join(filenames)} from "
            f"https://{host}/{repo_id} and load it locally: {hint}")


def _is_tag(spec: str) -> bool:
    if ":" not in spec or spec.startswith("hf-hub:") or _is_local(spec):
        return False
    import open_clip

    arch, _, tag = spec.partition(":")
    return arch in open_clip.list_models() and bool(tag)


@SOURCES.register("open_clip-tag", match=_is_tag, example="ViT-B-32:openai",
                  help="an open_clip pretrained tag, ARCH:TAG (e.g. ViT-B-32:openai)")
def _load_tag(spec: str, opts: LoadOptions) -> Resolved:
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    arch, _, tag = spec.partition(":")
    pcfg = get_pretrained_cfg(arch, tag)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ModelLoadError(f"no pretrained tag {tag!r} for {arch}; known tags: {', '.join(tags) or 'none'}")
    model_cfg = _arch_config(arch)
    if opts.quick_gelu is not None:  # the user's choice, built into the model below
        model_cfg["quick_gelu"] = bool(opts.quick_gelu)
    elif pcfg.get("quick_gelu", False) and not model_cfg.get("quick_gelu", False):
        logger.info("%s was trained with QuickGELU; using it (open_clip name %s-quickgelu)", spec, arch)
        model_cfg["quick_gelu"] = True
    repo = pcfg.get("hf_hub", "").rstrip("/")
    if repo and not hub_reachable():
        files = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if not any(_cached(repo, f, opts.cache_dir) for f in files):
            raise OfflineError(_offline_message(
                spec, repo, files, f"cliplab.load('/path/to/file', arch='{arch}"
                f"{'-quickgelu' if model_cfg.get('quick_gelu') else ''}')"))
    elif not repo and pcfg.get("url") and not _url_reachable(pcfg["url"]):
        raise OfflineError(f"cannot download {spec} from {pcfg['url']} (no network); download it "
                           f"elsewhere and run cliplab.load('/path/to/file', arch='{arch}')")
    try:
        model = open_clip.create_model(arch, pretrained=tag, cache_dir=opts.cache_dir,  # on CPU, fp32
                                       quick_gelu=bool(model_cfg.get("quick_gelu", False)))
    except Exception as e:
        raise ModelLoadError(f"open_clip could not load {spec}: {e}") from e
    pre = default_preprocess_cfg(model_cfg)
    pre.update({k: pcfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pcfg})
    return Resolved(model_cfg, None, pre, spec, model=model)


def _url_reachable(url: str, timeout: float = 3.0) -> bool:
    u = urlparse(url)
    try:
        socket.create_connection((u.hostname, u.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@SOURCES.register("hf-hub", match=lambda spec: spec.startswith("hf-hub:"), example="hf-hub:org/name",
                  help="an open_clip repository on the Hugging Face Hub, hf-hub:org/name")
def _load_hf_hub(spec: str, opts: LoadOptions) -> Resolved:
    repo = spec[len("hf-hub:"):].strip("/")
    if not repo or "/" not in repo:
        raise UsageError(f"expected 'hf-hub:org/name', got {spec!r}")
    if not hub_reachable() and not _cached(repo, "open_clip_config.json", opts.cache_dir):
        raise OfflineError(_offline_message(
            spec, repo, ["open_clip_config.json", "open_clip_model.safetensors"],
            "put both in one folder and run cliplab.load('/path/to/folder')"))
    from huggingface_hub import hf_hub_download

    try:
        cfg_path = Path(hf_hub_download(repo, "open_clip_config.json", cache_dir=opts.cache_dir))
    except Exception as e:
        raise ModelLoadError(f"could not fetch open_clip_config.json from {repo}: {e}") from e
    model_cfg, pre = _read_open_clip_config(cfg_path)
    from .state_dicts import read_state_dict

    for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        try:
            weights = hf_hub_download(repo, fname, cache_dir=opts.cache_dir)
        except Exception:
            continue
        return Resolved(model_cfg, read_state_dict(weights, trust_pickle=opts.trust_pickle), pre, spec)
    raise ModelLoadError(f"{repo} has no open_clip weights (open_clip_model.safetensors)")
