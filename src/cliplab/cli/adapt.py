"""``cliplab adapt``: fit a few-shot adapter on image features and save it (see
:mod:`cliplab.adapt.fewshot`)."""

from __future__ import annotations

import sys

from ..adapt.fewshot import METHODS
from ._common import add_model_args, load_backbone


def add_parser(sub) -> None:
    p = sub.add_parser(
        "adapt", help="fit a few-shot adapter (linear probe, GDA, Tip-Adapter, CapS) on a dataset",
        description="Draw K labelled images per class from the train split of DS, choose the "
                    "method's hyper-parameters on the validation split, fit on image features "
                    "and save the adapter for 'cliplab classify --adapter'.")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--shots", type=int, required=True, help="labelled images per class (K)")
    p.add_argument("--dataset", required=True,
                   help="classification dataset: an image folder (with train/ and val/ sub-folders, "
                        "or one folder per class), a CSV, or shapes:color-shape, shapes:shape, shapes:color")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.add_argument("--seed", type=int, default=0, help="few-shot draw seed (default: 0)")
    p.add_argument("--cache", help="feature cache folder (default: no cache)")
    p.add_argument("--templates", default="default",
                   help="prompt templates of the zero-shot text weights (default: 'a photo of a {c}.')")
    p.add_argument("--n-train", type=int, help="train images to draw the K shots from (default: all)")
    p.add_argument("--n-val", type=int, help="validation images (default: all)")
    add_model_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..adapt.fewshot import fit_adapter, save_fitted

    store = None
    backbone = load_backbone(args)
    if args.cache:
        from ..features import FeatureStore

        store = FeatureStore(args.cache, backbone)
    est, meta = fit_adapter(backbone, method=args.method, dataset=args.dataset, shots=args.shots,
                            seed=args.seed, store=store, templates=args.templates, n_train=args.n_train,
                            n_val=args.n_val, model_spec=args.model)
    out = save_fitted(est, meta, args.out)
    print(f"{args.method} {args.shots}-shot on {args.dataset}: {len(meta['classnames'])} classes, "
          f"{meta['n_train']} train / {meta['n_val']} val images, val accuracy {meta['val_accuracy']:.4f} "
          f"-> {out}")
    if meta.get("classes_without_examples"):
        print(f"note: {len(meta['classes_without_examples'])} class(es) have no training image and "
              "cannot be predicted", file=sys.stderr)
    return 0
