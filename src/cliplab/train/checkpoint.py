"""Checkpoints of the Trainer: weights, optimizer, scheduler, AMP scaler and RNG states.

A checkpoint is a folder ``out_dir/checkpoints/step_NNNNNNN`` holding the
weights (an open_clip folder when the architecture is known, loadable as
``local-dir:<folder>``) and ``trainer_state.pt`` (optimizer, scheduler, grad
scaler, the RNG states of every rank, the run's config, and the objective's own
``state_dict`` when it has one: an EMA teacher, heads).  The file
``checkpoints/latest`` names the newest one.

Writes are atomic: the folder is written under a hidden temporary name and
renamed, then ``latest`` is replaced by rename, so a run killed at any moment
leaves the previous checkpoint intact and ``latest`` pointing to a complete
folder.  ``trainer_state.pt`` holds only tensors and primitives, so it loads
with ``torch.load(..., weights_only=True)``.

:class:`CheckpointWriter` lets training go on while a checkpoint is written: the
state is copied (to CPU) at the step it belongs to, and the files are written from
that copy in a background thread, one checkpoint at a time.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import shutil
import threading
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from ..models.convert import save_open_clip_folder
from ..errors import CheckpointMismatch
from . import distributed

logger = logging.getLogger("cliplab.train")

WEIGHTS_FILE = "open_clip_model.safetensors"
STATE_FILE = "trainer_state.pt"
# Fields of the run's config that may change on resume without a warning.
RESUME_HARMLESS = frozenset({"steps", "ckpt_every", "eval_every", "log_every", "out_dir", "num_workers", "device"})


def latest_checkpoint(out_dir) -> Path | None:
    """The checkpoint folder named by ``out_dir/checkpoints/latest``, or None."""
    pointer = Path(out_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def save_checkpoint(out_dir, step: int, model, optimizer, scheduler, scaler, env: distributed.DistEnv, *,
                    config: dict, model_cfg: dict | None = None, preprocess_cfg: dict | None = None,
                    objective=None) -> None:
    """Write the checkpoint of ``step`` atomically (collective: call on every rank).

    Parameters
    ----------
    out_dir : str or Path
        The run folder; the checkpoint goes to ``out_dir/checkpoints/step_NNNNNNN``.
    step : int
        Optimizer steps done.
    model, optimizer, scheduler, scaler
        The plain model and the run's ``AdamW``, ``LambdaLR`` and ``GradScaler``.
    env : DistEnv
        Every rank contributes its RNG state; the main rank writes.
    config : dict
        The run's config (``dataclasses.asdict(TrainConfig)``), compared on resume.
    model_cfg : dict, optional
        open_clip architecture; when given the weights form an open_clip folder.
    preprocess_cfg : dict, optional
        Saved with ``model_cfg``.
    objective : torch.nn.Module, optional
        The run's objective; its :meth:`~cliplab.train.losses.Objective.trainer_state`,
        when not empty, is saved too.
    """
    writer = CheckpointWriter(background=False)
    writer.save(out_dir, step, model, optimizer, scheduler, scaler, env, config=config,
                model_cfg=model_cfg, preprocess_cfg=preprocess_cfg, objective=objective)
    writer.close(env)


class CheckpointWriter:
    """Writes the Trainer's checkpoints, by default in a background thread.

    :meth:`save` takes the RNG states (a collective) and, on the main rank, copies
    the weights, optimizer, scheduler and scaler states to CPU memory at once: the
    checkpoint is the state of that step whatever training does next.  The files are
    then written from the copy (atomically, as :func:`save_checkpoint` does) while
    training continues.  One write is in flight at a time: the next ``save`` first
    waits for the previous one.  :meth:`close` waits for the last write (re-raising
    its error, if any) and synchronises the ranks.

    Parameters
    ----------
    background : bool, default True
        False writes in the calling thread, inside :meth:`save`.
    """

    def __init__(self, *, background: bool = True):
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, out_dir, step: int, model, optimizer, scheduler, scaler, env: distributed.DistEnv, *,
             config: dict, model_cfg: dict | None = None, preprocess_cfg: dict | None = None,
             objective=None) -> None:
        """Snapshot the state of ``step`` and write it (collective: call on every rank)."""
        rng = rng_state(env)
        if not env.is_main:
            return
        weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
        state = {"step": step, "optimizer": _cpu_copy(optimizer.state_dict()),
                 "scheduler": copy.deepcopy(scheduler.state_dict()), "scaler": copy.deepcopy(scaler.state_dict()),
                 "rng": rng, "config": copy.deepcopy(config), "world_size": env.world_size}
        objective_state = objective.trainer_state() if objective is not None else {}
        if objective_state:
            state["objective"] = _cpu_copy(dict(objective_state))
        args = (Path(out_dir), step, weights, state, copy.deepcopy(model_cfg), copy.deepcopy(preprocess_cfg))
        self.wait()
        if not self.background:
            _write(*args)
            return
        self._thread = threading.Thread(target=self._run, args=args, name="cliplab-checkpoint")
        self._thread.start()

    def _run(self, *args) -> None:
        try:
            _write(*args)
        except BaseException as exc:  # re-raised in the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Wait for the write in flight; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def abandon(self) -> None:
        """Wait for the write in flight, logging (not raising) its error: for a run that is failing."""
        try:
            self.wait()
        except Exception as exc:
            logger.error("writing the last checkpoint failed too: %s", exc)

    def close(self, env: distributed.DistEnv) -> None:
        """Wait for the last write, then synchronise the ranks (collective)."""
        self.wait()
        distributed.barrier(env)


def _cpu_copy(obj):
    """A copy of a (nested) state dict whose tensors are new CPU tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _write(out_dir: Path, step: int, weights: dict, state: dict, model_cfg: dict | None,
           preprocess_cfg: dict | None) -> None:
    """Write one checkpoint folder under a temporary name, then rename it and ``latest``."""
    from safetensors.torch import save_file

    root = out_dir / "checkpoints"
    name = f"step_{step:07d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if model_cfg is not None:  # an open_clip folder: loadable by cliplab and open_clip
        save_open_clip_folder(tmp, model_cfg, weights, preprocess_cfg)
    else:
        save_file(weights, str(tmp / WEIGHTS_FILE))
    torch.save(state, tmp / STATE_FILE)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    (root / "latest.tmp").write_text(name + "\n")
    os.replace(root / "latest.tmp", root / "latest")
    logger.info("saved checkpoint %s", final)


