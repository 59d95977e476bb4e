"""``cliplab reinforce``: store teacher embeddings of K augmentations per image (MobileCLIP).

Writes a reinforced dataset (:mod:`cliplab.train.reinforce`): WebDataset shards whose
samples carry the augmentation parameters, the synthetic captions and the teachers'
image and text embeddings; ``cliplab train --data SHARDS --loss mobileclip-dr`` trains a
student on them without running a teacher.  Started again after an interruption, the
same command finishes the unfinished shards only.
"""

from __future__ import annotations

import sys

from ..errors import UsageError
from ._common import add_model_args, load_backbone

HELP = "store teacher embeddings of augmented images and captions as shards (MobileCLIP)"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "reinforce", help=HELP,
        description="Write a reinforced dataset: for every image of SRC, K seeded augmentations (crop box, "
                    "flip) with their parameters, and the teachers' embeddings of each augmented image, of its "
                    "real caption (the first) and of its synthetic captions (the others; on ShapesWorld the "
                    "scene's other rewrites stand in for a captioner). Train on it with "
                    "'cliplab train --data SHARDS --loss mobileclip-dr'.")
    p.add_argument("src", metavar="SRC", help="caption table (CSV/JSONL) or WebDataset shards, as for cliplab train")
    p.add_argument("--teacher", required=True, metavar="M1[,M2]",
                   help="teacher model spec(s), comma-separated for an ensemble")
    p.add_argument("--out", required=True, metavar="SHARDS", help="output folder")
    p.add_argument("--augmentations", type=int, default=5, metavar="K", help="augmentations per image (default: 5)")
    p.add_argument("--size", type=int, help="side of the augmented images, the student's input size "
                                            "(default: the first teacher's)")
    p.add_argument("--scale", type=float, nargs=2, default=(0.5, 1.0), metavar=("MIN", "MAX"),
                   help="crop area range as a fraction of the image (default: 0.5 1.0)")
    p.add_argument("--flip", type=float, default=0.0,
                   help="horizontal-flip probability (default: 0; ShapesWorld captions name left and right)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--batch-size", type=int, default=256, help="teacher batch size (default: 256)")
    add_model_args(p, spec=False)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..train.reinforce import reinforce

    specs = [s.strip() for s in args.teacher.split(",") if s.strip()]
    if not specs:
        raise UsageError("--teacher needs at least one model spec")
    teachers = [load_backbone(args, spec) for spec in specs]
    result = reinforce(args.src, teachers, args.out, augmentations=args.augmentations, size=args.size,
                       scale=tuple(args.scale), flip=args.flip, seed=args.seed, shard_size=args.shard_size,
                       batch_size=args.batch_size)
    print(f"wrote {result.summary()}", file=sys.stderr)
    print(f"train on it with: cliplab train --data {result.out} --loss mobileclip-dr --model-config CFG")
    return 0
