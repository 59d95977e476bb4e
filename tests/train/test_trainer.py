"""Trainer: schedule, batch order, preprocessing, smoke, exact resume, DDP parity."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.errors import BadImage, DataError, UsageError
from cliplab.train import TrainConfig, Trainer, get_recipe, init_model, latest_checkpoint, list_recipes
from cliplab.data.sources import CaptionTableSet
from cliplab.train.datasets import ConcatSet, ShapesTrainSet, caption_choice, global_batch_indices
from cliplab.train.schedule import warmup_cosine_factor, warmup_cosine_scheduler
from cliplab.models.transforms import images_to_tensor
from cliplab.train.trainer import parameter_groups

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


class TinyColours:
    """Stand-in training set: 16 px colour patches with three phrasings each."""

    def __init__(self, n=64, size=16):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        name = list(COLOURS)[i % len(COLOURS)]
        rng = np.random.default_rng(i)
        image = np.clip(np.array(COLOURS[name]) + rng.normal(0, 12, (self.size, self.size, 3)), 0, 255)
        return image.astype(np.uint8), [f"a {name} square", f"{name}", f"a photo of something {name}"]


def _trainer(out_dir, *, loss="infonce", model_cfg=TINY, seed=0, train_set=None, evaluate=None, **cfg):
    built = init_model(model_cfg, loss=loss, seed=seed)
    defaults = dict(steps=8, batch_size=8, lr=1e-3, warmup_steps=2, ckpt_every=0, log_every=1,
                    out_dir=str(out_dir), loss=loss, device="cpu")
    config = TrainConfig(**{**defaults, **cfg})
    return Trainer(built.model, built.tokenizer, built.preprocess, train_set or TinyColours(), config,
                   evaluate, model_cfg=built.model_cfg, progress=False)


def _rows(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def _weights(ckpt_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(ckpt_dir) / "open_clip_model.safetensors"))


# --------------------------------------------------------------------- pure parts
def test_schedule_warmup_then_cosine():
    f = [warmup_cosine_factor(s, warmup_steps=4, total_steps=12) for s in range(12)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and all(a >= b for a, b in zip(f[4:], f[5:]))
    assert warmup_cosine_factor(12, warmup_steps=4, total_steps=12) == pytest.approx(0.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine_scheduler(opt, warmup_steps=4, total_steps=12)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2 * x for x in f[:6]])


def test_batch_order_is_a_pure_permutation_stream():
    n, b = 10, 4
    steps = [global_batch_indices(n, b, seed=3, step=s) for s in range(5)]  # 20 samples = 2 epochs
    flat = np.concatenate(steps)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    np.testing.assert_array_equal(global_batch_indices(n, b, seed=3, step=2), steps[2])
    assert not np.array_equal(global_batch_indices(n, b, seed=4, step=0), steps[0])


def test_caption_choice_rank_slices_and_uniformity():
    counts = [5] * 8
    whole = caption_choice(counts, seed=1, step=7)
    assert caption_choice(counts[:4], 1, 7, start=0) + caption_choice(counts[4:], 1, 7, start=4) == whole
    hist = np.bincount(np.concatenate([caption_choice([5] * 100, 0, s) for s in range(50)]), minlength=5)
    assert hist.min() > 800 and hist.max() < 1200  # 5000 draws over 5 phrasings


def test_fast_image_path_matches_preprocess():
    built = init_model(TINY)
    from open_clip import get_model_preprocess_cfg

    images = np.stack([TinyColours()[i][0] for i in range(3)])
    fast = images_to_tensor(images, built.preprocess, get_model_preprocess_cfg(built.model))
    slow = images_to_tensor([Image.fromarray(x) for x in images], built.preprocess,
                            get_model_preprocess_cfg(built.model))
    assert fast.shape == (3, 3, 16, 16)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)


def test_no_weight_decay_on_gains_biases_embeddings_temperature():
    model = init_model(TINY, loss="sigmoid").model
    no_decay, decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "logit_bias", "token_embedding.weight", "positional_embedding",
            "visual.class_embedding", "visual.positional_embedding", "ln_final.weight"} <= exempt
    assert "visual.conv1.weight" in {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_datasets_adapters():
    from cliplab.data.shapes import ShapesWorld

    shapes = ShapesTrainSet(ShapesWorld(seed=0, image_size=16, n_objects=1), "train")
    images, caps = shapes.get_batch([3, 1])
    np.testing.assert_array_equal(images[0], shapes[3][0])
    assert caps[1] == shapes[1][1] and len(caps[1]) >= 3
    mixed = ConcatSet(TinyColours(4), shapes)
    images, caps = mixed.get_batch([5, 2])
    np.testing.assert_array_equal(images[0], shapes[1][0])
    assert caps[1] == TinyColours(4)[2][1]

    class Rec:
        def __init__(self, image, captions):
            self.image, self.captions = image, captions

    table = CaptionTableSet([Rec("a.png", ["x", "y"])], loader=lambda p: Image.new("RGB", (8, 8)))
    assert table[0][1] == ["x", "y"] and table[0][0].size == (8, 8)
    with pytest.raises(DataError, match="no caption"):
        CaptionTableSet([Rec("a.png", [])])


def test_config_and_bias_errors(tmp_path):
    with pytest.raises(UsageError, match="precision"):
        TrainConfig(precision="fp8").validate()
    built = init_model(TINY, loss="sigmoid")
    trainer = Trainer(built.model, built.tokenizer, built.preprocess, TinyColours(),
                      TrainConfig(steps=1, batch_size=4, out_dir=str(tmp_path)), progress=False)
    with pytest.raises(UsageError, match="takes no logit_bias"):
        trainer.fit()
    with pytest.raises(UsageError, match="unknown recipe"):
        get_recipe("nope")
    assert "shapes-tiny" in list_recipes()


# --------------------------------------------------------------------- training runs
def test_smoke_loss_falls_and_checkpoint_loads_in_open_clip(tmp_path):
    calls = []
    trainer = _trainer(tmp_path, steps=30, batch_size=16, lr=2e-3, warmup_steps=3, ckpt_every=15,
                       eval_every=10, evaluate=lambda m: calls.append(m.training) or {"dummy": 1.0})
    last = trainer.fit()
    losses = [r["loss"] for r in _rows(tmp_path)]
    assert len(losses) == 30 and last["step"] == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    assert calls == [False, False, False]  # steps 10, 20, 30, in eval mode
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"step", "loss", "loss_contrastive", "lr", "logit_scale", "samples_per_s", "eval_dummy"} <= set(header)

    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step_0000030" and (tmp_path / "checkpoints" / "step_0000015").is_dir()
    assert sorted(p.name for p in ckpt.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors",
                                                     "trainer_state.pt"]
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["step"] == 30
    import open_clip

    loaded = open_clip.create_model(f"local-dir:{ckpt}")
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, trainer.model.state_dict()[k], atol=0, rtol=0)
    assert trainer.model.logit_scale.item() <= np.log(100) + 1e-6


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_is_bit_exact(tmp_path, num_workers):
    """Also with a data-loading process: the DataLoader draws nothing from torch's RNG."""
    cfg = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "patch_dropout": 0.25}}  # uses torch's RNG
    _trainer(tmp_path / "a", model_cfg=cfg, ckpt_every=4).fit()
    _trainer(tmp_path / "b", model_cfg=cfg, ckpt_every=4, num_workers=num_workers).fit(stop_at=5)
    assert latest_checkpoint(tmp_path / "b").name == "step_0000005"
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step_0000004\n")  # as if killed at step 5
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')                                          # ... while writing a row
    _trainer(tmp_path / "b", model_cfg=cfg, ckpt_every=4, seed=123,
             num_workers=num_workers).fit(resume=True)  # other init: overwritten

    wa, wb = _weights(tmp_path / "a/checkpoints/step_0000008"), _weights(tmp_path / "b/checkpoints/step_0000008")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ra, rb = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["step"] for r in rb] == list(range(1, 9))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


