"""Convert CLIP checkpoints between Hugging Face ``transformers`` and open_clip.

A ``transformers.CLIPModel`` and an ``open_clip.model.CLIP`` with a ViT image
tower compute the same function with differently named (and partly reshaped)
tensors.  The mapping, per tower (``{v}`` = ``vision_model.``, ``{t}`` =
``text_model.``, ``L`` = ``encoder.layers.i.``, ``R`` = ``transformer.resblocks.i.``):

=========================================  =========================================
transformers                               open_clip
=========================================  =========================================
{v}embeddings.class_embedding              visual.class_embedding
{v}embeddings.patch_embedding.weight       visual.conv1.weight
{v}embeddings.position_embedding.weight    visual.positional_embedding
{v}pre_layrnorm / post_layernorm           visual.ln_pre / visual.ln_post
{t}embeddings.token_embedding.weight       token_embedding.weight
{t}embeddings.position_embedding.weight    positional_embedding
{t}final_layer_norm                        ln_final
L self_attn.{q,k,v}_proj.{weight,bias}     R attn.in_proj_{weight,bias} (q, k, v stacked on dim 0)
L self_attn.out_proj                       R attn.out_proj
L layer_norm1 / layer_norm2                R ln_1 / ln_2
L mlp.fc1 / mlp.fc2                        R mlp.c_fc / mlp.c_proj
visual_projection.weight (E, D)            visual.proj (D, E), transposed
text_projection.weight (E, D)              text_projection (D, E), transposed
logit_scale                                logit_scale
=========================================  =========================================

(the vision blocks live under ``visual.`` in open_clip).  The activation is not
in the weights: ``hidden_act="quick_gelu"`` is open_clip's ``quick_gelu=True``,
``"gelu"`` (exact erf GELU) is ``quick_gelu=False``.

**Text pooling.**  open_clip's ``CLIP`` reads the text feature at the *largest
token id* of each sequence (``argmax``); transformers reads it at the *first
``eos_token_id``* (or, for legacy configs with ``eos_token_id == 2``, at the
argmax too).  The two agree whenever ``eos_token_id`` is the largest id of the
vocabulary (``vocab_size - 1``), as with CLIP's BPE where end-of-text is 49407.
For any other ``eos_token_id`` the converted config uses open_clip's
``pool_type="eos"`` with that id, which is the transformers rule exactly.

Functions here take and return plain dicts (configs) and ``{name: tensor}``
dicts (weights); only the folder readers and writers touch the disk.  Nothing
here imports ``transformers``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointMismatch, ModelLoadError
from .state_dicts import CLIPLAB_KEY, _jsonable, read_state_dict, save_state_dict, split_cliplab_config

__all__ = [
    "hf_to_open_clip",
    "open_clip_to_hf",
    "key_map",
    "text_pool_for_eos",
    "clip_bpe_tokenizer_files",
    "hf_config_to_model_cfg",
    "model_cfg_to_hf_config",
    "read_hf_folder",
    "read_json_object",
    "read_hf_preprocess_cfg",
    "save_hf_folder",
    "is_hf_folder",
    "save_open_clip_folder",
]

logger = logging.getLogger("cliplab.models.convert")

from open_clip.constants import OPENAI_DATASET_MEAN as OPENAI_MEAN, OPENAI_DATASET_STD as OPENAI_STD

# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults: config.json
# files may leave out any field that equals its default.
_HF_TEXT_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}
_HF_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
_HF_CLIP_DEFAULTS = {"projection_dim": 512}
_ACT_TO_QUICK_GELU = {"quick_gelu": True, "gelu": False}
_OPEN_CLIP_LN_EPS = 1e-5  # open_clip's LayerNorm default

# CLIP's BPE vocabulary: special tokens as open_clip and transformers spell them.
_SOT_OPEN_CLIP, _EOT_OPEN_CLIP = "<start_of_text>", "<end_of_text>"
_SOT_HF, _EOT_HF = "<|startoftext|>", "<|endoftext|>"
_CLIP_VOCAB_SIZE = 49408
# open_clip pads with id 0, the token "!"; a transformers pad token becomes a special
# token matched inside text, so "!" cannot be it.  OpenAI's transformers folders pad
# with end-of-text, and so do we: pads differ, the ids up to end-of-text agree.
_PAD_HF = _EOT_HF

_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")


# --------------------------------------------------------------------------------------
# Key mapping (pure)
# --------------------------------------------------------------------------------------

# Kinds of tensor transforms between the layouts:
#   "copy": same tensor;  "t": transposed (open_clip (D, E) <-> transformers (E, D));
#   "qkv": open_clip stacks transformers' q, k, v on dim 0.
_BLOCK_PAIRS = (
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
    ("attn.out_proj", "self_attn.out_proj"),
)


def _block_map(oc_prefix: str, hf_prefix: str) -> list[tuple[str, tuple[str, ...], str]]:
    rows = []
    for oc, hf in _BLOCK_PAIRS:
        for p in ("weight", "bias"):
            rows.append((f"{oc_prefix}{oc}.{p}", (f"{hf_prefix}{hf}.{p}",), "copy"))
    for p in ("weight", "bias"):
        qkv = tuple(f"{hf_prefix}self_attn.{n}_proj.{p}" for n in ("q", "k", "v"))
        rows.append((f"{oc_prefix}attn.in_proj_{p}", qkv, "qkv"))
    return rows


def key_map(vision_layers: int, text_layers: int) -> list[tuple[str, tuple[str, ...], str]]:
    """All ``(open_clip key, transformers keys, kind)`` rows of a ViT CLIP.

    Parameters
    ----------
    vision_layers, text_layers : int
        Number of transformer blocks in each tower.

    Returns
    -------
    list of (str, tuple of str, str)
        ``kind`` is ``"copy"``, ``"t"`` (transpose) or ``"qkv"`` (open_clip
        tensor = the three transformers tensors concatenated on dim 0).
    """
    v, t = "vision_model.", "text_model."
    rows = [
        ("visual.class_embedding", (v + "embeddings.class_embedding",), "copy"),
        ("visual.conv1.weight", (v + "embeddings.patch_embedding.weight",), "copy"),
        ("visual.positional_embedding", (v + "embeddings.position_embedding.weight",), "copy"),
        ("visual.proj", ("visual_projection.weight",), "t"),
        ("token_embedding.weight", (t + "embeddings.token_embedding.weight",), "copy"),
        ("positional_embedding", (t + "embeddings.position_embedding.weight",), "copy"),
        ("text_projection", ("text_projection.weight",), "t"),
        ("logit_scale", ("logit_scale",), "copy"),
    ]
    for p in ("weight", "bias"):
        rows += [
            (f"visual.ln_pre.{p}", (f"{v}pre_layrnorm.{p}",), "copy"),
            (f"visual.ln_post.{p}", (f"{v}post_layernorm.{p}",), "copy"),
            (f"ln_final.{p}", (f"{t}final_layer_norm.{p}",), "copy"),
        ]
    for i in range(vision_layers):
        rows += _block_map(f"visual.transformer.resblocks.{i}.", f"{v}encoder.layers.{i}.")
    for i in range(text_layers):
        rows += _block_map(f"transformer.resblocks.{i}.", f"{t}encoder.layers.{i}.")
    return rows


def _check_keys(have: Mapping, needed: set, what: str, hint: str) -> None:
    missing = sorted(needed - set(have))
    extra = sorted(set(have) - needed)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:5])}{', ...' * (len(missing) > 5)})")
        if extra:
            parts.append(f"{len(extra)} unexpected ({', '.join(extra[:5])}{', ...' * (len(extra) > 5)})")
        raise CheckpointMismatch(f"{what} keys do not match its config: {'; '.join(parts)}. {hint}")


# --------------------------------------------------------------------------------------
# Configs (pure)
# --------------------------------------------------------------------------------------


def _sub_config(hf_config: Mapping, name: str, defaults: Mapping) -> dict:
    sub = hf_config.get(name)
    if sub is None:  # configs written before transformers 4.x used "<name>_dict"
        sub = hf_config.get(name + "_dict")
    return {**defaults, **(sub or {})}


def _quick_gelu(act: str, tower: str) -> bool:
    if act not in _ACT_TO_QUICK_GELU:
        raise CheckpointMismatch(
            f"{tower} hidden_act={act!r} has no open_clip equivalent; only 'quick_gelu' and 'gelu' convert"
        )
    return _ACT_TO_QUICK_GELU[act]


def _square(size, what: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise CheckpointMismatch(f"{what} {tuple(size)} is not square; CLIP conversion needs square sizes")
        size = size[0]
    return int(size)


def _mlp_ratio(hidden: int, intermediate: int, tower: str) -> float:
    ratio = intermediate / hidden
    if int(hidden * ratio) != intermediate:
        raise CheckpointMismatch(f"{tower} intermediate_size {intermediate} is not representable as an mlp_ratio")
    return ratio


def text_pool_for_eos(eos_token_id, vocab_size: int) -> dict:
    """open_clip text pooling settings that reproduce transformers' CLIP pooling.

    Parameters
    ----------
    eos_token_id : int or list of int
        ``text_config.eos_token_id`` of a transformers CLIP config.
    vocab_size : int
        ``text_config.vocab_size``.

    Returns
    -------
    dict
        ``{}`` (open_clip's default ``argmax`` pooling) when transformers pools
        at the argmax as well: ``eos_token_id`` is the largest id
        (``vocab_size - 1``) or the legacy value 2.  Otherwise
        ``{"pool_type": "eos", "eos_id": eos_token_id}``.
    """
    if isinstance(eos_token_id, (list, tuple)):
        if len(eos_token_id) != 1:
            raise CheckpointMismatch(f"eos_token_id={eos_token_id}: open_clip pools at a single end-of-text id")
        eos_token_id = eos_token_id[0]
    eos_token_id = int(eos_token_id)
    if eos_token_id in (2, vocab_size - 1):
        return {}
    logger.warning(
        "eos_token_id %d is not the largest token id (%d): the text tower pools at the first "
        "occurrence of id %d (pool_type='eos'); tokenizers must end every text with it",
        eos_token_id, vocab_size - 1, eos_token_id,
    )
    return {"pool_type": "eos", "eos_id": eos_token_id}


def hf_config_to_model_cfg(hf_config: Mapping) -> dict:
    """open_clip ``model_cfg`` of a transformers ``CLIPConfig`` dict (its config.json).

    Parameters
    ----------
    hf_config : mapping
        ``CLIPConfig.to_dict()`` or the parsed config.json of a ``CLIPModel``.

    Returns
    -------
    dict
        ``{"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}``.

    Raises
    ------
    CheckpointMismatch
        Not a CLIP config, or a setting open_clip's CLIP cannot express.
    """
    model_type = hf_config.get("model_type", "clip")
    if model_type != "clip":
        raise CheckpointMismatch(
            f"config.json has model_type={model_type!r}; only transformers CLIPModel folders "
            "(model_type 'clip') are converted"
        )
    t = _sub_config(hf_config, "text_config", _HF_TEXT_DEFAULTS)
    v = _sub_config(hf_config, "vision_config", _HF_VISION_DEFAULTS)
    quick_gelu = _quick_gelu(v["hidden_act"], "vision")
    if _quick_gelu(t["hidden_act"], "text") != quick_gelu:
        raise CheckpointMismatch(
            f"vision hidden_act={v['hidden_act']!r} but text hidden_act={t['hidden_act']!r}: "
            "open_clip uses one activation for both towers"
        )
    if int(v["num_channels"]) != 3:
        raise CheckpointMismatch(f"vision num_channels={v['num_channels']}; open_clip CLIP takes RGB (3)")
    v_width, t_width = int(v["hidden_size"]), int(t["hidden_size"])
    vision_cfg = {
        "image_size": _square(v["image_size"], "vision image_size"),
        "patch_size": _square(v["patch_size"], "vision patch_size"),
        "width": v_width,
        "layers": int(v["num_hidden_layers"]),
        "head_width": v_width // int(v["num_attention_heads"]),
        "mlp_ratio": _mlp_ratio(v_width, int(v["intermediate_size"]), "vision"),
    }
    text_cfg = {
        "context_length": int(t["max_position_embeddings"]),
        "vocab_size": int(t["vocab_size"]),
        "width": t_width,
        "heads": int(t["num_attention_heads"]),
        "layers": int(t["num_hidden_layers"]),
        "mlp_ratio": _mlp_ratio(t_width, int(t["intermediate_size"]), "text"),
        **text_pool_for_eos(t["eos_token_id"], int(t["vocab_size"])),
    }
    for cfg, sub in ((vision_cfg, v), (text_cfg, t)):
        if float(sub["layer_norm_eps"]) != _OPEN_CLIP_LN_EPS:
            cfg["norm_kwargs"] = {"eps": float(sub["layer_norm_eps"])}
    projection_dim = hf_config.get("projection_dim", _HF_CLIP_DEFAULTS["projection_dim"])
    return {"embed_dim": int(projection_dim), "quick_gelu": quick_gelu, "vision_cfg": vision_cfg, "text_cfg": text_cfg}


def hf_config_to_model_cfg_checked(hf_config: Mapping, where) -> dict:
    """:func:`hf_config_to_model_cfg`, with malformed values reported against ``where``."""
    try:
        return hf_config_to_model_cfg(hf_config)
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as exc:
        raise ModelLoadError(f"{where}: not a valid transformers CLIP config ({type(exc).__name__}: {exc})") from exc


def _as_dict(cfg) -> dict:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg or {})


# open_clip options with no transformers CLIP equivalent, and their neutral values.
_VISION_NEUTRAL = {
    "ls_init_value": None, "patch_dropout": 0.0, "attentional_pool": False, "no_ln_pre": False,
    "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
    "act_kwargs": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
    "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
    "timm_model_name": None,
}
_TEXT_NEUTRAL = {
    "ls_init_value": None, "embed_cls": False, "no_causal_mask": False, "final_ln_after_pool": False,
    "proj_bias": False, "proj_type": "linear", "act_kwargs": None, "block_type": None, "qk_norm": False,
    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
    "scale_fc": False, "hf_model_name": None,
}


def _unsupported(cfg: Mapping, neutral: Mapping, tower: str) -> list[str]:
    bad = []
    for key, value in neutral.items():
        got = cfg.get(key, value)
        if got != value and not (key == "block_type" and got == "default"):
            bad.append(f"{tower}_cfg.{key}={got!r}")
    extra_norm = set(cfg.get("norm_kwargs") or {}) - {"eps"}
    if extra_norm:
        bad.append(f"{tower}_cfg.norm_kwargs has {sorted(extra_norm)}")
    return bad


def model_cfg_to_hf_config(model_cfg: Mapping) -> dict:
    """transformers ``CLIPConfig`` dict (config.json) of an open_clip ``model_cfg``.

    Parameters
    ----------
    model_cfg : mapping
        open_clip model config of a ``CLIP`` with a ViT image tower.

    Returns
    -------
    dict
        Loadable with ``transformers.CLIPConfig(**cfg)``; has
        ``"architectures": ["CLIPModel"]`` and ``"model_type": "clip"``.

    Raises
    ------
    CheckpointMismatch
        The model uses an option transformers' CLIP lacks (ModifiedResNet or timm
        towers, layer scale, attentional pooling, custom blocks...).
    """
    vision_cfg, text_cfg = _as_dict(model_cfg.get("vision_cfg")), _as_dict(model_cfg.get("text_cfg"))
    bad = _unsupported(vision_cfg, _VISION_NEUTRAL, "vision") + _unsupported(text_cfg, _TEXT_NEUTRAL, "text")
    if isinstance(vision_cfg.get("layers", 12), (list, tuple)):
        bad.append("a ModifiedResNet image tower")
    for key in ("custom_text", "multimodal_cfg"):
        if model_cfg.get(key):
            bad.append(f"{key}={model_cfg[key]!r}")
    if model_cfg.get("init_logit_bias") is not None:
        bad.append("a logit_bias (SigLIP-style)")
    pool = text_cfg.get("pool_type", "argmax")
    if pool not in ("argmax", "eos"):
        bad.append(f"text_cfg.pool_type={pool!r}")
    if bad:
        raise CheckpointMismatch("cannot express this model as a transformers CLIPModel: " + ", ".join(bad))

    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    embed_dim = int(model_cfg["embed_dim"])
    v_width, t_width = int(vision_cfg.get("width", 768)), int(text_cfg.get("width", 512))
    vocab_size = int(text_cfg.get("vocab_size", _CLIP_VOCAB_SIZE))
    if pool == "eos":
        eos = int(text_cfg.get("eos_id", 2))
        if eos == 2:
            raise CheckpointMismatch(
                "text_cfg.eos_id=2 with pool_type='eos': transformers treats eos_token_id 2 as its "
                "legacy argmax pooling, so this model has no transformers CLIP equivalent"
            )
    else:
        # transformers pools at the first eos id; with argmax pooling that is the largest id.
        eos = vocab_size - 1
    text_config = {
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": t_width,
        "intermediate_size": int(t_width * float(text_cfg.get("mlp_ratio", 4.0))),
        "num_hidden_layers": int(text_cfg.get("layers", 12)),
        "num_attention_heads": int(text_cfg.get("heads", 8)),
        "max_position_embeddings": int(text_cfg.get("context_length", 77)),
        "hidden_act": act,
        "layer_norm_eps": float((text_cfg.get("norm_kwargs") or {}).get("eps", _OPEN_CLIP_LN_EPS)),
        "projection_dim": embed_dim,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": eos,
        "pad_token_id": vocab_size - 1,  # the tokenizer written by save_hf_folder pads with it
    }
    vision_config = {
        "model_type": "clip_vision_model",
        "hidden_size": v_width,
        "intermediate_size": int(v_width * float(vision_cfg.get("mlp_ratio", 4.0))),
        "num_hidden_layers": int(vision_cfg.get("layers", 12)),
        "num_attention_heads": v_width // int(vision_cfg.get("head_width", 64)),
        "num_channels": 3,
        "image_size": _square(vision_cfg.get("image_size", 224), "vision image_size"),
        "patch_size": _square(vision_cfg.get("patch_size", 16), "vision patch_size"),
        "hidden_act": act,
        "layer_norm_eps": float((vision_cfg.get("norm_kwargs") or {}).get("eps", _OPEN_CLIP_LN_EPS)),
        "projection_dim": embed_dim,
    }
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": embed_dim,
        "logit_scale_init_value": 2.6592,
        "text_config": text_config,
        "vision_config": vision_config,
    }


# --------------------------------------------------------------------------------------
# Weights (pure)
# --------------------------------------------------------------------------------------


def _drop_buffers(hf_state_dict: Mapping) -> dict:
    # position_ids are buffers that older transformers versions saved with the weights.
    return {k: v for k, v in hf_state_dict.items() if not k.endswith("embeddings.position_ids")}


def hf_to_open_clip(hf_config: Mapping, hf_state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """Convert a transformers ``CLIPModel`` (config dict + weights) to open_clip.

    Parameters
    ----------
    hf_config : mapping
        The model's config.json (``CLIPConfig.to_dict()``).
    hf_state_dict : mapping of str to torch.Tensor
        ``CLIPModel.state_dict()`` (keys ``vision_model.*``, ``text_model.*``,
        ``visual_projection.weight``, ``text_projection.weight``, ``logit_scale``).

    Returns
    -------
    model_cfg : dict
        For ``open_clip.model.CLIP(**model_cfg)``; includes ``quick_gelu``.
    state_dict : dict of str to torch.Tensor
        Loads strictly into that model.

    Raises
    ------
    CheckpointMismatch
        Unsupported config, or weights that do not match the config.

    Examples
    --------
    >>> cfg, sd = hf_to_open_clip(hf_config, hf_state_dict)  # doctest: +SKIP
    >>> model = open_clip.model.CLIP(**cfg); model.load_state_dict(sd)  # doctest: +SKIP
    """
    model_cfg = hf_config_to_model_cfg(hf_config)
    hf_sd = _drop_buffers(hf_state_dict)
    rows = key_map(model_cfg["vision_cfg"]["layers"], model_cfg["text_cfg"]["layers"])
    _check_keys(
        hf_sd, {k for _, hf_keys, _ in rows for k in hf_keys}, "the transformers checkpoint's",
        "Only CLIPModel checkpoints (both towers and projections) convert; check that config.json "
        "belongs to these weights.",
    )
    out = {}
    for oc_key, hf_keys, kind in rows:
        tensors = [hf_sd[k] for k in hf_keys]
        if kind == "qkv":
            out[oc_key] = torch.cat(tensors, dim=0)  # (3D, D) / (3D,)
        elif kind == "t":
            out[oc_key] = tensors[0].t().contiguous()  # (E, D) -> (D, E)
        else:
            out[oc_key] = tensors[0]
    return model_cfg, out


def open_clip_to_hf(model_cfg: Mapping, state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """Convert an open_clip ``CLIP`` (config + weights) to a transformers ``CLIPModel``.

    Parameters
    ----------
    model_cfg : mapping
        open_clip model config (ViT image tower, standard text tower).
    state_dict : mapping of str to torch.Tensor
        ``CLIP.state_dict()``.

    Returns
    -------
    hf_config : dict
        For ``transformers.CLIPConfig(**hf_config)`` or config.json.
    hf_state_dict : dict of str to torch.Tensor
        Loads strictly into ``transformers.CLIPModel(CLIPConfig(**hf_config))``.
        Every tensor owns its memory (safe for ``safetensors.torch.save_file``).

    Raises
    ------
    CheckpointMismatch
        The model uses options transformers' CLIP lacks, or the weights do not
        match the config (a model with outlier-free attention or MoE MLPs,
        ``model_cfg["cliplab"]``, included: transformers' CLIP has no clipped softmax,
        attention gates or experts).
    """
    attention = (model_cfg.get(CLIPLAB_KEY) or {}).get("attention")
    if attention:
        raise CheckpointMismatch(
            f"the model uses outlier-free attention ({attention.get('softmax', 'vanilla')} softmax, "
            f"gate {attention.get('gate')}), which transformers' CLIP cannot express; keep it as an open_clip "
            "folder (convert --to open_clip), which records it")
    if (model_cfg.get(CLIPLAB_KEY) or {}).get("moe"):
        raise CheckpointMismatch("the model has mixture-of-experts MLPs (CLIP-MoE upcycling), which transformers' "
                                 "CLIP cannot express; keep it as an open_clip folder, which records them")
    hf_config = model_cfg_to_hf_config(model_cfg)
    rows = key_map(hf_config["vision_config"]["num_hidden_layers"], hf_config["text_config"]["num_hidden_layers"])
    sd = {k: v for k, v in state_dict.items() if k != "attn_mask"}
    _check_keys(sd, {oc for oc, _, _ in rows}, "the open_clip state dict's",
                "Check that the model config belongs to these weights.")
    out = {}
    for oc_key, hf_keys, kind in rows:
        tensor = sd[oc_key]
        if kind == "qkv":
            for name, part in zip(hf_keys, tensor.chunk(3, dim=0)):
                out[name] = part.clone()
        elif kind == "t":
            out[hf_keys[0]] = tensor.t().contiguous()
        else:
            out[hf_keys[0]] = tensor.clone()
    return hf_config, out


# --------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------


def is_hf_folder(path) -> bool:
    """True if ``path`` looks like a transformers model folder.

    That is: a directory with a ``config.json`` naming a ``model_type`` and a
    transformers weights file (``model.safetensors``, ``pytorch_model.bin`` or
    their sharded ``*.index.json``).  Whether the model is a CLIP is checked
    by :func:`read_hf_folder`, which says so clearly when it is not.
    """
    path = Path(path)
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return bool(model_type) and any((path / name).is_file() for name in _HF_WEIGHT_FILES)


def read_json_object(path) -> dict:
    """Parse a JSON config file that must hold an object, or say precisely why not.

    Raises
    ------
    ModelLoadError
        Missing, empty, not UTF-8, cut or invalid JSON, or not an object; the
        message names the file and the fault in one line.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path}: no such file") from exc
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    if not raw.strip():
        raise ModelLoadError(f"{path}: empty file, expected a JSON object")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{path}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); "
                             "JSON configs must be UTF-8") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise ModelLoadError(f"{path}: cut or invalid JSON ({reason}{where})") from exc
    if not isinstance(data, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(data), "null")
        raise ModelLoadError(f"{path}: expected a JSON object, found a JSON {kind}")
    return data