def load_checkpoint(out_dir, model, optimizer, scheduler, scaler, env: distributed.DistEnv, *, config,
                    objective=None, model_cfg: dict | None = None) -> int:
    """Load the latest checkpoint of ``out_dir`` into the run's objects; return its step (0 if none).

    Parameters
    ----------
    out_dir : str or Path
    model, optimizer, scheduler, scaler
        Loaded in place.
    env : DistEnv
        The RNG states are restored only when the world size is unchanged
        (the data order, a function of the step, is exact either way).
    config : dataclass
        The run's config; changed fields outside :data:`RESUME_HARMLESS` are
        logged as warnings.
    objective : torch.nn.Module, optional
        Gets the objective state the checkpoint holds.
    model_cfg : dict, optional
        The run's model config; its ``"cliplab"`` part (outlier-free attention, MoE
        layout) must be the one the checkpoint recorded.

    Returns
    -------
    int
        The step to continue from.

    Raises
    ------
    CheckpointMismatch
        The checkpoint was trained with another objective (``loss``), another recorded
        architecture (``model_cfg["cliplab"]``), or its states do not fit this run's.
    """
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        logger.info("no checkpoint in %s; starting from step 0", out_dir)
        return 0
    from safetensors.torch import load_file

    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    _check_same_run(ckpt, state["config"], config, model_cfg)
    model.load_state_dict(load_file(str(ckpt / WEIGHTS_FILE), device=str(env.device)))
    _warn_config_changes(state["config"], config)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as e:
        raise CheckpointMismatch(f"{ckpt}: the optimizer state does not fit this run's parameters: {e}") from None
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if objective is not None and "objective" in state:
        try:
            objective.load_trainer_state(state["objective"])
        except (RuntimeError, KeyError) as e:
            raise CheckpointMismatch(f"{ckpt}: the objective's saved state does not fit this run's objective "
                                     f"(another --loss or other options?): {str(e).splitlines()[0]}") from None
    elif objective is not None and objective.trainer_state():
        logger.warning("checkpoint %s holds no objective state; the objective's state starts afresh", ckpt)
    if state["world_size"] == env.world_size:
        set_rng_state(state["rng"], env)
    else:
        logger.warning("checkpoint was written by %d rank(s), now %d: data order is exact, "
                       "dropout randomness is not", state["world_size"], env.world_size)
    logger.info("resumed from %s (step %d)", ckpt, state["step"])
    return int(state["step"])


def rng_state(env: distributed.DistEnv) -> dict:
    """RNG states of every rank (torch) and of this rank (numpy, random, CUDA), as tensors/primitives.

    Collective under data parallelism: every rank must call it.
    """
    torch_state = torch.get_rng_state()
    states = [torch_state]
    if env.is_distributed:
        states = [torch.empty_like(torch_state) for _ in range(env.world_size)]
        torch.distributed.all_gather_object(states, torch_state)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out = {"torch": states,
           "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "gauss": float(gauss)},
           "python": random.getstate()}
    if env.device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(env.device)
    return out


def set_rng_state(rng: dict, env: distributed.DistEnv) -> None:
    """Restore what :func:`rng_state` returned (this rank's torch state)."""
    torch.set_rng_state(rng["torch"][env.rank])
    np_state = rng["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in rng and env.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], env.device)


def _check_same_run(ckpt: Path, saved: dict, config, model_cfg: dict | None) -> None:
    """Refuse to resume a run with another objective or another recorded architecture."""
    import json

    old, new = saved.get("loss"), getattr(config, "loss", None)
    if old is not None and new is not None and old != new:
        raise CheckpointMismatch(f"{ckpt} was trained with --loss {old}, this run uses {new}: resume with "
                                 "the same objective, or train into a new --out")
    cfg_file = ckpt / "open_clip_config.json"
    if model_cfg is None or not cfg_file.is_file():
        return
    try:
        recorded = json.loads(cfg_file.read_text(encoding="utf-8")).get("cliplab") or {}
    except (OSError, ValueError, AttributeError):
        return
    wanted = json.loads(json.dumps(model_cfg.get("cliplab") or {}))
    if recorded != wanted:
        def show(part):
            return ", ".join(f"{k}={part[k].get('softmax', '') if k == 'attention' else 'yes'}"
                             f"{'+gate-' + str(part[k].get('gate')) if k == 'attention' and part[k].get('gate') else ''}"
                             for k in sorted(part)) or "plain"
        raise CheckpointMismatch(f"{ckpt} records the architecture [{show(recorded)}] but this run builds "
                                 f"[{show(wanted)}]: resume with the same options (e.g. --attention), "
                                 "or train into a new --out")


def _warn_config_changes(saved: dict, config) -> None:
    for f in fields(config):
        old, new = saved.get(f.name), getattr(config, f.name)
        if f.name not in RESUME_HARMLESS and old != new:
            logger.warning("resuming with %s=%r (checkpoint had %r)", f.name, new, old)
