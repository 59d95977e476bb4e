"""Training recipes: an architecture, its data, its hyper-parameters and its validation.

A recipe is a function registered with :func:`register_recipe` that returns a
:class:`Recipe`; :func:`get_recipe` looks one up and applies overrides of
:class:`~cliplab.train.TrainConfig` fields::

    recipe = get_recipe("shapes-tiny", steps=100, out_dir="runs/quick")
    built = init_model(recipe.model_cfg, recipe.preprocess_cfg, loss=recipe.config.loss,
                        seed=recipe.config.seed)
    Trainer(built.model, built.tokenizer, built.preprocess, recipe.train_set, recipe.config,
            recipe.evaluate, model_cfg=built.model_cfg).fit()

``shapes-tiny``
    The embedded default model: a 7.6M-parameter CLIP (ViT 64 px / patch 8,
    width 128, 3 + 3 layers, 4 heads, embedding 128, CLIP BPE vocabulary,
    context 32 tokens) trained with InfoNCE on the shapes-tiny world
    (:func:`cliplab.data.shapes.shapes_tiny_world`), 80 % of the scenes with
    one object and 20 % with two or three, one of five caption phrasings per
    step (LaCLIP).  Validation: 64-way colour x shape zero-shot accuracy on 512
    single-object ``val`` scenes with the prompt "a photo of a {colour} {shape}.".
    With an objective that needs extra captions or targets (``--loss hqclip``)
    the items also carry one hard-negative caption (one attribute swapped) and
    the multi-hot colour/shape tags (:class:`~cliplab.train.datasets.ShapesTrainSet`).

Outlier-free attention from scratch
    ``get_recipe(name, attention="clipped" | "gated-linear" | "gated-mlp")`` (``cliplab
    train --attention``) trains the same recipe with the attention of "Quantizable
    Transformers" (arXiv 2306.12929) swapped in at initialisation, with the reference's
    from-scratch hyper-parameters (:data:`cliplab.models.attention.ATTENTION_PRESETS`:
    clipped softmax ``α = 3.2``, ``ζ = 1``; gates ``π_init`` 0.25 linear / 0.5 MLP).  The
    choice is recorded in ``model_cfg["cliplab"]["attention"]``, so checkpoints load back
    with it.  Deviation: the recipe's other hyper-parameters stay shapes-tiny's (the
    reference trains BERT/OPT for 10^5–10^6 steps).

    Recipe options (keyword arguments besides TrainConfig fields; ``cliplab train
    --captions/--rewrites/--pool/--keep-fraction/--filter-threshold``) choose the
    captions, for the data-side methods of :mod:`cliplab.train.caption_quality`:
    ``captions="scene"`` (default, as above), ``"noisy"`` (one alt-text-like caption per
    scene, :mod:`cliplab.data.shapes.alt_text`), ``"filtered"`` (the noisy pairs whose
    score by ``scorer`` -- e.g. :class:`cliplab.dense.misalignment.ClipScorer` of the
    bundled model -- is in the best ``keep_fraction`` (default 0.5) or at least
    ``filter_threshold``) or ``"recaptioned"`` (the canonical caption written from the
    ground truth); ``pool=N`` trains on the first N scenes only (80 % / 20 % as above;
    ``"filtered"`` scores a pool of :data:`FILTER_POOL` unless given); ``rewrites=K``
    adds K LaCLIP rewrites of every caption (:class:`~cliplab.train.datasets.RewrittenSet`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from ..data.shapes import shapes_tiny_world, task_world
from ..errors import UsageError
from ..models.transforms import images_to_tensor, make_preprocess
from .datasets import ConcatSet, RewrittenSet, ShapesTrainSet
from .losses import get_loss_class
from .trainer import TrainConfig
from ..registry import Registry

logger = logging.getLogger(__name__)

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
"""open_clip's initial ``logit_scale`` of a CLIP model (log-space)."""

RECIPES: Registry = Registry("recipe")
"""The training recipes, by name: functions ``(**train_config_overrides) -> Recipe``; each
entry's metadata has a one-line ``help``."""


@dataclass
class Recipe:
    """Everything a training run needs besides the model weights.

    Attributes
    ----------
    name : str
    model_cfg : dict
        open_clip architecture (``embed_dim``, ``vision_cfg``, ``text_cfg``).
    preprocess_cfg : dict
        open_clip preprocessing (``size``, ``mean``, ``std``...).
    config : TrainConfig
    train_set : map-style dataset of ``(image, captions)``
    evaluate : callable or None
        ``evaluate(model) -> dict`` of validation metrics.
    """

    name: str
    model_cfg: dict
    preprocess_cfg: dict
    config: TrainConfig
    train_set: object
    evaluate: Callable | None = None


