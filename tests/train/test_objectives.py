"""The Trainer's objective interface: custom objectives, named terms, teacher outputs, extra captions."""

import csv
import json

import numpy as np
import pytest
import torch

from cliplab.errors import DataError
from cliplab.train import TrainConfig, Trainer, init_model, losses
from cliplab.train.datasets import global_batch_indices
from cliplab.train.losses import Objective, register_loss
from cliplab.train.losses.infonce import infonce_loss

CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
COLOURS = ["red", "green", "blue", "yellow"]


class Colours:
    """16 px patches of 4 colours; with ``extras`` an item also carries a teacher one-hot and 2 extra captions."""

    def __init__(self, n=32, extras=False):
        self.n, self.extras = n, extras

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        k = i % len(COLOURS)
        image = np.full((16, 16, 3), 60 * k, np.uint8)
        captions = [f"a {COLOURS[k]} square", COLOURS[k]]
        if not self.extras:
            return image, captions
        teacher = {"colour": np.eye(len(COLOURS), dtype=np.float32)[k]}                  # (4,)
        return image, captions, {"teacher": teacher, "extra_captions": [f"not {COLOURS[k - 1]}", f"{i}"]}


class TwoTerms(Objective):
    """InfoNCE plus a pull of matching pairs together: two named terms."""

    init_logit_scale = float(np.log(10.0))

    def forward(self, outputs, batch=None):
        img, txt = outputs.image_features, outputs.text_features                           # (B, D)
        return {"contrastive": infonce_loss(img, txt, outputs.logit_scale),
                "align": 0.5 * (1 - (img * txt).sum(1)).mean()}


class WithTeacher(Objective):
    """Reads every optional input and changes the forward pass; records what it saw."""

    needs_teacher = True
    needs_extra_captions = True
    seen: list = []

    def forward_model(self, model, batch):
        outputs = super().forward_model(model, batch)
        outputs.extras["image_norm"] = model.encode_image(batch.images).norm(dim=1)          # (B,)
        return outputs

    def forward(self, outputs, batch=None):
        type(self).seen.append({"step": batch.step, "teacher": batch.teacher["colour"].clone(),
                                "extra_tokens": tuple(batch.extra_tokens.shape),
                                "extra_features": outputs.extra_text_features.detach().clone()})
        distil = ((outputs.image_features[:, :4] - batch.teacher["colour"]) ** 2).sum(1).mean()
        hard = (outputs.image_features[:, None] * outputs.extra_text_features).sum(-1).mean()  # (B, K) -> ()
        return {"contrastive": infonce_loss(outputs.image_features, outputs.text_features, outputs.logit_scale),
                "distil": distil, "hard_negative": hard, "norm": 1e-3 * outputs.extras["image_norm"].mean()}


@pytest.fixture
def registered():
    """Register the objectives of this file for one test only, as a loss module would at import."""
    register_loss("two-terms")(TwoTerms)
    register_loss("with-teacher")(WithTeacher)
    WithTeacher.seen = []
    yield
    losses.LOSSES.unregister("two-terms")
    losses.LOSSES.unregister("with-teacher")


def _fit(tmp_path, loss, train_set, **cfg):
    built = init_model(CFG, loss=loss)
    config = TrainConfig(**{"steps": 3, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "ckpt_every": 0,
                            "log_every": 1, "out_dir": str(tmp_path), "loss": loss, "device": "cpu", **cfg})
    trainer = Trainer(built.model, built.tokenizer, built.preprocess, train_set, config, progress=False)
    return trainer.fit()


def test_custom_objective_trains_and_logs_each_named_term(registered, tmp_path):
    last = _fit(tmp_path, "two-terms", Colours())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and last["step"] == 3
    for r in rows:
        assert r["loss"] == pytest.approx(r["loss_contrastive"] + r["loss_align"], rel=1e-6)
        assert r["loss_align"] > 0 and r["loss_contrastive"] > r["loss_align"]
    with open(tmp_path / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["loss_align"]) for r in table] == [r["loss_align"] for r in rows]
    assert [float(r["loss_contrastive"]) for r in table] == [r["loss_contrastive"] for r in rows]


def test_teacher_outputs_and_extra_captions_reach_the_objective(registered, tmp_path):
    data = Colours(extras=True)
    last = _fit(tmp_path, "with-teacher", data, steps=2)
    assert {"loss_contrastive", "loss_distil", "loss_hard_negative", "loss_norm"} <= set(last)
    assert [s["step"] for s in WithTeacher.seen] == [0, 1]
    for seen in WithTeacher.seen:
        idx = global_batch_indices(len(data), 8, 0, seen["step"])
        expected = np.stack([data[int(i)][2]["teacher"]["colour"] for i in idx])           # (B, 4)
        np.testing.assert_array_equal(seen["teacher"].numpy(), expected)
        assert seen["extra_tokens"] == (8, 2, CFG["text_cfg"]["context_length"])
        feats = seen["extra_features"]                                                     # (B, K, D)
        assert feats.shape == (8, 2, CFG["embed_dim"])
        torch.testing.assert_close(feats.norm(dim=-1), torch.ones(8, 2))
        assert not torch.allclose(feats[:, 0], feats[:, 1])  # two different captions per image


