"""Read, inspect and check open_clip / OpenAI-format CLIP state dicts.

Three jobs, each a function:

* :func:`read_state_dict` turns a checkpoint file (safetensors, a ``torch.save``
  pickle, or OpenAI's original TorchScript archive) into a flat
  ``{name: tensor}`` dict, refusing anything that needs pickled code unless the
  caller trusts the file.  :func:`save_state_dict` writes safetensors that carry
  their open_clip config, which :func:`read_saved_config` reads back.
* :func:`infer_model_cfg` reads the architecture off the tensor shapes, the way
  OpenAI's ``build_model`` does, and returns an open_clip ``model_cfg`` dict;
  the head count, which shapes do not show, comes from the caller.
* :func:`check_state_dict` loads a state dict strictly into a model and, when
  it does not fit, raises :class:`~cliplab.errors.CheckpointMismatch` with a
  message that names the likely fix.

The key layout is the one of ``open_clip.model.CLIP`` (which is also OpenAI's):
``visual.*`` for the image tower, ``transformer.*``, ``token_embedding``,
``positional_embedding``, ``ln_final``, ``text_projection`` for the text tower,
and ``logit_scale``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import pickletools
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import AmbiguousCheckpoint, CheckpointMismatch, ModelLoadError, UnsafeCheckpoint

__all__ = ["read_state_dict", "save_state_dict", "read_saved_config", "infer_model_cfg",
           "check_state_dict", "mismatch_hints", "apply_heads", "sniff_format"]

logger = logging.getLogger("cliplab.models.state_dicts")

# Integer attributes that OpenAI's TorchScript archives keep next to the weights.
TORCHSCRIPT_INT_ENTRIES = ("input_resolution", "context_length", "vocab_size")
# Wrappers used by training scripts around the model weights, tried in order.
_WRAPPER_KEYS = ("state_dict", "model")
# How many offending keys an error message lists.
_SHOW = 5

# safetensors ``__metadata__`` key holding ``{"model_cfg": ..., "preprocess_cfg": ...}`` as JSON.
CONFIG_METADATA_KEY = "open_clip_config"
# Pickle opcodes that import a global (a class or function) when unpickled.
_GLOBAL_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ"})

_TRUST_HINT = "pass trust_pickle=True (command line: --trust-pickle) only if you trust its origin"


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def read_state_dict(path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a CLIP checkpoint file into a flat state dict on the CPU.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.safetensors`` file, or a ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``
        file written by ``torch.save`` (or OpenAI's TorchScript archive).
    trust_pickle : bool, default=False
        Allow files whose loading runs pickled code: TorchScript archives and
        pickles holding objects other than tensors and plain containers.  Leave
        it off for files from the internet; safetensors never need it.

    Returns
    -------
    dict of str to torch.Tensor
        The weights.  A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is
        unwrapped, a ``module.`` prefix (DataParallel / DDP) is removed and
        non-tensor entries (epoch counters, optimizer settings) are dropped.

    Raises
    ------
    ModelLoadError
        The file is missing, empty, truncated, of another kind (an image, a Git
        LFS pointer, a web page...) or holds no tensors.
    UnsafeCheckpoint
        A well-formed pickle or TorchScript archive needs code to load and
        ``trust_pickle`` is False.

    Notes
    -----
    The format is read from the file's first bytes, not its suffix, so a
    safetensors file named ``.bin`` loads too.

    OpenAI's original ``ViT-B-32.pt`` and friends are TorchScript archives: a
    zip holding ``code/`` and ``constants.pkl`` besides the weights.  With
    ``trust_pickle=True`` they are opened with ``torch.jit.load`` and their
    ``state_dict()`` is returned without the integer entries
    ``input_resolution``, ``context_length`` and ``vocab_size``.

    Examples
    --------
    >>> import tempfile, os, torch
    >>> f = os.path.join(tempfile.mkdtemp(), "w.pt")
    >>> torch.save({"state_dict": {"module.logit_scale": torch.tensor(4.6)}}, f)
    >>> list(read_state_dict(f))
    ['logit_scale']
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "no such file"
        raise ModelLoadError(f"{path}: {what}")
    kind = sniff_format(path)
    if kind == "safetensors":
        raw = _read_safetensors(path)
    elif kind == "zip" and is_torchscript_archive(path):
        raw = _read_torchscript(path, trust_pickle)
    elif kind in ("zip", "pickle"):
        raw = _read_pickle(path, trust_pickle)
    else:
        raise ModelLoadError(f"{path}: not a readable checkpoint: {kind}")
    return _flatten(raw, path)


# First bytes of files that people mistake for weights, and what to call them.
_FOREIGN_MAGIC = (
    (b"\x89PNG", "it is a PNG image"),
    (b"\xff\xd8\xff", "it is a JPEG image"),
    (b"GIF8", "it is a GIF image"),
    (b"\x1f\x8b", "it is gzip-compressed; decompress it first"),
    (b"version https://git-lfs", "it is a Git LFS pointer, not the weights; fetch them with `git lfs pull`"),
)


def sniff_format(path) -> str:
    """What a checkpoint file holds, from its first bytes.

    Returns
    -------
    str
        ``"safetensors"``, ``"zip"`` (``torch.save`` or TorchScript), ``"pickle"``
        (legacy ``torch.save``), or otherwise a phrase saying what the file is
        (``"it is a PNG image"``, ``"the file is empty"``...) for an error message.
    """
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "the file is empty"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0:
        return "safetensors"  # 8-byte header length, then the JSON header
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"  # PROTO opcode, protocols 2-5
    for magic, what in _FOREIGN_MAGIC:
        if head.startswith(magic):
            return what
    text = head.lstrip()
    if text.startswith(b"<"):
        return "it is an HTML or XML page (a failed download?)"
    if text.startswith((b"{", b"[")):
        return "it is JSON text, not weights"
    return "neither safetensors nor a torch.save file (truncated or of another kind)"


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise ModelLoadError(f"{path}: not a readable safetensors file, truncated or corrupt "
                             f"({_first_line(exc)})") from exc


def is_torchscript_archive(path: Path) -> bool:
    """True for a zip written by ``torch.jit.save`` (it holds code, not only data)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _read_torchscript(path: Path, trust_pickle: bool) -> dict:
    if not trust_pickle:
        raise UnsafeCheckpoint(
            f"{path} is a TorchScript archive (OpenAI's original format): opening it runs "
            f"the code stored inside; {_TRUST_HINT}, or convert it once to safetensors"
        )
    logger.warning("opening TorchScript archive %s (trusted by the caller)", path)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot open TorchScript archive ({exc})") from exc
    state_dict = dict(module.state_dict())
    for key in TORCHSCRIPT_INT_ENTRIES:
        state_dict.pop(key, None)
    return state_dict