class BuiltModel(NamedTuple):
    """A freshly initialised model with its tokenizer and preprocessing."""

    model: torch.nn.Module
    tokenizer: Callable
    preprocess: Callable
    model_cfg: dict


def register_recipe(name: str, **meta):
    """Function decorator: make ``fn(**train_config_overrides) -> Recipe`` a named recipe.

    Keyword arguments are the entry's metadata: give ``help="one line"``, which
    ``cliplab train --help`` shows.
    """
    return RECIPES.register(name, **meta)


def list_recipes() -> list[str]:
    """Names of the registered recipes, sorted."""
    return sorted(RECIPES.names())


def recipe_options(name: str) -> list[str]:
    """The options of recipe ``name``: its keyword-only parameters (e.g. ``captions``)."""
    params = inspect.signature(RECIPES.get(name)).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def get_recipe(name: str, *, attention: str | dict | None = None, **overrides) -> Recipe:
    """Build recipe ``name``; keyword arguments override its :class:`TrainConfig` fields or set its options.

    Parameters
    ----------
    attention : str or dict, optional
        Train with outlier-free attention: a name of
        :data:`~cliplab.models.attention.ATTENTION_PRESETS` (``"clipped"``,
        ``"gated-linear"``, ``"gated-mlp"``) or an attention spec; see :func:`with_attention`.

    Raises
    ------
    UsageError
        For an unknown recipe or attention, or a keyword that is neither a TrainConfig
        field nor an option of the recipe (:func:`recipe_options`).
    """
    recipe = RECIPES.get(name)
    known = {f.name for f in dataclasses.fields(TrainConfig)} | set(recipe_options(name))
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UsageError(f"not TrainConfig fields or options of recipe {name!r}: {', '.join(unknown)}")
    return with_attention(recipe(**{k: v for k, v in overrides.items() if v is not None}), attention)


def with_attention(recipe: Recipe, attention: str | dict | None) -> Recipe:
    """``recipe`` whose model is initialised with outlier-free attention (in place, returned).

    Sets ``recipe.model_cfg["cliplab"]["attention"]``, which :func:`init_model` (through
    :func:`cliplab.models.loading.build_model`) applies to the freshly built model with the
    from-scratch gate init, and which every checkpoint records.  ``None`` or
    ``"vanilla"`` leaves the recipe as it is.

    Raises
    ------
    UsageError
        An unknown preset name.
    """
    from ..models.attention import ATTENTION_PRESETS

    if attention is None or attention == "vanilla":
        return recipe
    if isinstance(attention, str):
        if attention not in ATTENTION_PRESETS:
            raise UsageError(f"unknown attention {attention!r} (known: vanilla, {', '.join(ATTENTION_PRESETS)})")
        attention = ATTENTION_PRESETS[attention]
    recipe.model_cfg = {**recipe.model_cfg, "cliplab": {**recipe.model_cfg.get("cliplab", {}),
                                                        "attention": dict(attention)}}
    recipe.name = f"{recipe.name}+{attention.get('softmax', 'vanilla')}" + (
        f"+gated-{attention['gate']}" if attention.get("gate") else "")
    return recipe


