"""``cliplab bundle``: write a training checkpoint as a compact fp16 open_clip folder (see
:func:`cliplab.models.bundle.export_bundle`); this is how the bundled model is made."""

from __future__ import annotations

HELP = "write a training checkpoint as a compact fp16 open_clip folder (as the bundled model is)"


def add_parser(sub) -> None:
    p = sub.add_parser("bundle", help=HELP,
                       description="Read CHECKPOINT (an open_clip folder, such as a Trainer's "
                                   "checkpoints/step_N) and write OUT_DIR: open_clip_config.json and "
                                   "the weights in fp16 safetensors, loadable by cliplab and open_clip "
                                   "(local-dir:OUT_DIR) into an fp32 model.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="open_clip folder, e.g. runs/shapes-tiny/checkpoints/step_0004000")
    p.add_argument("out_dir", metavar="OUT_DIR",
                   help="folder to write, e.g. src/cliplab/models/bundled/shapes-tiny")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..models.bundle import export_bundle

    out = export_bundle(args.checkpoint, args.out_dir)
    size = (out / "open_clip_model.safetensors").stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB of fp16 weights)")
    return 0