def _read_pickle(path: Path, trust_pickle: bool):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses globals it does not know, and also garbage: only a
        # well-formed pickle that imports something needs code.
        if not _pickle_imports_code(path):
            raise ModelLoadError(f"{path}: not a readable checkpoint (a truncated or corrupt "
                                 f"pickle: {_weights_only_reason(exc)})") from exc
        if not trust_pickle:
            raise UnsafeCheckpoint(
                f"{path} is a pickle that needs code to load ({_weights_only_reason(exc)}); {_TRUST_HINT}"
            ) from exc
    except Exception as exc:  # truncated zip, wrong magic number, I/O error...
        raise ModelLoadError(f"{path}: not a readable checkpoint, truncated or corrupt "
                             f"({_first_line(exc).split('. ')[0]})") from exc
    logger.warning("unpickling %s with code execution allowed (trusted by the caller)", path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable checkpoint ({_first_line(exc)})") from exc


def _pickle_imports_code(path: Path) -> bool:
    """True when ``path`` holds well-formed pickles, at least one importing a global.

    The pickle opcodes are parsed with :mod:`pickletools`, which runs nothing.  A
    ``torch.save`` zip keeps its pickle in ``*/data.pkl``; a legacy file is a
    sequence of pickles (magic number, protocol, system info, object, storage
    keys) followed by raw storage bytes.  Truncated or random bytes fail to parse.
    """
    import io

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith("data.pkl")]
                if not names:
                    return False
                stream = io.BytesIO(zf.read(names[0]))
            pickles = 1
        else:
            stream = open(path, "rb")
            pickles = 5
        with stream:
            for _ in range(pickles):
                ops = [op.name for op, _, _ in pickletools.genops(stream)]
                if _GLOBAL_OPCODES.intersection(ops):
                    return True
    except Exception:  # truncated or not a pickle at all
        return False
    return False