def test_declared_needs_are_checked_against_the_data(registered, tmp_path):
    with pytest.raises(DataError, match="'with-teacher' objective needs 'teacher' in every training item"):
        _fit(tmp_path, "with-teacher", Colours(extras=False), steps=1)


def test_every_module_of_the_package_is_imported_and_registers_objectives():
    import pkgutil

    modules = {m.name for m in pkgutil.iter_modules(losses.__path__) if not m.name.startswith("_")} - {"base"}
    registered = {losses.get_loss_class(name) for name in losses.list_losses()}
    assert {"infonce", "sigmoid"} <= modules
    assert modules == {cls.__module__.rsplit(".", 1)[1] for cls in registered}
    assert all(issubclass(cls, Objective) for cls in registered)


class MeanHead(torch.nn.Module):
    """A frozen open_clip image tower and a trainable linear head over its features."""

    def __init__(self, clip):
        super().__init__()
        self.visual = clip.visual.requires_grad_(False)
        self.head = torch.nn.Linear(CFG["embed_dim"], 1)

    def forward(self, images):
        return self.head(self.visual(images)).squeeze(1)                                  # (B,)


class RegressBrightness(Objective):
    """No captions: regress a per-image target carried by the items."""

    needs_captions = False
    needs_targets = True
    seen: list = []

    def forward_model(self, model, batch):
        return model(batch.images)

    def forward(self, outputs, batch=None):
        type(self).seen.append((batch.tokens, tuple(batch.targets["level"].shape)))
        return {"mse": ((outputs - batch.targets["level"]) ** 2).mean()}


class Levels:
    """Colour patches with no captions and their brightness as the target."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        k = i % len(COLOURS)
        return np.full((16, 16, 3), 60 * k, np.uint8), None, {"targets": {"level": np.float32(k / 3)}}


def test_an_objective_instance_trains_a_head_without_captions(tmp_path):
    model = init_model(CFG).model
    head = MeanHead(model)
    frozen = {k: v.clone() for k, v in head.visual.state_dict().items()}
    RegressBrightness.seen = []
    config = TrainConfig(steps=40, batch_size=8, lr=1e-2, warmup_steps=0, weight_decay=0.0,
                         out_dir=str(tmp_path / "run"), ckpt_every=0, log_every=5)
    pp = {"size": [16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    row = Trainer(head, None, None, Levels(), config, objective=RegressBrightness(),
                  preprocess_cfg=pp).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss_mse"] < 0.5 * rows[0]["loss_mse"]                 # the head learned
    assert "logit_scale" not in row                                       # nothing CLIP-only logged
    assert {s for s in RegressBrightness.seen} == {(None, (8,))}          # no tokens, (B,) targets
    for k, v in head.visual.state_dict().items():                         # the frozen tower is untouched
        assert torch.equal(v, frozen[k]), k


def test_an_objective_on_captions_needs_a_tokenizer(tmp_path):
    built = init_model(CFG)
    model, preprocess = built.model, built.preprocess
    config = TrainConfig(steps=1, batch_size=4, out_dir=str(tmp_path / "run"))
    with pytest.raises(Exception, match="pass a tokenizer"):
        Trainer(model, None, preprocess, Colours(), config, objective=TwoTerms()).fit()


def test_missing_targets_are_one_clear_error(tmp_path):
    model = init_model(CFG).model
    config = TrainConfig(steps=1, batch_size=4, out_dir=str(tmp_path / "run"))
    pp = {"size": [16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    with pytest.raises(DataError, match="needs 'targets' in every training item"):
        Trainer(MeanHead(model), None, None, Colours(), config, objective=RegressBrightness(),
                preprocess_cfg=pp).fit()


def test_trainer_state_leaves_frozen_modules_out_and_refuses_a_foreign_state():
    import torch

    from cliplab.train.losses import Objective

    class WithTeacher(Objective):
        frozen_modules = ("teacher",)

        def __init__(self):
            super().__init__()
            self.teacher = torch.nn.Linear(3, 3).requires_grad_(False)
            self.head = torch.nn.Linear(3, 2)

    obj = WithTeacher()
    state = obj.trainer_state()
    assert sorted(state) == ["head.bias", "head.weight"]          # the frozen teacher is not copied
    other = WithTeacher()
    other.load_trainer_state(state)                                # the teacher keeps its own weights
    assert torch.equal(other.head.weight, obj.head.weight)
    assert not torch.equal(other.teacher.weight, obj.teacher.weight)
    with pytest.raises(RuntimeError, match="unexpected"):
        other.load_trainer_state({**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="missing"):
        other.load_trainer_state({"head.weight": state["head.weight"]})