def test_bad_images_are_replaced_and_counted(tmp_path):
    class Broken(TinyColours):
        def __getitem__(self, i):
            if i % 16 == 3:
                raise BadImage(f"img{i}.png", "truncated")
            return super().__getitem__(i)

    last = _trainer(tmp_path, steps=2, batch_size=32, train_set=Broken()).fit()
    assert last["bad_images"] == 4  # 2 steps x 32 = one pass over 64 items, 4 broken


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_main(out_dir):
    """Entry point of the DDP parity run (also run as a single process)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    for loss in ("infonce", "sigmoid"):
        _trainer(Path(out_dir) / loss, loss=loss, steps=3, batch_size=8, warmup_steps=1).fit()
    if dist.is_initialized():
        dist.destroy_process_group()


def test_ddp_two_ranks_match_one_process(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('trainer_tests', {str(Path(__file__))!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "mod._ddp_main(sys.argv[1])\n")
    env = {**os.environ, "CLIPLAB_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=env, check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                    str(script), str(tmp_path / "two")], env=env, check=True, timeout=180)
    for loss in ("infonce", "sigmoid"):
        one, two = _rows(tmp_path / "one" / loss), _rows(tmp_path / "two" / loss)
        np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], atol=1e-5, rtol=0)
        w1 = _weights(tmp_path / "one" / loss / "checkpoints/step_0000003")
        w2 = _weights(tmp_path / "two" / loss / "checkpoints/step_0000003")
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0)