def _weights_only_reason(exc: BaseException) -> str:
    """The informative line of torch's long weights_only error."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0].split(" was not an allowed global")[0] if lines else type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _flatten(raw, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap training-script wrappers and return only the tensors."""
    if isinstance(raw, torch.nn.Module):  # a pickled or scripted whole model
        raw = {k: v for k, v in raw.state_dict().items() if k not in TORCHSCRIPT_INT_ENTRIES}
    for key in _WRAPPER_KEYS:
        if isinstance(raw, Mapping) and isinstance(raw.get(key), (Mapping, torch.nn.Module)):
            raw = raw[key]
            if isinstance(raw, torch.nn.Module):
                raw = raw.state_dict()
            break
    if not isinstance(raw, Mapping):
        raise ModelLoadError(f"{path}: holds a {type(raw).__name__}, not a state dict")
    tensors = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    dropped = [str(k) for k in raw if str(k) not in tensors]
    if dropped:
        logger.debug("%s: ignoring %d non-tensor entries: %s", path, len(dropped), dropped[:_SHOW])
    if not tensors:
        raise ModelLoadError(f"{path}: holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


# --------------------------------------------------------------------------------------
# Writing weights with their config
# --------------------------------------------------------------------------------------


CLIPLAB_KEY = "cliplab"
"""Key of what cliplab adds to a model's config (``{"attention": spec}``, see
:mod:`cliplab.models.attention`): inside ``model_cfg`` in memory, a top-level key beside
``model_cfg`` in ``open_clip_config.json`` and in the safetensors metadata, where open_clip,
which builds ``CLIP(**model_cfg)``, does not see it."""


def split_cliplab_config(model_cfg: Mapping) -> tuple[dict, dict | None]:
    """``(open_clip's model_cfg, cliplab's part or None)`` of an in-memory ``model_cfg``."""
    cfg = _jsonable(model_cfg)
    return cfg, cfg.pop(CLIPLAB_KEY, None)


def join_cliplab_config(data: Mapping, where) -> dict:
    """The in-memory ``model_cfg`` of a stored config object: its ``model_cfg`` with the
    top-level ``"cliplab"`` object (if any) put back under ``model_cfg["cliplab"]``.

    Raises
    ------
    ModelLoadError
        ``"cliplab"`` is not a JSON object.
    """
    cfg = data.get("model_cfg", data)
    if not isinstance(cfg, Mapping):
        return cfg          # the caller says what is wrong with it
    cfg = dict(cfg)
    extra = data.get(CLIPLAB_KEY) if "model_cfg" in data else None
    if extra is not None:
        if not isinstance(extra, dict):
            raise ModelLoadError(f"{where}: the {CLIPLAB_KEY!r} entry must be a JSON object")
        cfg[CLIPLAB_KEY] = extra
    return cfg


def save_state_dict(path, state_dict: Mapping[str, torch.Tensor], *, model_cfg: Mapping | None = None,
                    preprocess_cfg: Mapping | None = None) -> Path:
    """Write weights as safetensors; with ``model_cfg`` the file carries its config.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.safetensors`` file to write (replaced if it exists).
    state_dict : mapping of str to torch.Tensor
        The weights; shared or non-contiguous tensors are copied as safetensors requires.
    model_cfg : mapping, optional
        open_clip model config.  Stored, with ``quick_gelu`` made explicit, as JSON
        under the ``__metadata__`` key ``"open_clip_config"`` with ``preprocess_cfg``,
        so that :func:`cliplab.load` rebuilds the model exactly from the file alone
        (``model_cfg["cliplab"]`` is stored beside it, see :data:`CLIPLAB_KEY`).
    preprocess_cfg : mapping, optional
        open_clip preprocess config stored beside ``model_cfg``.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    metadata = {"format": "pt"}
    if model_cfg is not None:
        cfg, extra = split_cliplab_config(model_cfg)
        cfg["quick_gelu"] = bool(cfg.get("quick_gelu", False))
        data = {"model_cfg": cfg, "preprocess_cfg": _jsonable(preprocess_cfg or {})}
        if extra is not None:
            data[CLIPLAB_KEY] = extra
        metadata[CONFIG_METADATA_KEY] = json.dumps(data, sort_keys=True)
    save_file(_own_memory(state_dict), str(path), metadata=metadata)
    return path


def read_saved_config(path) -> tuple[dict, dict] | None:
    """The ``(model_cfg, preprocess_cfg)`` that :func:`save_state_dict` stored in ``path``.

    Returns None for files without one (other safetensors, pickles).

    Raises
    ------
    ModelLoadError
        The stored config is not a JSON object with a ``model_cfg`` object.
    """
    if sniff_format(path) != "safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file, truncated or corrupt "
                             f"({_first_line(exc)})") from exc
    if CONFIG_METADATA_KEY not in metadata:
        return None
    try:
        data = json.loads(metadata[CONFIG_METADATA_KEY])
    except ValueError as exc:
        raise ModelLoadError(f"{path}: the {CONFIG_METADATA_KEY!r} metadata is not valid JSON ({exc}); "
                             "pass arch= (--arch) or config= (--config)") from exc
    if not (isinstance(data, dict) and isinstance(data.get("model_cfg"), dict)
            and isinstance(data.get("preprocess_cfg", {}), dict)):
        raise ModelLoadError(f"{path}: the {CONFIG_METADATA_KEY!r} metadata is not an open_clip config "
                             "(a JSON object with a model_cfg object); pass arch= (--arch) or config= (--config)")
    return join_cliplab_config(data, path), data.get("preprocess_cfg", {})


def _own_memory(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Contiguous CPU tensors that share no storage (what safetensors requires)."""
    seen, out = set(), {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------------------
# Inferring the architecture
# --------------------------------------------------------------------------------------


def _count_blocks(state_dict: Mapping, prefix: str) -> int:
    """Number of distinct ``{prefix}{i}.`` indices among the keys."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state_dict if (m := pattern.match(k))})


def infer_model_cfg(state_dict: Mapping[str, torch.Tensor], *, heads) -> dict:
    """Infer the open_clip ``model_cfg`` of a CLIP from its weight shapes.

    Parameters
    ----------
    state_dict : mapping of str to torch.Tensor
        Weights in the OpenAI / ``open_clip.model.CLIP`` layout, with a ViT or a
        ModifiedResNet image tower.
    heads : int, {"vision": int, "text": int}, "openai" or None
        Attention heads, which the shapes do not show (see :func:`apply_heads`);
        ``"openai"`` is OpenAI's convention of 64-wide heads.  None leaves
        ``vision_cfg.head_width`` and ``text_cfg.heads`` out: set them with
        :func:`apply_heads` before building, or open_clip's defaults apply.

    Returns
    -------
    dict
        ``{"embed_dim": int, "vision_cfg": {...}, "text_cfg": {...}}``, ready
        for ``open_clip.model.CLIP(**model_cfg)`` once heads are set.  ``quick_gelu`` is left out:
        the activation has no weights, so the caller must decide it (OpenAI's
        own checkpoints and open_clip's ``*-quickgelu`` models use QuickGELU).

    Raises
    ------
    CheckpointMismatch
        The keys are not those of an open_clip ``CLIP`` (e.g. a Hugging Face
        transformers checkpoint or a ``CustomTextCLIP`` with a ``text.`` tower).
    AmbiguousCheckpoint, UsageError
        From :func:`apply_heads`.

    Notes
    -----
    Read off the shapes, as OpenAI's ``build_model`` does:

    * ``embed_dim`` = ``text_projection.shape[1]``;
    * ViT: ``width`` = ``visual.conv1.weight.shape[0]``, ``patch_size`` = its
      kernel size, ``image_size`` = ``patch_size * sqrt(P - 1)`` with ``P`` rows
      in ``visual.positional_embedding``, ``layers`` = number of residual blocks;
    * ModifiedResNet: ``layers`` = blocks in each of ``visual.layer1..4``,
      ``width`` = ``visual.layer1.0.conv1.weight.shape[0]``, ``image_size`` =
      ``32 * sqrt(P - 1)`` with ``P`` rows in ``visual.attnpool.positional_embedding``;
    * text: ``context_length``, ``vocab_size``, ``width`` from the embeddings,
      ``layers`` from the residual blocks; ``mlp_ratio`` of both towers from
      ``mlp.c_fc.weight``.

    Attention heads leave no trace in the shapes (they split the same
    ``in_proj_weight``), yet a wrong count loads without error and computes
    something else, so the caller gives them.  Settings without weights are
    open_clip's ``CLIP`` defaults, which OpenAI's ``build_model`` assumes too:
    LayerNorm eps 1e-5, causal text mask, ``argmax`` text pooling, class-token
    image pooling, learnable position embeddings.  ``image_size`` is
    ``patch_size`` times the grid (open_clip floors a size that is not a multiple).

    Examples
    --------
    >>> import open_clip
    >>> cfg = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2),
    ...            text_cfg=dict(context_length=16, vocab_size=100, width=64, heads=1, layers=2))
    >>> model = open_clip.model.CLIP(**cfg)
    >>> infer_model_cfg(model.state_dict(), heads="openai")["vision_cfg"]["image_size"]
    32
    """
    keys = list(state_dict)
    if "text_projection" not in state_dict or "token_embedding.weight" not in state_dict:
        hint = _layout_hint(keys)
        raise CheckpointMismatch(
            "cannot infer the architecture: the weights lack 'text_projection' / "
            f"'token_embedding.weight' of an open_clip CLIP{'; ' + hint if hint else ''}"
        )
    if "visual.conv1.weight" in state_dict and "visual.proj" in state_dict:
        vision_cfg = _infer_vit(state_dict)
    elif "visual.attnpool.positional_embedding" in state_dict:
        vision_cfg = _infer_resnet(state_dict)
    else:
        raise CheckpointMismatch(
            "cannot infer the image tower: neither a ViT ('visual.conv1.weight', 'visual.proj') "
            "nor a ModifiedResNet ('visual.attnpool.*'); pass the model config explicitly"
        )
    text_projection = state_dict["text_projection"]
    if text_projection.ndim != 2:
        raise CheckpointMismatch(f"text_projection has shape {tuple(text_projection.shape)}, expected 2-D")
    cfg = {
        "embed_dim": int(text_projection.shape[1]),
        "vision_cfg": vision_cfg,
        "text_cfg": _infer_text(state_dict),
    }
    return cfg if heads is None else apply_heads(cfg, heads)


OPENAI_HEAD_WIDTH = 64  # OpenAI's build_model: heads = width // 64


def apply_heads(model_cfg: Mapping, heads) -> dict:
    """Copy of ``model_cfg`` with the attention head counts of both towers set.

    Parameters
    ----------
    model_cfg : mapping
        open_clip model config with a ViT or ModifiedResNet image tower and the
        built-in text tower.
    heads : int, {"vision": int, "text": int} or "openai"
        Heads of both towers, of each, or ``"openai"``: 64-wide heads, the
        convention of OpenAI's own checkpoints (text ``heads = width // 64``,
        vision ``head_width = 64``).

    Returns
    -------
    dict
        ``vision_cfg.head_width`` and ``text_cfg.heads`` set.  A ModifiedResNet
        attention pool has ``width * 32 // head_width`` heads, as in open_clip.

    Raises
    ------
    UsageError
        ``heads`` is malformed or does not divide a tower's width.
    AmbiguousCheckpoint
        ``"openai"`` with a width that is not a multiple of 64.
    """
    from ..errors import UsageError

    vision, text = dict(model_cfg.get("vision_cfg") or {}), dict(model_cfg.get("text_cfg") or {})
    if vision.get("timm_model_name") or text.get("hf_model_name"):
        raise UsageError("heads= applies to open_clip's own towers, not timm / Hugging Face ones")
    resnet = isinstance(vision.get("layers"), (list, tuple))
    widths = {"vision": int(vision.get("width", 768)) * (32 if resnet else 1),
              "text": int(text.get("width", 512))}  # a ModifiedResNet pools at width * 32
    if heads == "openai":
        bad = {t: w for t, w in widths.items() if w % OPENAI_HEAD_WIDTH}
        if bad:
            raise AmbiguousCheckpoint(
                f"widths {bad} are not multiples of OpenAI's 64-wide heads, so the head count is "
                "unknown: pass heads= (--heads) or arch= (--arch)")
        counts = {t: w // OPENAI_HEAD_WIDTH for t, w in widths.items()}
    elif isinstance(heads, Mapping) and set(heads) == {"vision", "text"}:
        counts = dict(heads)
    elif isinstance(heads, int) and not isinstance(heads, bool):
        counts = {"vision": heads, "text": heads}
    else:
        raise UsageError(f"heads must be an int, {{'vision': int, 'text': int}} or 'openai'; got {heads!r}")
    for tower, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or widths[tower] % n:
            raise UsageError(f"{tower} heads={n!r} must be a positive divisor of the {tower} "
                             f"attention width {widths[tower]}")
    vision["head_width"] = widths["vision"] // counts["vision"]
    text["heads"] = counts["text"]
    return {**model_cfg, "vision_cfg": vision, "text_cfg": text}


def _mlp_ratio(state_dict: Mapping, block_prefix: str, width: int) -> float:
    c_fc = state_dict.get(block_prefix + "0.mlp.c_fc.weight")
    return float(c_fc.shape[0] / width) if c_fc is not None else 4.0


def _infer_vit(sd: Mapping) -> dict:
    conv1 = sd["visual.conv1.weight"]  # (D, 3, p, p)
    width, patch_size = int(conv1.shape[0]), int(conv1.shape[-1])
    n_pos = int(sd["visual.positional_embedding"].shape[0])  # grid**2 + 1 (class token)
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid + 1 != n_pos:
        raise CheckpointMismatch(
            f"visual.positional_embedding has {n_pos} rows, not a square grid plus a class token; "
            "pass the model config explicitly"
        )
    cfg = {
        "image_size": patch_size * grid,
        "layers": _count_blocks(sd, "visual.transformer.resblocks."),
        "width": width,
        "patch_size": patch_size,
        "mlp_ratio": _mlp_ratio(sd, "visual.transformer.resblocks.", width),
    }
    if "visual.ln_pre.weight" not in sd:
        cfg["no_ln_pre"] = True
    if "visual.transformer.resblocks.0.ls_1.gamma" in sd:
        cfg["ls_init_value"] = 1e-5  # any value: the trained gammas are loaded over it
    return cfg


def _infer_resnet(sd: Mapping) -> dict:
    layers = [_count_blocks(sd, f"visual.layer{b}.") for b in (1, 2, 3, 4)]
    n_pos = int(sd["visual.attnpool.positional_embedding"].shape[0])  # (image_size/32)**2 + 1
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid + 1 != n_pos:
        raise CheckpointMismatch(
            f"visual.attnpool.positional_embedding has {n_pos} rows, not a square grid plus one"
        )
    return {
        "image_size": grid * 32,
        "layers": layers,
        "width": int(sd["visual.layer1.0.conv1.weight"].shape[0]),
    }


def _infer_text(sd: Mapping) -> dict:
    width = int(sd["ln_final.weight"].shape[0])
    cfg = {
        "context_length": int(sd["positional_embedding"].shape[0]),
        "vocab_size": int(sd["token_embedding.weight"].shape[0]),
        "width": width,
        "layers": _count_blocks(sd, "transformer.resblocks."),
        "mlp_ratio": _mlp_ratio(sd, "transformer.resblocks.", width),
    }
    if "transformer.resblocks.0.ls_1.gamma" in sd:
        cfg["ls_init_value"] = 1e-5
    return cfg


# --------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load ``state_dict`` strictly into ``model``, or explain why it does not fit.

    Parameters
    ----------
    model : torch.nn.Module
        Usually an ``open_clip.model.CLIP``; it receives the weights.
    state_dict : mapping of str to torch.Tensor
        The checkpoint's weights.

    Raises
    ------
    CheckpointMismatch
        Keys are missing or unexpected, or shapes differ.  The message lists the
        first few of each and the likely fix (see :func:`mismatch_hints`).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = {
        k: (tuple(state_dict[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    }
    if missing or unexpected or shapes:
        raise CheckpointMismatch(_mismatch_message(missing, unexpected, shapes))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        raise CheckpointMismatch(f"checkpoint does not load into the model: {_first_line(exc)}") from exc


def _mismatch_message(missing: list, unexpected: list, shapes: dict) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({', '.join(missing[:_SHOW])}{', ...' * (len(missing) > _SHOW)})")
    if unexpected:
        parts.append(
            f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:_SHOW])}{', ...' * (len(unexpected) > _SHOW)})"
        )
    if shapes:
        shown = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, (a, b) in list(shapes.items())[:_SHOW]]
        parts.append(f"{len(shapes)} shape mismatches ({'; '.join(shown)}{'; ...' * (len(shapes) > _SHOW)})")
    hints = mismatch_hints(missing, unexpected, shapes)
    return "checkpoint does not fit the model: " + "; ".join(parts) + ". Likely fix: " + " ".join(hints)


def _layout_hint(keys: list) -> str:
    """A hint when the keys belong to another layout altogether (or '')."""
    if any(k.startswith(("text_model.", "vision_model.")) for k in keys):
        return (
            "keys start with 'text_model.'/'vision_model.': this is a Hugging Face transformers "
            "checkpoint; point cliplab at its folder (with config.json) so it is converted"
        )
    if keys and all(k.startswith("module.") for k in keys):
        return "every key starts with 'module.': strip that prefix (read_state_dict does)"
    if any(k.startswith("text.") for k in keys):
        return (
            "keys start with 'text.': the text tower is a separate module (open_clip "
            "CustomTextCLIP, custom_text=True in the model config), not the plain CLIP layout"
        )
    return ""


def mismatch_hints(missing: list, unexpected: list, shapes: Mapping[str, tuple]) -> list[str]:
    """Turn a failed strict load into likely fixes, most specific first.

    Parameters
    ----------
    missing : list of str
        Keys the model has and the checkpoint lacks.
    unexpected : list of str
        Keys the checkpoint has and the model lacks.
    shapes : mapping of str to (tuple, tuple)
        ``key -> (checkpoint shape, model shape)`` for keys present in both.

    Returns
    -------
    list of str
        One sentence per recognised cause; a generic one when none is recognised.
    """
    hints = []
    layout = _layout_hint(list(unexpected))
    if layout:
        hints.append(layout + ".")
    if "positional_embedding" in shapes:
        (ckpt_n, _), (model_n, _) = shapes["positional_embedding"]
        hints.append(
            f"positional_embedding has {ckpt_n} positions but the config says {model_n}: "
            f"pass the checkpoint's own config (config= / --config) or omit the architecture "
            f"to infer it from the weights."
        )
    if "visual.positional_embedding" in shapes:
        ckpt_n, model_n = shapes["visual.positional_embedding"][0][0], shapes["visual.positional_embedding"][1][0]
        hints.append(
            f"visual.positional_embedding has {ckpt_n} rows (a {round((ckpt_n - 1) ** 0.5)}-patch grid) "
            f"but the config makes {model_n}: the image_size / patch_size in the config are wrong."
        )
    for key in ("text_projection", "visual.proj"):
        if key in shapes and shapes[key][0][-1:] != shapes[key][1][-1:]:
            hints.append(
                f"embed dims {shapes[key][0][-1]} vs {shapes[key][1][-1]}: wrong architecture name; "
                "omit it to infer the config from the weights."
            )
            break
    if any(k.startswith("visual.attnpool.") for k in unexpected) and any(k.startswith("visual.conv1") for k in missing):
        hints.append("the checkpoint has a ModifiedResNet image tower but the config builds a ViT.")
    elif any(k.startswith("visual.attnpool.") for k in missing) and any(k == "visual.proj" for k in unexpected):
        hints.append("the checkpoint has a ViT image tower but the config builds a ModifiedResNet.")
    for tower, prefix in (("text", "transformer.resblocks."), ("vision", "visual.transformer.resblocks.")):
        extra = _count_blocks(dict.fromkeys(unexpected), prefix)
        lacking = _count_blocks(dict.fromkeys(missing), prefix)
        if extra and not lacking:
            hints.append(f"the checkpoint has {extra} more {tower} layers than the config.")
        elif lacking and not extra:
            hints.append(f"the checkpoint has {lacking} fewer {tower} layers than the config.")
    if not hints:
        hints.append(
            "the config does not describe these weights: wrong architecture name; omit it to "
            "infer the config from the weights."
        )
    return hints
