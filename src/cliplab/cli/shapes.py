"""``cliplab shapes``: ShapesWorld data sets (``cliplab shapes export DIR ...``)."""

from __future__ import annotations

HELP = "ShapesWorld synthetic data"


from ..data.shapes.worlds import DEFAULT_WORLD


def add_parser(sub) -> None:
    from ..data.shapes import EXPORT_FORMATS, EXPORT_TASKS, list_worlds
    from ..data.shapes.domains import CORRUPTIONS, DOMAINS

    p = sub.add_parser("shapes", help=HELP,
                       description="ShapesWorld: procedural coloured-shape scenes with captions, masks and boxes.")
    p.set_defaults(run=run)  # without a sub-command, run() names the choices
    commands = p.add_subparsers(dest="shapes_command", metavar="SUBCOMMAND")
    e = commands.add_parser("export", help="write scenes as class folders, CSV, JSONL, WebDataset, COCO, "
                                           "class-map PNGs or MVTec AD folders",
                            description="Render N scenes of a split and write them in a standard format. "
                                        "The default world is shapes-tiny, the world of the bundled model: "
                                        "the same scenes, splits and classes as the shapes:<task> datasets "
                                        "of cliplab eval. Classification tasks (color-shape, shape, color) "
                                        "use one object per image, captions and detection 1-3; seg and det "
                                        "render dense 256 px scenes of 3-12 overlapping objects; inspection "
                                        "writes MVTec AD folders (--format mvtec) of every category.")
    e.add_argument("out_dir", metavar="DIR", help="output folder (created if missing)")
    e.add_argument("--n", type=int, required=True,
                   help="number of scenes (indices 0..N-1 of the split); inspection: normal training images "
                        "per category")
    e.add_argument("--world", choices=list_worlds(), default=DEFAULT_WORLD,
                   help=f"named world (default: {DEFAULT_WORLD}, the world of the bundled model, with "
                        "heart and crescent kept for the ood split; plain: ShapesWorld's own defaults, "
                        "all 10 shapes in every split); the options below override it")
    e.add_argument("--task", default="color-shape", metavar="TASK",
                   help=f"{', '.join(EXPORT_TASKS)} (rendered with the options below), or any other "
                        "ShapesWorld task of `cliplab shapes list` (count, size, relation, pairs, spurious...: "
                        "written from its dataset as folder, csv or jsonl, with its per-image attributes)")
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
    e.add_argument("--n-test", type=int, default=None,
                   help="inspection: test images per category of each kind (good and each defect; default N/4)")
    e.add_argument("--categories", default=None,
                   help="inspection: comma-separated categories (default: all, one per shape)")
    plain = [d for d in DOMAINS.names() if DOMAINS.meta(d)["family"] != "corruption"]
    e.add_argument("--domain", default=None, metavar="DOMAIN",
                   help="draw the same scenes with a controlled shift: " + ", ".join(plain)
                        + ", or a corruption KIND-SEVERITY (KIND one of " + ", ".join(CORRUPTIONS)
                        + "; SEVERITY 1-5, e.g. blur-3); default: original")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e.set_defaults(run=run)
    ls = commands.add_parser("list", help="the named worlds, the shapes:TASK datasets and the domains",
                             description="List what ShapesWorld offers: worlds (--world), tasks (shapes:TASK "
                                         "datasets of cliplab eval, and --task of export) and domains.")
    ls.set_defaults(run=run)


def _list() -> int:
    from ..data.shapes import SHAPES_TASKS, WORLDS

    sections = [("worlds", WORLDS), ("tasks (shapes:TASK)", SHAPES_TASKS)]
    try:
        from ..data.shapes import DOMAINS

        sections.append(("domains (shapes:TASK@DOMAIN)", DOMAINS))
    except ImportError:
        pass
    for title, registry in sections:
        print(f"{title}:")
        names = registry.names()
        width = max(len(n) for n in names)
        for name in names:
            meta = registry.meta(name)
            kind = f" [{meta['data']}]" if "data" in meta else ""
            print(f"  {name:<{width}}  {meta.get('help', '')}{kind}")
    return 0


def _n_objects(text):
    from ..errors import UsageError

    try:
        lo, _, hi = text.partition("-")
        return (int(lo), int(hi or lo))
    except ValueError:
        raise UsageError(f"--n-objects must be N or LO-HI, got {text!r}") from None


def _export_task(args) -> int:
    """Export a registered ``shapes:<task>`` that :func:`export` does not render itself."""
    from ..data.shapes import EXPORT_TASKS, SHAPES_TASKS, shapes_task
    from ..data.shapes.export import export_dataset
    from ..errors import UsageError

    name = args.task.partition("@")[0]
    if name not in SHAPES_TASKS:
        raise UsageError(f"unknown task {args.task!r}; `cliplab shapes list` shows the ShapesWorld tasks")
    given = [o for o in ("image_size", "n_objects", "ood_shapes", "spurious", "defect_rate", "n_test", "categories")
             if getattr(args, o) is not None]
    if given or args.world != DEFAULT_WORLD:
        opt = "--world" if not given else "--" + given[0].replace("_", "-")
        raise UsageError(f"{opt} applies to {', '.join(EXPORT_TASKS)}; task {args.task} renders its own scenes")
    spec = args.task if args.domain is None else f"{name}@{args.domain}"
    data = shapes_task(spec, args.split, args.n, 0 if args.seed is None else args.seed)
    result = export_dataset(data, args.out_dir, fmt=args.fmt, progress=False if args.no_progress else None)
    print(result.summary())
    return 0


def run(args) -> int:
    from ..data.shapes import export, get_world, task_world
    from ..data.shapes.dense import dense_world
    from ..data.shapes.export import DENSE_TASKS, EXPORT_TASKS
    from ..data.shapes.inspection import InspectionWorld
    from ..errors import UsageError

    command = getattr(args, "shapes_command", None)
    if command == "list":
        return _list()
    if command != "export":
        raise UsageError("choose a sub-command: cliplab shapes export DIR --n N, or cliplab shapes list")
    if args.task not in EXPORT_TASKS:
        return _export_task(args)
    if args.task != "inspection" and (args.n_test is not None or args.categories is not None):
        raise UsageError("--n-test and --categories are options of --task inspection")
    progress = False if args.no_progress else None
    if args.task == "inspection":
        categories = None if args.categories is None else [c.strip() for c in args.categories.split(",") if c.strip()]
        world = InspectionWorld(0 if args.seed is None else args.seed,
                                256 if args.image_size is None else args.image_size, categories)
        result = export(world, args.out_dir, n=args.n, task="inspection", fmt=args.fmt, n_test=args.n_test,
                        progress=progress)
        print(result.summary())
        return 0
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
    if args.task in DENSE_TASKS:
        world = dense_world(world, image_size=args.image_size, n_objects=options.get("n_objects"))
    elif args.n_objects is None:
        world = task_world(world, args.task)
    result = export(world, args.out_dir, n=args.n, split=args.split, task=args.task, fmt=args.fmt,
                    progress=progress)
    print(result.summary())
    return 0