def init_model(model_cfg: dict, preprocess_cfg: dict | None = None, *, loss: str = "infonce",
                seed: int = 0) -> BuiltModel:
    """Initialise an open_clip CLIP from an architecture dict, ready for ``loss``.

    Parameters
    ----------
    model_cfg : dict
        open_clip architecture (the ``model_cfg`` of ``open_clip_config.json``).
    preprocess_cfg : dict, optional
        Overrides of open_clip's default preprocessing; ``size`` follows the model.
    loss : str, default "infonce"
        The loss to train with; a loss with a bias (sigmoid) adds
        ``init_logit_scale``/``init_logit_bias`` to the returned ``model_cfg``
        unless it sets them, and a loss without one whose ``init_logit_scale``
        is not CLIP's log(1/0.07) (cloob, hard-negatives) adds ``init_logit_scale``.
    seed : int, default 0
        Seeds the random initialisation (the global torch RNG is left untouched).

    Returns
    -------
    BuiltModel
        ``(model, tokenizer, preprocess, model_cfg)``; save ``model_cfg``
        with the weights.
    """
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg

    from ..models.loading import build_model, make_tokenizer

    cfg = copy.deepcopy(model_cfg)
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise UsageError("a model config needs 'embed_dim', 'vision_cfg' and 'text_cfg' (open_clip format)")
    if cfg.get("custom_text") or "hf_model_name" in cfg["text_cfg"] or "timm_model_name" in cfg["vision_cfg"]:
        raise UsageError("training supports open_clip's built-in ViT + text transformer configs only")
    loss_cls = get_loss_class(loss)
    if loss_cls.init_logit_bias is not None and "init_logit_bias" not in cfg:
        cfg["init_logit_bias"] = loss_cls.init_logit_bias
        cfg.setdefault("init_logit_scale", loss_cls.init_logit_scale)
    elif (loss_cls.init_logit_bias is None and loss_cls.init_logit_scale is not None
          and not math.isclose(loss_cls.init_logit_scale, CLIP_INIT_LOGIT_SCALE)):
        cfg.setdefault("init_logit_scale", loss_cls.init_logit_scale)  # CLOOB, hard negatives
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(cfg)
    if (cfg.get("cliplab") or {}).get("attention") is not None:
        from ..models.attention import attention_spec

        # record gamma itself, not alpha: a later change of the context (Long-CLIP) keeps it
        cfg["cliplab"] = {**cfg["cliplab"], "attention": attention_spec(model)}
    pp = dataclasses.asdict(PreprocessCfg())
    pp.update(preprocess_cfg or {})
    pp["size"] = model.visual.image_size
    pp = {k: list(v) if isinstance(v, tuple) else v for k, v in pp.items()}
    set_model_preprocess_cfg(model, pp)
    preprocess = make_preprocess(pp)
    tokenizer = make_tokenizer(cfg)
    return BuiltModel(model, tokenizer, preprocess, cfg)


class ShapesZeroShot:
    """Colour x shape zero-shot accuracy on single-object ShapesWorld scenes.

    Parameters
    ----------
    world : ShapesWorld
        Its seed, held-out pairs and image size are used; scenes are single-object
        (:func:`cliplab.data.shapes.task_world` of ``color-shape``).
    split : {"val", "test"}, default "val"
        ``test`` also holds the held-out compositions.
    n : int, default 512
        Number of scenes (the first ``n`` of the split).
    template : str, default "a photo of a {} {}."
        Filled with (colour, shape).
    tokenizer : callable, optional
        Default: CLIP's BPE tokenizer with the model's context length.
    language : {"en", "zh"}, default "en"
        With "zh" the classes are named in Chinese
        (:data:`~cliplab.data.shapes.captions_zh.COLOR_ZH`, ``SHAPE_ZH``) and the default
        template is :data:`~cliplab.data.shapes.captions_zh.ZH_TEMPLATE` ("一张{colour}{shape}的照片。").

    Returns (when called on a model)
    --------------------------------
    dict
        ``acc`` (64-way, all scenes), ``acc_seen`` and ``acc_heldout`` (when the
        split has held-out pairs), ``acc_color`` and ``acc_shape`` (8-way,
        read from the 64-way prediction).
    """

    def __init__(self, world, split: str = "val", n: int = 512, template: str | None = None,
                 tokenizer: Callable | None = None, language: str = "en"):
        if language not in ("en", "zh"):
            raise ValueError(f"language must be 'en' or 'zh', got {language!r}")
        self.world = task_world(world, "color-shape")
        self.split, self.n, self.tokenizer, self.language = split, n, tokenizer, language
        if template is None and language == "zh":
            from ..data.shapes.captions_zh import ZH_TEMPLATE as template
        self.template = template or "a photo of a {} {}."
        self._data = None

    def _load(self):
        from ..data.shapes import COLORS

        images, scenes = self.world.render_batch(self.split, range(self.n))
        shapes = self.world.shapes_of(self.split)
        pairs = [(c, s) for c in COLORS for s in shapes]
        labels = np.array([pairs.index((sc.objects[0].color, sc.objects[0].shape)) for sc in scenes])
        heldout = np.array([tuple(pairs[k]) in set(self.world.heldout) for k in labels])
        self._data = images, pairs, labels, heldout

    @torch.no_grad()
    def __call__(self, model) -> dict:
        from open_clip import SimpleTokenizer, get_model_preprocess_cfg

        if self._data is None:
            self._load()
        images, pairs, labels, heldout = self._data
        tokenizer = self.tokenizer or SimpleTokenizer(context_length=model.context_length)
        device = next(model.parameters()).device
        x = images_to_tensor(images, None, get_model_preprocess_cfg(model)).to(device)  # (N, 3, H, W)
        if self.language == "zh":
            from ..data.shapes.captions_zh import COLOR_ZH, SHAPE_ZH

            names = [(COLOR_ZH[c], SHAPE_ZH[s]) for c, s in pairs]
        else:
            names = pairs
        texts = tokenizer([self.template.format(c, s) for c, s in names]).to(device)
        img_f = torch.cat([model.encode_image(b, normalize=True) for b in x.split(256)])  # (N, D)
        txt_f = model.encode_text(texts, normalize=True)  # (C, D)
        pred = (img_f @ txt_f.T).argmax(1).cpu().numpy()  # (N,)
        correct = pred == labels
        out = {"acc": float(correct.mean())}
        if heldout.any():
            out["acc_seen"] = float(correct[~heldout].mean())
            out["acc_heldout"] = float(correct[heldout].mean())
        out["acc_color"] = float(np.mean([pairs[p][0] == pairs[t][0] for p, t in zip(pred, labels)]))
        out["acc_shape"] = float(np.mean([pairs[p][1] == pairs[t][1] for p, t in zip(pred, labels)]))
        return out


