"""``cliplab shapes``: ShapesWorld data sets (``cliplab shapes export DIR ...``)."""

from __future__ import annotations

HELP = "ShapesWorld synthetic data"


def add_parser(sub) -> None:
    from ..data.shapes import DEFAULT_WORLD, EXPORT_FORMATS, EXPORT_TASKS, list_worlds
    from ..data.shapes.domains import CORRUPTIONS, DOMAINS

    p = sub.add_parser("shapes", help=HELP,
                       description="ShapesWorld: procedural coloured-shape scenes with captions, masks and boxes.")
    p.set_defaults(run=run)  # without a sub-command, run() names the choices
    commands = p.add_subparsers(dest="shapes_command", metavar="SUBCOMMAND")
    e = commands.add_parser("export", help="write scenes as class folders, CSV, JSONL, WebDataset or COCO",
                            description="Render N scenes of a split and write them in a standard format. "
                                        "The default world is shapes-tiny, the world of the bundled model: "
                                        "the same scenes, splits and classes as the shapes:<task> datasets "
                                        "of cliplab eval. Classification tasks (color-shape, shape, color) "
                                        "use one object per image, captions and detection 1-3.")
    e.add_argument("out_dir", metavar="DIR", help="output folder (created if missing)")
    e.add_argument("--n", type=int, required=True, help="number of scenes (indices 0..N-1 of the split)")
    e.add_argument("--world", choices=list_worlds(), default=DEFAULT_WORLD,
                   help=f"named world (default: {DEFAULT_WORLD}, the world of the bundled model, with "
                        "heart and crescent kept for the ood split; plain: ShapesWorld's own defaults, "
                        "all 10 shapes in every split); the options below override it")
    e.add_argument("--task", choices=EXPORT_TASKS, default="color-shape")
    e.add_argument("--format", dest="fmt", choices=EXPORT_FORMATS, default="folder")
    e.add_argument("--split", choices=["train", "val", "test", "ood"], default="test")
    e.add_argument("--seed", type=int, default=None, help="world seed (default: the world's, 0)")
    e.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the world's, 64)")
    e.add_argument("--n-objects", default=None,
                   help="objects per scene: N or LO-HI (default: 1 for the classification tasks, else 1-3)")
    e.add_argument("--ood-shapes", default=None,
                   help="comma-separated shapes reserved for the 'ood' split (default: the world's; "
                        "'' for none)")
    e.add_argument("--spurious", type=float, default=None, help="probability the background follows the shape")
    e.add_argument("--defect-rate", type=float, default=None, help="probability a scene gets a defect")
    plain = [d for d in DOMAINS.names() if DOMAINS.meta(d)["family"] != "corruption"]
    e.add_argument("--domain", default=None, metavar="DOMAIN",
                   help="draw the same scenes with a controlled shift: " + ", ".join(plain)
                        + ", or a corruption KIND-SEVERITY (KIND one of " + ", ".join(CORRUPTIONS)
                        + "; SEVERITY 1-5, e.g. blur-3); default: original")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e.set_defaults(run=run)


def _n_objects(text):
    from ..errors import UsageError

    try:
        lo, _, hi = text.partition("-")
        return (int(lo), int(hi or lo))
    except ValueError:
        raise UsageError(f"--n-objects must be N or LO-HI, got {text!r}") from None


def run(args) -> int:
    from ..data.shapes import export, get_world, task_world

    if getattr(args, "shapes_command", None) != "export":
        from ..errors import UsageError

        raise UsageError("choose a sub-command: cliplab shapes export DIR --n N")
    options = {"split_sizes": {args.split: max(args.n, 1)}}  # scenes depend on the index only, not on the split size
    if args.image_size is not None:
        options["image_size"] = args.image_size
    if args.ood_shapes is not None:
        options["ood_shapes"] = tuple(s.strip() for s in args.ood_shapes.split(",") if s.strip())
    if args.spurious is not None:
        options["spurious"] = args.spurious
    if args.defect_rate is not None:
        options["defect_rate"] = args.defect_rate
    if args.n_objects is not None:
        options["n_objects"] = _n_objects(args.n_objects)
    if args.domain is not None:
        options["domain"] = args.domain
    seed = 0 if args.seed is None else args.seed
    world = get_world(args.world, seed, **options)
    if args.n_objects is None:
        world = task_world(world, args.task)
    result = export(world, args.out_dir, n=args.n, split=args.split, task=args.task, fmt=args.fmt,
                    progress=False if args.no_progress else None)
    print(result.summary())
    return 0
