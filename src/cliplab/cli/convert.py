"""``cliplab convert``: rewrite a checkpoint as an open_clip folder or a transformers folder."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UsageError
from ._common import add_model_args, load_backbone

HELP = "convert a checkpoint between open_clip and Hugging Face formats"


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help=HELP,
                       description="Load SRC with any spec cliplab understands and write DST as an "
                                   "open_clip folder (open_clip_config.json + safetensors) or a "
                                   "transformers CLIPModel folder.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--to", choices=["open_clip", "hf"], required=True)
    p.add_argument("--force", action="store_true", help="write into a non-empty DST")
    add_model_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..models.convert import open_clip_to_hf, save_hf_folder

    dst = Path(args.dst)
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"{dst} is a file; DST must be a folder")
    if dst.exists() and any(dst.iterdir()) and not args.force:
        raise UsageError(f"{dst} exists and is not empty; pass --force to write into it")
    args.model = args.src
    bb = load_backbone(args)
    if args.to == "open_clip":
        bb.save(dst)
    else:
        sd = {k: v.float() for k, v in bb.model.state_dict().items()}
        open_clip_to_hf(bb.model_cfg, sd)  # validates before anything is written
        save_hf_folder(dst, bb.model_cfg, sd, bb.preprocess_cfg)
    print(f"wrote {args.to} checkpoint of {bb.name} to {dst}", file=sys.stderr)
    return 0