SHAPES_TINY_MODEL = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 3, "head_width": 32},
    # context 32: the longest caption of 1-3 object scenes is 31 tokens with start/end
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}


FILTER_POOL = 16_384
"""Scenes scored by ``captions="filtered"`` when no ``pool`` is given."""


@register_recipe("shapes-tiny", help="the bundled model: a 7.6M-parameter CLIP on ShapesWorld, 4,000 steps")
def shapes_tiny(*, captions: str = "scene", rewrites: int = 0, pool: int | None = None,
                keep_fraction: float | None = None, filter_threshold: float | None = None,
                scorer: Callable | None = None, **overrides) -> Recipe:
    """The embedded default model trained on ShapesWorld (see the module docstring)."""
    from .caption_quality import filter_by_score
    from .datasets import SHAPES_CAPTIONS

    kinds = (*SHAPES_CAPTIONS, "filtered")
    if captions not in kinds:
        raise UsageError(f"captions must be one of {', '.join(kinds)}, got {captions!r}")
    if captions == "filtered" and scorer is None:
        raise UsageError("captions='filtered' needs a scorer, e.g. "
                         "cliplab.dense.misalignment.ClipScorer(cliplab.load('shapes-tiny'))")
    if captions != "filtered" and (keep_fraction is not None or filter_threshold is not None):
        raise UsageError("keep_fraction and filter_threshold go with captions='filtered'")
    if pool is not None and pool < 2:
        raise UsageError(f"pool must be >= 2 scenes, got {pool}")
    config = TrainConfig(steps=4000, batch_size=128, lr=1e-3, weight_decay=0.1, warmup_steps=100,
                         grad_clip=1.0, seed=0, loss="infonce", ckpt_every=500, eval_every=500,
                         log_every=25, out_dir="runs/shapes-tiny")
    config = dataclasses.replace(config, **overrides)
    world = shapes_tiny_world(config.seed)
    multi = world.replace(seed=config.seed + 1, n_objects=(2, 3), split_sizes={"train": 250_000})
    if captions == "filtered" and pool is None:
        pool = FILTER_POOL
    if pool is not None:
        n_single = int(round(0.8 * pool))
        world = world.replace(split_sizes={**world.split_sizes, "train": n_single})
        multi = multi.replace(split_sizes={**multi.split_sizes, "train": pool - n_single})
    loss_cls = get_loss_class(config.loss)
    if loss_cls.needs_extra_captions and captions in ("noisy", "filtered"):
        raise UsageError(f"--loss {config.loss} reads hard negatives of the scenes' own captions; "
                         f"it cannot train on --captions {captions}")
    extras = {"negatives": int(loss_cls.needs_extra_captions), "tags": loss_cls.needs_targets,  # hqclip
              "captions": "noisy" if captions == "filtered" else captions}
    train_set = ConcatSet(ShapesTrainSet(world, "train", **extras), ShapesTrainSet(multi, "train", **extras))
    if captions == "filtered":
        if keep_fraction is None and filter_threshold is None:
            keep_fraction = 0.5
        train_set, report, _ = filter_by_score(train_set, scorer, threshold=filter_threshold,
                                               keep_fraction=keep_fraction)
        if not len(train_set):
            raise UsageError(f"the caption filter kept nothing ({report.summary()}); lower the threshold")
        logger.info("shapes-tiny filtered captions: %s", report.summary())
    if rewrites:
        train_set = RewrittenSet(train_set, rewrites, seed=config.seed)
    return Recipe("shapes-tiny", copy.deepcopy(SHAPES_TINY_MODEL), {}, config, train_set,
                  ShapesZeroShot(shapes_tiny_world(config.seed), "val", n=512))


