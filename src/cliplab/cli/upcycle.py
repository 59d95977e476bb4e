"""``cliplab upcycle``: CLIP-MoE, a dense model's MLPs upcycled into top-k mixtures of experts
from a diversified multiplet, then trained (see :mod:`cliplab.surgery.moe`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError
from ._common import add_model_args, entries_help, load_backbone

HELP = "CLIP-MoE: upcycle a model's MLPs into mixtures of experts and train them"


def add_parser(sub) -> None:
    from ..train.recipes import RECIPES

    p = sub.add_parser(
        "upcycle", help=HELP,
        description="Cluster training items by the model's features into E groups, fine-tune a copy of the "
                    "MLPs on each (the diversified multiplet; --init copies skips it), turn the MLPs into "
                    "E experts with a top-k router, and train router and experts with InfoNCE plus the "
                    "load-balancing loss (CLIP-MoE, arXiv:2409.19291). Writes OUT/model (load it with "
                    "--model OUT/model), OUT/moe/metrics.jsonl and the members' runs in OUT/multiplet/.")
    data = p.add_argument_group("training data (one of)")
    data.add_argument("--recipe", choices=RECIPES.names(), metavar="NAME",
                      help=f"the training set of a recipe: {entries_help(RECIPES)}")
    data.add_argument("--data", metavar="PATH", help="CSV/JSONL caption table or WebDataset shards")
    moe = p.add_argument_group("mixture of experts")
    moe.add_argument("--experts", type=int, default=4, help="E, experts per MLP (default: 4)")
    moe.add_argument("--top-k", type=int, default=2, help="experts per token (default: 2)")
    moe.add_argument("--towers", default="visual,text", help="comma-separated: visual, text (default: both)")
    moe.add_argument("--layers", help="blocks to upcycle: N (the last N) or comma-separated indices "
                                      "(default: all)")
    moe.add_argument("--init", choices=["multiplet", "copies"], default="multiplet",
                     help="experts from the diversified multiplet (default) or E copies of the dense MLP")
    moe.add_argument("--n-samples", type=int, default=4096, help="training items clustered (default: 4096)")
    moe.add_argument("--expert-steps", type=int, default=50, help="fine-tuning steps per multiplet member "
                                                                  "(default: 50)")
    moe.add_argument("--aux-weight", type=float, default=0.01, help="load-balancing loss weight (default: 0.01)")
    moe.add_argument("--trainable", choices=["router", "moe", "all"], default="moe",
                     help="what the MoE phase trains: routers, routers + experts (default), everything")
    run_g = p.add_argument_group("run")
    run_g.add_argument("--out", required=True, help="output folder")
    run_g.add_argument("--steps", type=int, default=100, help="steps of the MoE phase (default: 100)")
    run_g.add_argument("--batch-size", type=int, default=32)
    run_g.add_argument("--lr", type=float, default=3e-4)
    run_g.add_argument("--weight-decay", type=float, default=0.1)
    run_g.add_argument("--warmup-steps", type=int, default=10)
    run_g.add_argument("--seed", type=int, default=0)
    add_model_args(p)
    p.set_defaults(run=run)


def _layers(text: str | None):
    if text is None:
        return None
    try:
        vals = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--layers takes N or comma-separated block indices, got {text!r}") from None
    if not vals:
        raise UsageError("--layers is empty")
    return vals[0] if "," not in text else vals


def run(args) -> int:
    from dataclasses import replace

    from ..surgery.moe import diversified_multiplet, train_moe, upcycle
    from ..train import TrainConfig
    from ..train.recipes import get_recipe, recipe_from_table

    if bool(args.recipe) == bool(args.data):
        raise UsageError("give --recipe NAME or --data PATH (exactly one of them)")
    towers = [t.strip() for t in args.towers.split(",") if t.strip()]
    layers = _layers(args.layers)
    bb = load_backbone(args)
    recipe = get_recipe(args.recipe) if args.recipe else recipe_from_table(args.data, bb.model_cfg)
    out = Path(args.out)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         warmup_steps=args.warmup_steps, seed=args.seed, ckpt_every=0, log_every=10,
                         out_dir=str(out / "moe"))
    config.validate()
    experts = args.experts
    if not 1 <= args.top_k <= args.experts:
        raise UsageError(f"--top-k {args.top_k}: give 1..{args.experts} (at most --experts)")
    if args.init == "multiplet":
        mp = diversified_multiplet(bb, recipe.train_set,
                                   replace(config, steps=args.expert_steps, out_dir=str(out / "multiplet"),
                                           warmup_steps=min(args.warmup_steps, args.expert_steps // 5)),
                                   experts=args.experts, n_samples=args.n_samples, towers=towers,
                                   layers=layers, seed=args.seed)
        experts = mp.experts
        print(f"multiplet: {args.experts} clusters of {[int((mp.labels == e).sum()) for e in range(args.experts)]} "
              "items, one fine-tuned MLP copy each")
    moe = upcycle(bb, experts, top_k=args.top_k, towers=towers, layers=layers, seed=args.seed)
    trained = train_moe(moe, recipe.train_set, config, aux_weight=args.aux_weight, trainable=args.trainable,
                        evaluate=recipe.evaluate)
    trained.save(out / "model")
    last = json.loads((out / "moe" / "metrics.jsonl").read_text().splitlines()[-1])
    for key, value in last.items():
        print(f"{key:>18}  {value:.4f}" if isinstance(value, float) else f"{key:>18}  {value}")
    print(f"load it with --model {out / 'model'}")
    return 0
