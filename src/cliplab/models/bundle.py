"""Turn a training checkpoint into a bundled model: fp16 safetensors + open_clip config."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .convert import save_open_clip_folder
from .state_dicts import read_state_dict


def export_bundle(checkpoint_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``out_dir`` = ``open_clip_config.json`` + weights cast to ``dtype``.

    ``checkpoint_dir`` is an open_clip folder such as the Trainer's
    ``checkpoints/step_N``.  Floating-point tensors are cast; ``cliplab.load``
    (and plain open_clip ``local-dir:``) load them back into an fp32 model.
    """
    src = Path(checkpoint_dir)
    config = json.loads((src / "open_clip_config.json").read_text())
    sd = read_state_dict(src / "open_clip_model.safetensors")
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return save_open_clip_folder(out_dir, config["model_cfg"], sd, config.get("preprocess_cfg"))