def _read_hf_weights(path: Path) -> dict:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).is_file():
            return read_state_dict(path / single)
        if (path / index).is_file():
            weight_map = read_json_object(path / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelLoadError(f"{path / index}: has no 'weight_map' object naming the shards")
            out = {}
            for shard in sorted(set(weight_map.values())):
                out.update(read_state_dict(path / shard))
            return out
    raise ModelLoadError(f"{path}: has config.json but no weights file (model.safetensors, "
                         "pytorch_model.bin or a sharded *.index.json)")


def read_hf_folder(path) -> tuple[dict, dict]:
    """Read a transformers ``CLIPModel`` folder as open_clip config + weights.

    Parameters
    ----------
    path : str or os.PathLike
        Folder with ``config.json`` and ``model.safetensors`` (preferred) or
        ``pytorch_model.bin`` (read with ``weights_only=True``), possibly sharded.

    Returns
    -------
    model_cfg, state_dict : dict, dict
        As :func:`hf_to_open_clip`.

    Raises
    ------
    ModelLoadError
        Missing or unreadable files.
    CheckpointMismatch
        Not a CLIPModel, or weights that do not fit its config.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a folder")
    hf_config = read_json_object(path / "config.json")
    hf_config_to_model_cfg_checked(hf_config, path / "config.json")  # before reading the weights
    model_cfg, state_dict = hf_to_open_clip(hf_config, _read_hf_weights(path))
    logger.info("converted transformers CLIP folder %s to open_clip layout", path)
    return model_cfg, state_dict


def read_hf_preprocess_cfg(path) -> dict | None:
    """open_clip ``preprocess_cfg`` from a folder's ``preprocessor_config.json``, if any.

    Returns ``{"size", "mean", "std", "interpolation", "resize_mode"}`` or None
    when the folder has no preprocessor config.
    """
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        return None
    pp = read_json_object(file)
    try:
        crop = pp.get("crop_size") or pp.get("size") or 224
        size = crop.get("height", crop.get("shortest_edge", 224)) if isinstance(crop, dict) else int(crop)
        resample = {2: "bilinear", 3: "bicubic"}.get(pp.get("resample", 3), "bicubic")
        return {
            "size": int(size),
            "mean": tuple(float(m) for m in pp.get("image_mean", OPENAI_MEAN)),
            "std": tuple(float(m) for m in pp.get("image_std", OPENAI_STD)),
            "interpolation": resample,
            "resize_mode": "shortest",
        }
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{file}: not a valid CLIP image processor config ({exc})") from exc


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def clip_bpe_tokenizer_files() -> tuple[dict, list]:
    """CLIP's BPE as transformers files: ``vocab`` (token -> id) and ``merges`` lines.

    Built from open_clip's bundled vocabulary, with the special tokens spelt the
    transformers way (``<|startoftext|>`` 49406, ``<|endoftext|>`` 49407).
    """
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    rename = {_SOT_OPEN_CLIP: _SOT_HF, _EOT_OPEN_CLIP: _EOT_HF}
    vocab = {rename.get(token, token): idx for token, idx in tok.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])]
    return vocab, merges


def _write_tokenizer(out_dir: Path, context_length: int) -> None:
    vocab, merges = clip_bpe_tokenizer_files()
    _write_json(out_dir / "vocab.json", vocab)
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": _SOT_HF, "eos_token": _EOT_HF, "unk_token": _EOT_HF, "pad_token": _PAD_HF}
    _write_json(out_dir / "special_tokens_map.json", special)
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": context_length,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        **special,
    })


def _write_image_processor(out_dir: Path, image_size: int, preprocess_cfg: Mapping | None) -> None:
    pp = dict(preprocess_cfg or {})
    size = _square(pp.get("size", image_size), "preprocess size")
    _write_json(out_dir / "preprocessor_config.json", {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": {"bilinear": 2, "bicubic": 3}.get(pp.get("interpolation", "bicubic"), 3),
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pp.get("mean", OPENAI_MEAN)),
        "image_std": list(pp.get("std", OPENAI_STD)),
        "do_convert_rgb": True,
    })


def save_hf_folder(out_dir, model_cfg: Mapping, state_dict: Mapping[str, torch.Tensor],
                   preprocess_cfg: Mapping | None = None) -> Path:
    """Write an open_clip CLIP as a transformers ``CLIPModel`` folder.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Created if needed; existing files of the same names are replaced.
    model_cfg : mapping
        open_clip model config.
    state_dict : mapping of str to torch.Tensor
        The model's weights.
    preprocess_cfg : mapping, optional
        open_clip preprocess config (``size``, ``mean``, ``std``,
        ``interpolation``) for ``preprocessor_config.json``; OpenAI's mean/std,
        bicubic resize and the model's image size by default.

    Returns
    -------
    pathlib.Path
        ``out_dir``, holding ``config.json``, ``model.safetensors``,
        ``preprocessor_config.json`` and, when the vocabulary is CLIP's
        (49408 ids), ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``
        and ``special_tokens_map.json``.

    Notes
    -----
    ``transformers.CLIPTokenizer.from_pretrained(out_dir)`` then gives the ids of
    ``open_clip.tokenize`` for ordinary text (``padding="max_length"``,
    ``max_length=context_length``, ``truncation=True``) up to and including
    end-of-text; it pads with end-of-text (49407, as OpenAI's transformers
    folders do) where open_clip pads with 0.  Both CLIPs pool at the first
    end-of-text, so the features agree.  Other differences: open_clip runs ``ftfy.fix_text`` and unescapes
    HTML entities before tokenising (``"&amp;"`` becomes ``"&"``, curly quotes
    become straight, mojibake is repaired); transformers only applies NFC,
    collapses whitespace and lower-cases.
    """

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config, hf_state_dict = open_clip_to_hf(model_cfg, state_dict)
    _write_json(out_dir / "config.json", hf_config)
    save_state_dict(out_dir / "model.safetensors", hf_state_dict)  # config.json describes it
    text = hf_config["text_config"]
    _write_image_processor(out_dir, hf_config["vision_config"]["image_size"], preprocess_cfg)
    if text["vocab_size"] == _CLIP_VOCAB_SIZE:
        _write_tokenizer(out_dir, text["max_position_embeddings"])
    else:
        logger.warning("vocab_size %d is not CLIP's BPE (%d): no tokenizer files written to %s",
                       text["vocab_size"], _CLIP_VOCAB_SIZE, out_dir)
    logger.info("wrote transformers CLIP folder %s", out_dir)
    return out_dir


def save_open_clip_folder(out_dir, model_cfg: Mapping, state_dict: Mapping[str, torch.Tensor],
                          preprocess_cfg: Mapping | None = None) -> Path:
    """Write an open_clip model folder: ``open_clip_config.json`` + ``open_clip_model.safetensors``.

    This is the layout of open_clip's Hugging Face Hub repositories, so
    ``open_clip.create_model("local-dir:" + out_dir)`` (or ``hf-hub:`` once
    uploaded) loads it.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Created if needed.
    model_cfg : mapping
        open_clip model config; its ``"cliplab"`` entry (the attention type of a model
        with outlier-free attention) is written as a top-level key beside ``model_cfg``.
    state_dict : mapping of str to torch.Tensor
        The model's weights.
    preprocess_cfg : mapping, optional
        open_clip preprocess config (``mean``, ``std``, ``interpolation``,
        ``resize_mode``...); written as given, empty by default.

    Returns
    -------
    pathlib.Path
        ``out_dir``.
    """

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, extra = split_cliplab_config(model_cfg)
    config = {"model_cfg": cfg, "preprocess_cfg": _jsonable(preprocess_cfg or {})}
    if extra is not None:   # open_clip ignores top-level keys other than model_cfg/preprocess_cfg
        config[CLIPLAB_KEY] = extra
    _write_json(out_dir / "open_clip_config.json", config)
    # the weights carry the config too, so the file alone loads back exactly
    save_state_dict(out_dir / "open_clip_model.safetensors", state_dict, model_cfg=model_cfg,
                    preprocess_cfg=preprocess_cfg)
    logger.info("wrote open_clip folder %s", out_dir)
    return out_dir
