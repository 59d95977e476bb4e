"""``cliplab longclip``: stretch a model's text positions and fine-tune it on long captions (Long-CLIP)."""

from __future__ import annotations

from ..errors import UsageError
from ._common import add_model_args, load_backbone

HELP = "Long-CLIP: stretch the text context (keep 20 positions, interpolate the rest) and fine-tune on long captions"


def add_parser(sub) -> None:
    p = sub.add_parser("longclip", help=HELP, description=(
        "Long-CLIP (arXiv:2403.15378): keep the first --keep text positions, interpolate the rest to "
        "--context positions, then fine-tune through the Trainer with the Long-CLIP objective: long captions "
        "against the image features, short captions against the images' top --pca-dim principal components. "
        "Trains on ShapesWorld long captions (scenes of 1-3 objects); writes OUT/model, loadable with "
        "--model OUT/model, and the run's metrics in OUT."))
    p.add_argument("--out", required=True, metavar="DIR", help="run folder; the model goes to DIR/model")
    p.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    p.add_argument("--context", type=int, metavar="N",
                   help="new context length (default: keep + 4 x (current - keep): 77 -> 248, 32 -> 68)")
    p.add_argument("--keep", type=int, default=20, help="leading positions kept as they are (default 20)")
    p.add_argument("--pca-dim", type=int, default=32,
                   help="principal components matched with the short captions (default 32; 0: full features)")
    p.add_argument("--short-weight", type=float, default=1.0,
                   help="weight of the short-caption term (default 1; 0: long captions only)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default 1e-5)")
    p.add_argument("--seed", type=int, default=0)
    add_model_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..surgery.longclip import finetune_longclip
    from ..validation import check_positive_int

    check_positive_int("--steps", args.steps)
    check_positive_int("--batch-size", args.batch_size)
    if args.pca_dim < 0:
        raise UsageError(f"--pca-dim must be >= 0, got {args.pca_dim}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    backbone = load_backbone(args)
    tuned = finetune_longclip(backbone, args.steps, args.out, new_context=args.context, keep=args.keep,
                              pca_dim=args.pca_dim or None, short_weight=args.short_weight,
                              batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    print(f"context {backbone.context_length} -> {tuned.context_length} tokens; "
          f"load it with --model {args.out}/model")
    return 0
