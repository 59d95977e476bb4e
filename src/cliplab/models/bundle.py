"""Turn a training checkpoint into a bundled model: fp16 safetensors + open_clip config.

The command line is ``cliplab bundle CHECKPOINT OUT_DIR`` (:mod:`cliplab.cli.bundle`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import DataError
from .convert import save_open_clip_folder
from .state_dicts import join_cliplab_config, read_state_dict


def export_bundle(checkpoint_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``out_dir`` = ``open_clip_config.json`` + weights cast to ``dtype``.

    ``checkpoint_dir`` is an open_clip folder such as the Trainer's
    ``checkpoints/step_N``.  Floating-point tensors are cast; ``cliplab.load``
    (and plain open_clip ``local-dir:``) load them back into an fp32 model.

    Raises
    ------
    DataError
        ``open_clip_config.json`` is not JSON with a ``model_cfg`` object.
    OSError
        A file of ``checkpoint_dir`` cannot be read or ``out_dir`` cannot be written.
    """
    src = Path(checkpoint_dir)
    config_path = src / "open_clip_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise DataError(f"{config_path}: not an open_clip config (no model_cfg object)")
    sd = read_state_dict(src / "open_clip_model.safetensors")
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model_cfg = join_cliplab_config(config, config_path)   # keeps the attention type (clipped, gated)
    return Path(save_open_clip_folder(out_dir, model_cfg, sd, config.get("preprocess_cfg")))

