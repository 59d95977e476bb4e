"""``cliplab adapt``: fit a few-shot adapter on image features and save it (see
:mod:`cliplab.adapt.fewshot`).  The methods and their help come from
:data:`cliplab.adapt.METHODS`, read only when the choice is checked or the help printed."""

from __future__ import annotations

import argparse
import sys

from ..adapt import METHODS
from ._common import add_model_args, load_backbone

HELP = ("fit a few-shot adapter (linear probe, GDA, Tip-Adapter, CapS...) or train a prompt learner / "
        "fine-tuner (CoOp, LoRA, CLIP-SVD...) on a dataset")


class _MethodHelp(argparse.HelpFormatter):
    """Writes the ``--method`` help from the registry when the help is printed."""

    def _get_help_string(self, action):
        if action.dest != "method":
            return action.help
        from ..adapt import method_table

        rows = method_table()
        return "few-shot method: " + "; ".join(
            f"{r['name']} ({r['kind']} on {r['input']}): {r['help']}" for r in rows).replace("%", "%%")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "adapt", help=HELP,
        description="Draw K labelled images per class from the train split of DS and fit METHOD: "
                    "training-free adapters choose their hyper-parameters on the validation split "
                    "and fit on image features; learners train by gradient descent (on frozen image "
                    "features or on images, see --method) and report their validation accuracy.  "
                    "The result is saved for 'cliplab classify --adapter'.",
        formatter_class=_MethodHelp)
    p.add_argument("--method", required=True, choices=METHODS, metavar="METHOD", help="few-shot method")
    p.add_argument("--shots", type=int, required=True, help="labelled images per class (K)")
    p.add_argument("--dataset", required=True,
                   help="classification dataset: an image folder (with train/ and val/ sub-folders, "
                        "or one folder per class), a CSV, or shapes:color-shape, shapes:shape, shapes:color")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.add_argument("--random-state", type=int, default=0, help="seed of the few-shot draw (default: 0)")
    p.add_argument("--cache", help="feature cache folder (default: no cache)")
    p.add_argument("--templates", default="default",
                   help="prompt templates of the zero-shot text weights (default: 'a photo of a {c}.')")
    p.add_argument("--n-train", type=int, help="train images to draw the K shots from (default: all)")
    p.add_argument("--n-val", type=int, help="validation images (default: all)")
    g = p.add_argument_group("learners (methods of kind 'learner')")
    g.add_argument("--epochs", type=int, help="training epochs (default: the method's)")
    g.add_argument("--lr", type=float, help="learning rate (default: the method's)")
    g.add_argument("--batch-size", type=int, help="mini-batch size (default: the method's)")
    add_model_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..adapt.fewshot import fit_adapter, save_fitted

    backbone = load_backbone(args)
    est, meta = fit_adapter(backbone, method=args.method, dataset=args.dataset, shots=args.shots,
                            random_state=args.random_state, store=args.cache, templates=args.templates,
                            n_train=args.n_train, n_val=args.n_val, model_spec=args.model, epochs=args.epochs,
                            lr=args.lr, batch_size=args.batch_size)
    out = save_fitted(est, meta, args.out)
    print(f"{args.method} {args.shots}-shot on {args.dataset}: {len(meta['classnames'])} classes, "
          f"{meta['n_train']} train / {meta['n_val']} val images, val accuracy {meta['val_accuracy']:.4f} "
          f"-> {out}")
    if "trainable_parameters" in meta:
        print(f"trained {meta['trainable_parameters']:,} parameters in {meta['fit_seconds']:.1f} s")
    if meta.get("classes_without_examples"):
        how = ("are scored through their prompts only" if "trainable_parameters" in meta
               else "cannot be predicted")
        print(f"note: {len(meta['classes_without_examples'])} class(es) have no training image and {how}",
              file=sys.stderr)
    return 0
