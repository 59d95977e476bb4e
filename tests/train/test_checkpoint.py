"""Trainer checkpoints: atomic folders, the latest pointer, optimizer/scheduler/RNG round trips."""

import random

import numpy as np
import torch

from cliplab.train import distributed
import pytest

from cliplab.train.checkpoint import (CheckpointWriter, latest_checkpoint, load_checkpoint, rng_state,
                                      save_checkpoint, set_rng_state)
from cliplab.train.schedule import warmup_cosine_scheduler
from cliplab.train.trainer import TrainConfig

ENV = distributed.DistEnv()


def _run(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = warmup_cosine_scheduler(optimizer, warmup_steps=2, total_steps=10)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return model, optimizer, scheduler, scaler


def _steps(model, optimizer, scheduler, n):
    for _ in range(n):
        model(torch.randn(4, 3)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_state_round_trip():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    state = rng_state(ENV)
    first = _draws()
    _draws()
    set_rng_state(state, ENV)
    assert _draws() == first


def test_save_is_atomic_and_resume_restores_every_state(tmp_path):
    config = TrainConfig(out_dir=str(tmp_path))
    model, optimizer, scheduler, scaler = _run()
    _steps(model, optimizer, scheduler, 3)
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler, scaler, ENV, config={"lr": config.lr})
    assert latest_checkpoint(tmp_path).name == "step_0000003"

    (tmp_path / "checkpoints" / ".step_0000005.tmp").mkdir()  # a write killed half-way
    (tmp_path / "checkpoints" / ".step_0000005.tmp" / "junk").write_text("x")
    assert latest_checkpoint(tmp_path).name == "step_0000003"
    _steps(model, optimizer, scheduler, 2)
    torch.manual_seed(7)
    save_checkpoint(tmp_path, 5, model, optimizer, scheduler, scaler, ENV, config={"lr": config.lr})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000003",
                                                                           "step_0000005"]
    assert sorted(p.name for p in latest_checkpoint(tmp_path).iterdir()) == ["open_clip_model.safetensors",
                                                                            "trainer_state.pt"]
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved_moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    saved_lr = optimizer.param_groups[0]["lr"]
    expected_next = torch.rand(2)
    _steps(model, optimizer, scheduler, 2)  # the run goes on after its checkpoint...

    model_b, optimizer_b, scheduler_b, scaler_b = _run(seed=99)  # ...and a new process resumes from it
    assert load_checkpoint(tmp_path, model_b, optimizer_b, scheduler_b, scaler_b, ENV, config=config) == 5
    torch.testing.assert_close(torch.rand(2), expected_next, atol=0, rtol=0)
    for k, v in model_b.state_dict().items():
        assert torch.equal(v, saved_weights[k]), k
    for p, m in zip(model_b.parameters(), saved_moments):
        assert torch.equal(optimizer_b.state[p]["exp_avg"], m)
    assert scheduler_b.last_epoch == 5 and optimizer_b.param_groups[0]["lr"] == saved_lr


def test_no_checkpoint_starts_at_zero(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert load_checkpoint(tmp_path, *_run(), ENV, config=TrainConfig(out_dir=str(tmp_path))) == 0


def test_background_writer_saves_the_state_of_its_step(tmp_path):
    """Training goes on (weights and Adam moments change in place) while the checkpoint is
    written: the files hold the state of the step saved, and load like a synchronous save."""
    model, optimizer, scheduler, scaler = _run()
    _steps(model, optimizer, scheduler, 3)
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved_moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    writer = CheckpointWriter()
    writer.save(tmp_path, 3, model, optimizer, scheduler, scaler, ENV, config={"lr": 0.1})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
            optimizer.state[p]["exp_avg"].add_(1.0)
    _steps(model, optimizer, scheduler, 1)
    writer.close(ENV)
    model_b, optimizer_b, scheduler_b, scaler_b = _run(seed=99)
    assert load_checkpoint(tmp_path, model_b, optimizer_b, scheduler_b, scaler_b, ENV,
                           config=TrainConfig(out_dir=str(tmp_path))) == 3
    for k, v in model_b.state_dict().items():
        assert torch.equal(v, saved_weights[k]), k
    for p, m in zip(model_b.parameters(), saved_moments):
        assert torch.equal(optimizer_b.state[p]["exp_avg"], m)
    assert scheduler_b.last_epoch == 3


def test_background_write_error_reaches_the_caller(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    writer = CheckpointWriter()
    writer.save(tmp_path, 1, *_run(), ENV, config={})
    with pytest.raises(OSError):
        writer.close(ENV)
    writer.close(ENV)  # reported once
