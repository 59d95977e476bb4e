"""``cliplab anomaly``: zero-/few-shot anomaly detection on an MVTec-style folder."""

from __future__ import annotations

from ._common import add_model_args, load_backbone, write_rows

HELP = "detect anomalies on an MVTec-style folder and report image/pixel AUROC, AP, AUPRO"


def add_parser(sub) -> None:
    from ..dense.anomaly import ANOMALY_METHODS
    from ._common import entries_help

    p = sub.add_parser("anomaly", help=HELP, description=(
        "Evaluate a zero- or few-shot anomaly detection method on an MVTec-style folder "
        "(<category>/train/good, <category>/test/<defect>, <category>/ground_truth/<defect>/<name>_mask.png): "
        "image AUROC, AP and F1-max; pixel AUROC, AUPRO (FPR <= 0.3, MVTec protocol) and F1-max per "
        "category and their mean."))
    p.add_argument("root", metavar="FOLDER", help="dataset folder (or one category folder)")
    p.add_argument("--method", default="winclip", choices=ANOMALY_METHODS.names(),
                   help=f"anomaly method: {entries_help(ANOMALY_METHODS)} (default: winclip)")
    p.add_argument("--shots", type=int, default=0, help="normal reference images per category (few-shot methods)")
    p.add_argument("--prompts", metavar="PATH", help="learned prompts of --method anomalyclip (.safetensors; "
                   "cliplab.dense.anomaly.anomalyclip.train_anomalyclip writes them)")
    p.add_argument("--train-on", metavar="FOLDER",
                   help="first learn AnomalyCLIP prompts on this other MVTec-style folder's test images and "
                        "masks (auxiliary categories, as the paper trains on VisA to test on MVTec AD) and "
                        "write them to --prompts DIR")
    p.add_argument("--train-steps", type=int, default=300, help="AnomalyCLIP training steps with --train-on "
                   "(default 300)")
    p.add_argument("--category", action="append", help="evaluate only this category (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="draws the reference images (default: 0)")
    p.add_argument("--maps", metavar="DIR", help="also write each test image's anomaly map as a PNG here")
    p.add_argument("--out", metavar="JSON", help="also write the metrics to this JSON file")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--batch-size", type=int, default=32)
    add_model_args(p)
    p.set_defaults(run=run)


def _write_maps(out_dir, category, result) -> None:
    from pathlib import Path

    import numpy as np
    from PIL import Image

    folder = Path(out_dir) / category.name
    lo, hi = float(result.maps.min()), float(result.maps.max())
    for path, defect, m in zip(category.test, category.defects, result.maps):
        (folder / defect).mkdir(parents=True, exist_ok=True)
        grey = np.uint8(np.clip((m - lo) / max(hi - lo, 1e-12), 0, 1) * 255)
        Image.fromarray(grey).save(folder / defect / f"{path.stem}.png")


def run(args) -> int:
    import json
    from pathlib import Path

    from ..errors import UsageError
    from ..eval.anomaly import evaluate_anomaly
    from ..validation import check_positive_int

    check_positive_int("--batch-size", args.batch_size)
    check_positive_int("--shots", args.shots, minimum=0)
    if not Path(args.root).is_dir():
        raise UsageError(f"{args.root}: no such folder; FOLDER is an MVTec-style dataset folder")
    if args.train_on and (args.method != "anomalyclip" or not args.prompts):
        raise UsageError("--train-on needs --method anomalyclip and --prompts DIR (where the prompts are written)")
    if args.train_on and not Path(args.train_on).is_dir():
        raise UsageError(f"{args.train_on}: no such folder; --train-on is an MVTec-style dataset folder")
    check_positive_int("--train-steps", args.train_steps)
    if (args.method == "anomalyclip") != bool(args.prompts):
        raise UsageError("--method anomalyclip needs --prompts PATH" if args.prompts is None
                         else "--prompts is an option of --method anomalyclip")
    backbone = load_backbone(args)
    if args.train_on:
        from ..data.datasets import anomaly_from_mvtec
        from ..dense.anomaly.anomalyclip import train_anomalyclip

        args.prompts = str(train_anomalyclip(backbone, anomaly_from_mvtec(args.train_on, "test"),
                                             steps=args.train_steps, out=args.prompts, seed=args.seed))
    results = evaluate_anomaly(backbone, args.root, method=args.method, shots=args.shots, categories=args.category,
                               seed=args.seed, batch_size=args.batch_size,
                               method_options={"prompts": args.prompts} if args.prompts else None,
                               on_result=(lambda cat, res: _write_maps(args.maps, cat, res)) if args.maps else None)
    keys = list(results["mean"])
    write_rows([{"category": name, **{k: m[k] for k in keys}} for name, m in results.items()], args.format)
    if args.out:
        Path(args.out).write_text(json.dumps({"method": args.method, "shots": args.shots, "model": args.model,
                                              **({"prompts": args.prompts} if args.prompts else {}),
                                              "seed": args.seed, "results": results}, indent=2) + "\n")
    return 0
