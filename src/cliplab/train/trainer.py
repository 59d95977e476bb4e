"""The training loop of cliplab: contrastive image-text training of an open_clip model, and more.

One :class:`Trainer` serves every training method (CLIP, SigLIP, and later
CLOOB, distillation, prompt learning, dense heads): a method plugs in an objective from
:mod:`cliplab.train.losses` (or an :class:`~cliplab.train.losses.Objective` instance
that trains another module: a dense head, learnable prompts, a region prompter),
a training set from :mod:`cliplab.train.datasets` and an ``evaluate(model) -> dict`` callback.  The loop never names a method:
the objective runs the forward pass (``forward_model``) and returns named
loss terms, which the loop sums and logs.

What a step does (``t`` counts optimizer steps from 0):

1. take the global batch ``global_batch_indices(n, B, seed, t)``; rank ``r`` of
   ``W`` keeps the contiguous slice ``[r B/W, (r+1) B/W)``;
2. pick one caption per image (LaCLIP), ``caption_choice(..., seed, t)``, unless the
   objective trains without captions;
3. ``outputs = objective.forward_model(model, batch)``, ``terms = objective(outputs, batch)``,
   backward of their sum, clip the gradient norm, AdamW step, learning rate
   from :func:`~cliplab.train.schedule.warmup_cosine_factor`;
4. clamp ``logit_scale`` (where the model has one) to [0, ln 100] as CLIP does.

With ``num_workers`` > 0, step ``t``'s batch (images rendered or decoded,
captions tokenised) is made in DataLoader worker processes while the model trains on
earlier steps.  Checkpoints are copied at their step and written by a background
thread (:class:`~cliplab.train.checkpoint.CheckpointWriter`); ``fit`` returns once the
last one is on disk.

Everything random is a function of ``(seed, t)`` or lives in the checkpoint
(:mod:`cliplab.train.checkpoint`), so ``fit(resume=True)`` continues exactly as
if never stopped.

Deviation from open_clip's training script: besides 1-D gains and biases and
``logit_scale``, the positional and token embeddings are also exempt from
weight decay.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .._progress import progress_bar
from ..errors import BadImage, DataError, UsageError
from ..models.transforms import images_to_tensor
from . import distributed
from .checkpoint import CheckpointWriter, load_checkpoint
from .datasets import caption_choice, global_batch_indices
from .losses import Batch, Objective, get_loss
from .schedule import warmup_cosine_scheduler

logger = logging.getLogger("cliplab.train")

ADAMW_BETAS = (0.9, 0.98)  # open_clip's defaults for ViT models
ADAMW_EPS = 1e-6
MAX_LOGIT_SCALE = math.log(100)
_PRECISIONS = {"fp32": None, "amp": torch.float16, "amp_bf16": torch.bfloat16}
_MAX_IMAGE_RETRIES = 16


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of one training run.

    Parameters
    ----------
    steps : int, default 1000
        Optimizer steps of the whole run (the schedule ends there).
    batch_size : int, default 128
        GLOBAL batch size, split evenly over data-parallel ranks.
    lr : float, default 5e-4
        Peak learning rate of AdamW (betas (0.9, 0.98), eps 1e-6).
    weight_decay : float, default 0.2
        Decoupled weight decay on weight matrices only.
    warmup_steps : int, default 100
        Linear warm-up, then cosine decay to 0.
    grad_clip : float or None, default 1.0
        Max global gradient norm; None disables clipping.
    seed : int, default 0
        Seeds the batch order, the caption choice and torch's RNG.
    loss : str, default "infonce"
        The objective: a name from :func:`cliplab.train.losses.list_losses`.
    precision : {"fp32", "amp", "amp_bf16"}, default "fp32"
        Mixed precision is used on CUDA only; on CPU the run is fp32.
    ckpt_every : int, default 500
        Checkpoint period in steps (0: only at the end).
    eval_every : int, default 0
        Period of the ``evaluate`` callback (0: only at the end).
    log_every : int, default 10
        Period of metric rows and log lines.
    out_dir : str, default "runs/train"
        Receives ``metrics.jsonl``, ``metrics.csv`` and ``checkpoints/``.
    num_workers : int, default 0
        Data-loading processes (0 loads in the training process).
    device : str, default "auto"
        ``"auto"``: ``cuda:LOCAL_RANK`` if available, else CPU.
    """

    steps: int = 1000
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.2
    warmup_steps: int = 100
    grad_clip: float | None = 1.0
    seed: int = 0
    loss: str = "infonce"
    precision: str = "fp32"
    ckpt_every: int = 500
    eval_every: int = 0
    log_every: int = 10
    out_dir: str = "runs/train"
    num_workers: int = 0
    device: str = "auto"

    def validate(self) -> None:
        """Raise :class:`UsageError` naming the first bad field."""
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "ckpt_every", "eval_every", "num_workers"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1:
            raise UsageError(f"log_every must be >= 1, got {self.log_every}")
        if not self.lr > 0:
            raise UsageError(f"lr must be > 0, got {self.lr}")
        if self.precision not in _PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(_PRECISIONS)}, got {self.precision!r}")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices; none on gains, biases, embeddings, temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "embedding" in name or "logit_" in name
        (no_decay if exempt else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _own_parameter_groups(objective: Objective, groups: list[dict], weight_decay: float) -> list[dict]:
    """AdamW groups (the Trainer's rule) for the objective's trainable parameters not already in ``groups``."""
    seen = {id(p) for g in groups for p in g["params"]}
    own = [{**g, "params": [p for p in g["params"] if id(p) not in seen]}
           for g in parameter_groups(objective, weight_decay)]
    return [g for g in own if g["params"]]


class _StepBatches(torch.utils.data.Dataset):
    """Item ``k``: this rank's ready-to-use batch of step ``first + k``, as a dict of :class:`Batch` fields.

    Items of the training set are ``(image, captions)`` or ``(image, captions, extras)``
    (``get_batch`` likewise returns two or three lists); ``extras`` is a dict with
    ``"teacher"`` and/or ``"targets"`` (name -> array, the same shape for every item)
    and/or ``"extra_captions"`` (K strings, the same K for every item), read only when
    the objective declares ``needs_teacher`` / ``needs_targets`` / ``needs_extra_captions``.
    Captions are read only when it declares ``needs_captions``.  A set with an
    ``at_step(step)`` method is read through the view it returns, whose items may depend
    on the step (:class:`~cliplab.train.reinforce.ReinforcedSet` replays that step's
    stored augmentation); everything else stays a pure function of ``(seed, step)``.
    """

    def __init__(self, train_set, tokenizer, preprocess, preprocess_cfg, *, seed, batch_size,
                 first, last, rank, world_size, objective: Objective):
        self.train_set, self.tokenizer, self.preprocess = train_set, tokenizer, preprocess
        self.preprocess_cfg = preprocess_cfg
        self.seed, self.batch_size, self.first, self.last = seed, batch_size, first, last
        self.local = batch_size // world_size
        self.start = rank * self.local
        self.objective = objective

    def __len__(self) -> int:
        return self.last - self.first

    def __getitem__(self, k: int) -> dict:
        step = self.first + k
        idx = global_batch_indices(len(self.train_set), self.batch_size, self.seed, step)
        idx = idx[self.start:self.start + self.local]
        images, caption_lists, extras, n_bad = self._load(idx, step)
        out = {"images": images_to_tensor(images, self.preprocess, self.preprocess_cfg),  # (B, 3, H, W)
               "step": step, "n_bad": n_bad}
        if self.objective.needs_captions:
            choice = caption_choice([len(c) for c in caption_lists], self.seed, step, self.start)
            texts = [c[i] for c, i in zip(caption_lists, choice)]
            out["tokens"] = self.tokenizer(texts)                                         # (B, T)
            out["caption_index"] = torch.as_tensor(choice, dtype=torch.long)
        for key, needed in (("teacher", self.objective.needs_teacher), ("targets", self.objective.needs_targets)):
            if needed:
                out[key] = self._stack(key, [self._extra(e, key, i) for e, i in zip(extras, idx)], idx)
        if self.objective.needs_extra_captions:
            extra = [list(self._extra(e, "extra_captions", i)) for e, i in zip(extras, idx)]
            if len({len(c) for c in extra}) != 1:
                raise DataError("every training item needs the same number of extra captions")
            tokens = self.tokenizer([c for caps in extra for c in caps])               # (B*K, T)
            out["extra_tokens"] = tokens.reshape(len(extra), len(extra[0]), -1)         # (B, K, T)
        return out

    def _stack(self, key: str, per_item: list[dict], idx) -> dict[str, torch.Tensor]:
        """name -> (B, ...) tensor from each item's ``{name: array}`` under ``key``."""
        names = list(per_item[0])
        out = {}
        for name in names:
            try:
                arrays = [np.asarray(d[name]) for d in per_item]
            except KeyError:
                raise DataError(f"every training item needs {key}[{name!r}] (item {int(idx[0])} has it)") from None
            if len({a.shape for a in arrays}) != 1:
                raise DataError(f"{key}[{name!r}] must have the same shape in every training item, got "
                                f"{sorted({a.shape for a in arrays})}")
            out[name] = torch.as_tensor(np.stack(arrays))
        return out

    def _extra(self, extras, key: str, i) -> object:
        if not extras or key not in extras:
            name = self.objective.name or type(self.objective).__name__
            raise DataError(f"the {name!r} objective needs {key!r} in every training item; "
                            f"item {int(i)} has none (items are (image, captions, {{{key!r}: ...}}))")
        return extras[key]

    def _load(self, idx, step: int):
        ds = self.train_set
        if hasattr(ds, "at_step"):  # items that depend on the step (reinforced sets replay its augmentation)
            ds = ds.at_step(step)
        if hasattr(ds, "get_batch"):
            try:
                images, captions, *extras = ds.get_batch(idx)
                self._check_captions(captions, idx)
                return images, captions, extras[0] if extras else [None] * len(idx), 0
            except BadImage:
                pass  # find the broken ones item by item
        images, captions, extras, n_bad = [], [], [], 0
        for i in idx:
            image, caps, extra, bad = self._load_one(ds, int(i))
            images.append(image)
            captions.append(caps)
            extras.append(extra)
            n_bad += bad
        self._check_captions(captions, idx)
        return images, captions, extras, n_bad

    def _load_one(self, ds, i: int):
        """Item ``i`` of ``ds``, or the next readable one (counted) if its image is broken."""
        n = len(ds)
        for attempt in range(_MAX_IMAGE_RETRIES):
            try:
                image, caps, *extra = ds[(i + attempt) % n]
                return image, caps, extra[0] if extra else None, attempt
            except BadImage as err:
                logger.warning("skipping unreadable image (%s); using the next item instead", err)
        raise DataError(f"{_MAX_IMAGE_RETRIES} consecutive unreadable images from item {i}")

    def _check_captions(self, captions, idx):
        if not self.objective.needs_captions:
            return
        for c, i in zip(captions, idx):
            if not c:
                raise DataError(f"training item {int(i)} has no caption")


class _StepForward(torch.nn.Module):
    """The model plus the objective's forward hook: what the data-parallel wrapper wraps.

    Running ``objective.forward_model`` inside the wrapped ``forward`` keeps
    DDP's gradient averaging correct whatever the hook calls on the model.
    """

    def __init__(self, model: torch.nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.forward_model = objective.forward_model  # a bound method, not a submodule
        if any(p.requires_grad for p in objective.parameters()):
            self.objective = objective  # its own trainable parameters: DDP averages their gradients too

    def forward(self, batch: Batch):
        return self.forward_model(self.model, batch)


class _MetricsLog:
    """Rows of metrics in ``metrics.jsonl`` and ``metrics.csv`` (main rank only)."""

    def __init__(self, out_dir: Path, *, enabled: bool, keep_until: int):
        self.enabled = enabled
        self.jsonl, self.csv = out_dir / "metrics.jsonl", out_dir / "metrics.csv"
        self.rows: list[dict] = []
        if not enabled:
            return
        if keep_until > 0 and self.jsonl.exists():  # resumed: drop rows after the checkpoint
            self.rows = [r for r in self._read_rows() if r["step"] <= keep_until]
        self._rewrite()

    def _read_rows(self) -> list[dict]:
        """The rows of ``metrics.jsonl``; a line cut by a killed run is dropped with a warning."""
        rows, bad = [], 0
        for line in self.jsonl.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line) if line.strip() else None
            except ValueError:
                row = {}
            if row is None:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
            else:
                bad += 1
        if bad:
            logger.warning("%s: dropped %d unreadable line(s) (cut by an interrupted run?)", self.jsonl, bad)
        return rows

    def append(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv()

    def _rewrite(self) -> None:
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self._write_csv()

    def _write_csv(self) -> None:
        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(self.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)


class Trainer:
    """Training of an open_clip model (or of any module an objective drives), resumable and data-parallel.

    Parameters
    ----------
    model : open_clip.CLIP or torch.nn.Module
        The model to train (trained in place; parameters with
        ``requires_grad=False`` stay frozen).  For an objective with an
        ``init_logit_bias`` (sigmoid) it must have a ``logit_bias``.  Any
        module works with an objective that overrides ``forward_model``
        (a dense head over a frozen Backbone, learnable prompts); its
        ``logit_scale``, if it has one, is clamped to [0, ln 100].
    tokenizer : callable or None
        ``list[str] -> LongTensor (B, T)``, e.g. open_clip's tokenizer; None for
        an objective with ``needs_captions = False``.
    preprocess : callable or None
        ``PIL.Image -> FloatTensor (3, H, W)``; used for PIL images and arrays
        not at the model's size.
    train_set : map-style dataset
        Items ``(image, captions)``, or ``(image, captions, extras)`` for an
        objective that needs teacher outputs or extra captions; see
        :mod:`cliplab.train.datasets` and :class:`cliplab.train.losses.Objective`.
    config : TrainConfig
    evaluate : callable, optional
        ``evaluate(model) -> dict`` of float metrics, called on the main rank
        every ``eval_every`` steps and at the end, with the model in eval mode.
    model_cfg : dict, optional
        The open_clip architecture dict; when given, each checkpoint gets an
        ``open_clip_config.json`` so that ``open_clip.create_model("local-dir:<ckpt>")``
        loads it.
    progress : bool, optional
        Show a progress bar (default: ``CLIPLAB_PROGRESS``).
    objective : Objective, optional
        An objective instance to train with instead of ``config.loss`` (the
        name is then ignored); how methods whose objective is not a general
        image-text loss (dense heads, prompters) use this loop.  Its
        ``rank``/``world_size`` are set by the Trainer.
    preprocess_cfg : dict, optional
        The image size, mean and std the images are normalised with (open_clip's
        ``preprocess_cfg``); default: read from ``model``, which only an
        open_clip model has.

    Raises
    ------
    UsageError
        Bad config; an objective that needs captions without a tokenizer.
    DataError
        An empty training set; items missing what the objective needs.

    Examples
    --------
    >>> trainer = Trainer(model, tokenizer, preprocess, train_set,
    ...                   TrainConfig(steps=1500, out_dir="runs/x"))   # doctest: +SKIP
    >>> trainer.fit()                                                   # doctest: +SKIP
    """

    def __init__(self, model, tokenizer, preprocess, train_set, config: TrainConfig,
                 evaluate: Callable | None = None, *, model_cfg: dict | None = None,
                 progress: bool | None = None, objective: Objective | None = None,
                 preprocess_cfg: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.train_set = train_set
        self.config = config
        self.evaluate = evaluate
        self.model_cfg = model_cfg
        self.progress = progress
        self.objective = objective
        self.preprocess_cfg = preprocess_cfg

    # ----------------------------------------------------------------- loop
    def fit(self, resume: bool = False, *, stop_at: int | None = None) -> dict:
        """Train to ``config.steps`` (or ``stop_at``) and return the last metrics.

        Parameters
        ----------
        resume : bool, default False
            Continue from ``out_dir/checkpoints/latest`` if it exists.
        stop_at : int, optional
            Stop after this global step (a checkpoint is written there); the
            schedule still spans ``config.steps``.

        Returns
        -------
        dict
            The last metric row (step, loss terms, lr, eval metrics...).
        """
        cfg = self.config
        cfg.validate()
        if len(self.train_set) < 1:
            raise DataError("the training set is empty")
        env = distributed.setup(cfg.device)
        try:
            return self._fit(env, resume, stop_at)
        finally:
            distributed.cleanup(env)

    def _fit(self, env: distributed.DistEnv, resume: bool, stop_at: int | None) -> dict:
        cfg = self.config
        if cfg.batch_size % env.world_size:
            raise UsageError(f"batch_size {cfg.batch_size} is not divisible by {env.world_size} ranks")
        if cfg.batch_size < 2 and (self.objective is None or self.objective.needs_captions):
            raise UsageError(f"batch_size {cfg.batch_size}: image-text objectives contrast the samples of a batch, "
                             "give at least 2")
        out_dir = Path(cfg.out_dir)
        if env.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed + env.rank)
        model = self.model.to(env.device).train()
        objective = self._objective(env, model)
        self._check_bias(model, objective)
        groups = objective.parameter_groups(model, cfg.weight_decay) or parameter_groups(model, cfg.weight_decay)
        groups += _own_parameter_groups(objective, groups, cfg.weight_decay)   # an objective's own head
        params = [p for g in groups for p in g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS)
        scheduler = warmup_cosine_scheduler(optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)
        amp_dtype = _PRECISIONS[cfg.precision] if env.device.type == "cuda" else None
        if _PRECISIONS[cfg.precision] is not None and amp_dtype is None:
            logger.warning("precision %r needs CUDA; training in fp32 on %s", cfg.precision, env.device)
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

        start = load_checkpoint(out_dir, model, optimizer, scheduler, scaler, env, config=cfg,
                                objective=objective, model_cfg=self.model_cfg) if resume else 0
        end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
        step_forward = distributed.wrap(_StepForward(model, objective), env)
        metrics = _MetricsLog(out_dir, enabled=env.is_main, keep_until=start)
        pp_cfg = self.preprocess_cfg if self.preprocess_cfg is not None else _preprocess_cfg(model)
        batches = _StepBatches(self.train_set, self.tokenizer, self.preprocess, pp_cfg, seed=cfg.seed,
                               batch_size=cfg.batch_size, first=start, last=end,
                               rank=env.rank, world_size=env.world_size, objective=objective)
        # With workers, rendering/decoding and tokenising run in other processes, ahead of
        # the model.  Their generator keeps the DataLoader from drawing on torch's global
        # RNG, which belongs to the model (and to the checkpoint).
        loader = (batches[k] for k in range(len(batches))) if cfg.num_workers == 0 else torch.utils.data.DataLoader(
            batches, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
            pin_memory=env.device.type == "cuda", persistent_workers=False,
            generator=torch.Generator().manual_seed(cfg.seed))
        writer = CheckpointWriter()
        logger.info("training steps %d..%d of %d, global batch %d on %d rank(s), %s, %d threads",
                    start, end, cfg.steps, cfg.batch_size, env.world_size, env.device, torch.get_num_threads())

        bar = progress_bar(total=end, initial=start, desc="train", unit="step",
                           progress=self.progress if env.is_main else False)
        row: dict = {"step": start}
        window_time, window_steps, bad_images = 0.0, 0, 0
        tic = time.perf_counter()
        try:
            for step, item in enumerate(loader, start=start):
                n_bad = item.pop("n_bad")
                batch = Batch(**_to_device(item, env.device), total_steps=cfg.steps)
                with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    outputs = step_forward(batch)
                    terms = objective(outputs, batch)
                    loss = sum(terms.values())
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                lr = optimizer.param_groups[0]["lr"]  # the rate this step used
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if isinstance(getattr(model, "logit_scale", None), torch.Tensor):
                    with torch.no_grad():
                        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
                done = step + 1
                bad_images += n_bad
                window_steps += 1
                window_time += time.perf_counter() - tic

                is_last = done == end
                is_eval = self.evaluate is not None and (
                    (cfg.eval_every and done % cfg.eval_every == 0) or is_last)
                if done % cfg.log_every == 0 or is_last or is_eval:
                    row = self._log_row(env, done, terms, loss, model, lr, bad_images,
                                        cfg.batch_size * window_steps / max(window_time, 1e-9))
                    window_time, window_steps = 0.0, 0
                    if is_eval:
                        row.update(self._run_evaluate(env, model, done))
                    metrics.append(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or is_last:
                    writer.save(out_dir, done, model, optimizer, scheduler, scaler, env, config=asdict(cfg),
                                model_cfg=self.model_cfg, preprocess_cfg=pp_cfg,
                                objective=objective)  # written while training goes on
                bar.update(1)
                tic = time.perf_counter()
        except BaseException:
            writer.abandon()  # the checkpoint being written still lands; the error is the caller's
            raise
        writer.close(env)
        bar.close()
        return row

    # ------------------------------------------------------------ helpers
    def _objective(self, env: distributed.DistEnv, model) -> Objective:
        """The run's objective on ``env.device``, set up for ``model``: the given instance, else ``config.loss``."""
        if self.objective is None:
            objective = get_loss(self.config.loss, rank=env.rank, world_size=env.world_size)
        else:
            objective = self.objective
            objective.rank, objective.world_size = env.rank, env.world_size
        if objective.needs_captions and self.tokenizer is None:
            raise UsageError(f"the {objective.name or type(objective).__name__!r} objective trains on captions: "
                             "pass a tokenizer")
        objective.setup(model, self.config)
        return objective.to(env.device)

    @staticmethod
    def _check_bias(model, objective: Objective) -> None:
        has_bias = getattr(model, "logit_bias", None) is not None
        wants_bias = objective.init_logit_bias is not None
        if has_bias != wants_bias:
            raise UsageError(
                f"the {objective.name!r} loss {'needs' if wants_bias else 'takes no'} logit_bias but the model "
                f"{'has one' if has_bias else 'has none'}; build it with "
                "cliplab.train.recipes.init_model(model_cfg, loss=...)")

    def _log_row(self, env, step, terms, loss, model, lr, bad_images, samples_per_s) -> dict:
        values = torch.stack([loss.detach().float()] + [t.detach().float() for t in terms.values()])
        if env.is_distributed:  # the mean over ranks is the global-batch loss for every family
            torch.distributed.all_reduce(values)
            values /= env.world_size
        values = values.tolist()
        row = {"step": step, "epoch": step * self.config.batch_size / len(self.train_set), "loss": values[0]}
        row.update({f"loss_{name}": v for name, v in zip(terms, values[1:])})
        row["lr"] = lr
        if isinstance(getattr(model, "logit_scale", None), torch.Tensor):
            row["logit_scale"] = float(model.logit_scale.detach().exp())
        if getattr(model, "logit_bias", None) is not None:
            row["logit_bias"] = float(model.logit_bias.detach())
        row["samples_per_s"] = samples_per_s
        row["bad_images"] = bad_images
        if env.is_main:
            logger.info("step %d/%d loss %.4f lr %.3g %.0f samples/s", step, self.config.steps,
                        row["loss"], row["lr"], samples_per_s)
        return row

    def _run_evaluate(self, env, model, step) -> dict:
        if self.evaluate is None:
            return {}
        result = {}
        if env.is_main:
            model.eval()
            with torch.no_grad(), torch.random.fork_rng(devices=[]):  # evaluation never shifts training RNG
                result = {f"eval_{k}": float(v) for k, v in self.evaluate(model).items()}
            model.train()
            logger.info("step %d eval %s", step, ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        distributed.barrier(env)
        return result


def _to_device(item: dict, device: torch.device) -> dict:
    """Move the tensors of a batch dict (and of its ``teacher`` and ``targets`` dicts) to ``device``."""
    def move(v):
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v

    return move(item)


def _preprocess_cfg(model) -> dict | None:
    from open_clip import get_model_preprocess_cfg

    try:
        cfg = dict(get_model_preprocess_cfg(model))
    except AttributeError:
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()} or None
