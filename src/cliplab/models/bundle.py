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
    return Path(save_open_clip_folder(out_dir, config["model_cfg"], sd, config.get("preprocess_cfg")))


def main(argv: list[str] | None = None) -> None:
    """``python -m cliplab.models.bundle CHECKPOINT OUT_DIR``: write an fp16 bundle."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m cliplab.models.bundle", description=main.__doc__)
    ap.add_argument("checkpoint", help="open_clip folder, e.g. runs/shapes-tiny/checkpoints/step_0004000")
    ap.add_argument("out_dir", help="e.g. src/cliplab/models/bundled/shapes-tiny")
    args = ap.parse_args(argv)
    out = export_bundle(args.checkpoint, args.out_dir)
    size = (out / "open_clip_model.safetensors").stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB of fp16 weights)")


if __name__ == "__main__":
    main()
