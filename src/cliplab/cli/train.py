"""``cliplab train``: train a CLIP model with a recipe, a caption table or WebDataset shards.

Runs on one process, or data-parallel under ``torchrun --nproc_per_node K -m
cliplab.cli.main train ...`` (the global ``--batch-size`` is split over ranks).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..data.text import read_text
from ..errors import DataError, UsageError
from ._common import entries_help

HELP = "train a CLIP model (recipe, caption table or WebDataset shards)"


def add_parser(sub) -> None:
    from ..train.losses import LOSSES
    from ..train.recipes import RECIPES

    p = sub.add_parser(
        "train", help=HELP,
        description="Train with a named recipe (--recipe shapes-tiny) or on a CSV/JSONL caption table or "
                    "WebDataset shards (--data PATH --model-config CFG). Writes metrics.jsonl/csv and "
                    "checkpoints loadable as local-dir:OUT/checkpoints/step_N.")
    src = p.add_argument_group("what to train")
    src.add_argument("--recipe", choices=RECIPES.names(), metavar="NAME",
                     help=f"a registered recipe: {entries_help(RECIPES)}")
    src.add_argument("--data", metavar="PATH", help="CSV/JSONL caption table (image path + one or more captions), or "
                                    "WebDataset .tar shards (image + txt/json per key): a .tar file, a folder "
                                    "of shards, a glob or a brace pattern such as 'shard-{0000..0003}.tar', or a folder "
                                    "written by cliplab reinforce (with --loss mobileclip-dr)")
    src.add_argument("--model-config",
                     help="open_clip architecture: a JSON file (model_cfg or open_clip_config.json) "
                          "or a built-in open_clip name such as ViT-B-32 (with --data)")
    src.add_argument("--attention", choices=["vanilla", "clipped", "gated-linear", "gated-mlp"],
                     help="train from scratch with outlier-free attention (Quantizable Transformers): "
                          "clipped softmax (alpha 3.2) or per-head linear/MLP gates; recorded in the checkpoints")
    src.add_argument("--loss", choices=LOSSES.names(), metavar="NAME",
                     help=f"training objective (default: the recipe's, else infonce): {entries_help(LOSSES)}")
    cap = p.add_argument_group("captions (data-side methods; docs/objectives.md)")
    cap.add_argument("--captions", choices=["scene", "noisy", "filtered", "recaptioned"],
                     help="shapes-tiny recipe: the scenes' phrasings (default), one alt-text-like noisy caption "
                          "per scene, the noisy pairs kept by a CLIPScore filter, or the canonical caption "
                          "written from the ground truth")
    cap.add_argument("--rewrites", type=int, metavar="K",
                     help="add K LaCLIP rewrites of every caption (recipe or --data); one phrasing is drawn "
                          "per image per step")
    cap.add_argument("--pool", type=int, metavar="N", help="shapes-tiny recipe: train on the first N scenes only")
    cap.add_argument("--keep-fraction", type=float,
                     help="--captions filtered: keep the best fraction of pairs (default 0.5)")
    cap.add_argument("--filter-threshold", type=float,
                     help="--captions filtered: keep the pairs with CLIPScore >= this instead")
    cap.add_argument("--filter-model", default="shapes-tiny",
                     help="--captions filtered: the model that scores the pairs (default: shapes-tiny)")
    run_g = p.add_argument_group("run")
    run_g.add_argument("--out", help="output folder (recipe default: runs/<recipe>)")
    run_g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")
    run_g.add_argument("--steps", type=int)
    run_g.add_argument("--stop-at", type=int, help="stop after this step (the schedule still spans --steps)")
    run_g.add_argument("--seed", type=int)
    run_g.add_argument("--batch-size", type=int, help="global batch size")
    run_g.add_argument("--lr", type=float)
    run_g.add_argument("--weight-decay", type=float)
    run_g.add_argument("--warmup-steps", type=int)
    run_g.add_argument("--grad-clip", type=float, help="max gradient norm; 0 disables clipping")
    run_g.add_argument("--precision", choices=["fp32", "amp", "amp_bf16"], help="AMP is used on CUDA only")
    run_g.add_argument("--ckpt-every", type=int)
    run_g.add_argument("--eval-every", type=int)
    run_g.add_argument("--log-every", type=int)
    run_g.add_argument("--num-workers", type=int, help="data-loading processes")
    run_g.add_argument("--device", help="auto (default), cpu, cuda, cuda:1...")
    p.set_defaults(run=run)


def _overrides(args) -> dict:
    out = {"steps": args.steps, "seed": args.seed, "batch_size": args.batch_size, "lr": args.lr,
           "weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps, "loss": args.loss,
           "precision": args.precision, "ckpt_every": args.ckpt_every, "eval_every": args.eval_every,
           "log_every": args.log_every, "num_workers": args.num_workers, "device": args.device,
           "out_dir": args.out}
    if args.grad_clip is not None:
        out["grad_clip"] = args.grad_clip or None
    return {k: v for k, v in out.items() if v is not None}


def _read_model_config(spec: str) -> tuple[dict, dict]:
    path = Path(spec)
    if path.exists() or path.suffix.lower() == ".json":
        text = read_text(path, what="model config")
        try:
            cfg = json.loads(text)
        except ValueError as e:
            raise DataError(f"{spec}: the model config is not valid JSON ({e})") from None
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg", {}), dict):
            raise DataError(f"{spec}: the model config must be a JSON object (open_clip model_cfg, "
                            "or open_clip_config.json with a model_cfg object)")
        if "model_cfg" in cfg:
            from ..models.state_dicts import join_cliplab_config

            return join_cliplab_config(cfg, spec), cfg.get("preprocess_cfg", {})
        return cfg, {}
    from open_clip import get_model_config

    cfg = get_model_config(spec)
    if cfg is None:
        raise UsageError(f"--model-config {spec!r} is neither a JSON file nor an open_clip architecture name")
    return cfg, {}


def _check_caption_options(args) -> None:
    """Refuse bad caption-option values before anything is scored or trained (exit code 2)."""
    from ..validation import check_number, check_positive_int

    if args.rewrites is not None:
        check_positive_int("--rewrites", args.rewrites)
    if args.pool is not None:
        check_positive_int("--pool", args.pool)
    if args.keep_fraction is not None and args.filter_threshold is not None:
        raise UsageError("give --keep-fraction or --filter-threshold, not both")
    if args.keep_fraction is not None:
        check_number("--keep-fraction", args.keep_fraction, minimum=0.0, maximum=1.0, strict_minimum=True)
    if (args.keep_fraction is not None or args.filter_threshold is not None) and args.captions != "filtered":
        raise UsageError("--keep-fraction and --filter-threshold go with --captions filtered")


def _recipe_options(args, name: str) -> dict:
    """The caption options given, checked against what recipe ``name`` accepts."""
    from ..train.recipes import recipe_options

    given = {"captions": args.captions, "rewrites": args.rewrites, "pool": args.pool,
             "keep_fraction": args.keep_fraction, "filter_threshold": args.filter_threshold}
    given = {k: v for k, v in given.items() if v is not None}
    _check_caption_options(args)
    unknown = sorted(set(given) - set(recipe_options(name)))
    if unknown:
        raise UsageError(f"recipe {name!r} has no option {', '.join('--' + k.replace('_', '-') for k in unknown)}")
    if given.get("captions") == "filtered":
        from ..dense.misalignment import ClipScorer
        from ..models.loading import load

        given["scorer"] = ClipScorer(load(args.filter_model, device=args.device if args.device not in (None, "auto") else "cpu"))
    return given


def run(args) -> int:
    from ..train.recipes import get_recipe, recipe_from_table, run_recipe

    if bool(args.recipe) == bool(args.data):
        raise UsageError("give --recipe NAME or --data PATH (exactly one of them)")
    overrides = _overrides(args)
    if args.recipe:
        if args.model_config:
            raise UsageError("--model-config goes with --data; a recipe defines its own model")
        recipe = get_recipe(args.recipe, attention=args.attention, **overrides, **_recipe_options(args, args.recipe))
    else:
        if not args.model_config:
            raise UsageError("--data needs --model-config (a JSON file or an open_clip name)")
        overrides.setdefault("out_dir", "runs/train")
        model_cfg, preprocess_cfg = _read_model_config(args.model_config)
        if args.captions or args.pool or args.keep_fraction is not None or args.filter_threshold is not None:
            raise UsageError("--captions, --pool, --keep-fraction and --filter-threshold go with --recipe; "
                             "--data trains on the table's captions (add rewrites with --rewrites)")
        recipe = recipe_from_table(args.data, model_cfg, preprocess_cfg, attention=args.attention, **overrides)
        if args.rewrites:
            from ..train.reinforce import is_reinforced

            _check_caption_options(args)
            if is_reinforced(args.data):
                raise UsageError("--rewrites cannot go with reinforced shards: their teacher embeddings "
                                 "belong to the stored captions (cliplab reinforce stores its own)")
            from ..train.datasets import RewrittenSet

            recipe.train_set = RewrittenSet(recipe.train_set, args.rewrites, seed=recipe.config.seed)
    result = run_recipe(recipe, resume=args.resume, stop_at=args.stop_at)
    if int(os.environ.get("RANK", "0")) == 0:
        for key, value in result.items():
            print(f"{key:>16}  {value:.4f}" if isinstance(value, float) else f"{key:>16}  {value}")
        if result.get("checkpoint"):
            print(f"load it with --model local-dir:{result['checkpoint']}")
    return 0
