"""``cliplab shapes``: ShapesWorld data sets (``cliplab shapes export DIR ...``)."""

from __future__ import annotations


def add_parser(sub) -> None:
    from ..data.shapes import EXPORT_FORMATS, EXPORT_TASKS

    p = sub.add_parser("shapes", help="ShapesWorld synthetic data",
                       description="ShapesWorld: procedural coloured-shape scenes with captions, masks and boxes.")
    p.set_defaults(run=run)  # without a sub-command, run() names the choices
    commands = p.add_subparsers(dest="shapes_command", metavar="SUBCOMMAND")
    e = commands.add_parser("export", help="write scenes as class folders, CSV, JSONL, WebDataset or COCO",
                            description="Render N scenes of a split and write them in a standard format. "
                                        "Classification tasks (color-shape, shape, color) use one object per image.")
    e.add_argument("out_dir", metavar="DIR", help="output folder (created if missing)")
    e.add_argument("--n", type=int, required=True, help="number of scenes (indices 0..N-1 of the split)")
    e.add_argument("--task", choices=EXPORT_TASKS, default="color-shape")
    e.add_argument("--format", dest="fmt", choices=EXPORT_FORMATS, default="folder")
    e.add_argument("--split", choices=["train", "val", "test", "ood"], default="test")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--image-size", type=int, default=64)
    e.add_argument("--n-objects", default=None,
                   help="objects per scene: N or LO-HI (default 1-3; classification tasks use 1)")
    e.add_argument("--ood-shapes", default="", help="comma-separated shapes reserved for the 'ood' split")
    e.add_argument("--spurious", type=float, default=0.0, help="probability the background follows the shape")
    e.add_argument("--defect-rate", type=float, default=0.0, help="probability a scene gets a defect")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e.set_defaults(run=run)


def _n_objects(text):
    from ..errors import UsageError

    if text is None:
        return (1, 3)
    try:
        lo, _, hi = text.partition("-")
        return (int(lo), int(hi or lo))
    except ValueError:
        raise UsageError(f"--n-objects must be N or LO-HI, got {text!r}") from None


def run(args) -> int:
    from ..data.shapes import ShapesWorld, export

    if getattr(args, "shapes_command", None) != "export":
        from ..errors import UsageError

        raise UsageError("choose a sub-command: cliplab shapes export DIR --n N")
    ood = tuple(s.strip() for s in args.ood_shapes.split(",") if s.strip())
    sizes = {args.split: max(args.n, 1)}  # scenes depend on the index only, not on the split size
    world = ShapesWorld(seed=args.seed, image_size=args.image_size, n_objects=_n_objects(args.n_objects),
                        ood_shapes=ood, spurious=args.spurious, defect_rate=args.defect_rate,
                        split_sizes=sizes)
    result = export(world, args.out_dir, n=args.n, split=args.split, task=args.task, fmt=args.fmt,
                    progress=False if args.no_progress else None)
    print(result.summary())
    return 0