def recipe_from_table(path, model_cfg: dict, preprocess_cfg: dict | None = None, *,
                      attention: str | dict | None = None, **overrides) -> Recipe:
    """A recipe that trains ``model_cfg`` on a caption table or WebDataset shards.

    Parameters
    ----------
    path : str or Path
        A ``.csv``/``.tsv``/``.jsonl`` table, read with
        :func:`cliplab.data.sources.read_caption_table`; a folder written by
        ``cliplab reinforce`` (:class:`~cliplab.train.reinforce.ReinforcedSet`, for
        ``loss="mobileclip-dr"``); otherwise ``.tar``
        shards (a file, a folder, a glob or a brace pattern such as
        ``shard-{0000..0003}.tar``), indexed with
        :func:`cliplab.data.sources.index_webdataset`.
    model_cfg, preprocess_cfg : dict
        open_clip architecture and preprocessing.
    attention : str or dict, optional
        Outlier-free attention, as in :func:`get_recipe`.
    **overrides
        :class:`TrainConfig` fields.
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UsageError(f"not TrainConfig fields: {', '.join(unknown)}")
    config = TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    train_set = _data_set(path, seed=config.seed)
    if getattr(train_set, "at_step", None) is not None and not get_loss_class(config.loss).needs_teacher:
        logger.warning("%s is a reinforced dataset but --loss %s reads none of its teacher embeddings; "
                       "train with --loss mobileclip-dr (or mobileclip-dr-mix) to use them", path, config.loss)
    size = model_cfg.get("vision_cfg", {}).get("image_size")
    if getattr(train_set, "size", None) is not None and size is not None and train_set.size != size:
        logger.warning("%s: the reinforced images are %d px but the model takes %s px; they will be resized",
                       path, train_set.size, size)
    return with_attention(Recipe(f"table:{path}", copy.deepcopy(model_cfg), dict(preprocess_cfg or {}), config,
                                 train_set), attention)


TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")


def _data_set(path, *, seed: int = 0):
    """The training set of ``path``: a caption table, a reinforced dataset, else WebDataset shards."""
    from ..data.sources import (CaptionTableSet, SkipLog, WebDatasetSet, expand_shards, index_webdataset,
                                read_caption_table)
    from .reinforce import ReinforcedSet, is_reinforced

    if is_reinforced(path):
        return ReinforcedSet(path, seed=seed)   # the objective is checked by recipe_from_table
    if Path(path).suffix.lower() in TABLE_SUFFIXES:
        return CaptionTableSet(read_caption_table(path))
    shards = expand_shards(path)
    skipped = SkipLog()
    samples = index_webdataset(shards, skip_log=skipped)
    logger.log(logging.WARNING if skipped.count else logging.INFO, "%s: indexed %d samples in %d shard(s); %s",
               path, len(samples), len(shards), skipped.summary())
    return WebDatasetSet(samples)


def run_recipe(recipe: Recipe, *, resume: bool = False, stop_at: int | None = None,
               progress: bool | None = None) -> dict:
    """Initialise the recipe's model (seeded by ``config.seed``) and train it.

    Returns the Trainer's last metric row plus ``checkpoint`` (the folder of
    the last checkpoint, loadable as ``local-dir:<folder>``).
    """
    from .checkpoint import latest_checkpoint
    from .trainer import Trainer

    built = init_model(recipe.model_cfg, recipe.preprocess_cfg, loss=recipe.config.loss,
                        seed=recipe.config.seed)
    trainer = Trainer(built.model, built.tokenizer, built.preprocess, recipe.train_set, recipe.config,
                      recipe.evaluate, model_cfg=built.model_cfg, progress=progress)
    row = trainer.fit(resume=resume, stop_at=stop_at)
    ckpt = latest_checkpoint(recipe.config.out_dir)
    return {**row, "checkpoint": str(ckpt) if ckpt else None}
