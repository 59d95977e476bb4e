"""Reinforced shards (MobileCLIP): bit-exact replay, resumable writing, training without a teacher."""

import json

import numpy as np
import pytest
import torch

from cliplab.cli.main import main
from cliplab.data.shapes import ShapesWorld, export
from cliplab.data.sources import index_webdataset
from cliplab.errors import DataError, UsageError
from cliplab.models.transforms import images_to_tensor
from cliplab.train import TrainConfig, Trainer, init_model
from cliplab.train.datasets import ShapesTrainSet
from cliplab.train.reinforce import ReinforcedSet, apply_augmentation, reinforce, sample_augmentation

from _tiny import TINY_CFG

N, K = 12, 3


@pytest.fixture(scope="module")
def source():
    return ShapesTrainSet(ShapesWorld(seed=0, image_size=48, split_sizes={"train": N}), "train")


@pytest.fixture(scope="module")
def shards(source, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("reinforced") / "rs"
    reinforce(source, [tiny, tiny], out, augmentations=K, flip=0.5, shard_size=5, progress=False)
    return out


def test_replaying_a_stored_augmentation_reproduces_the_exact_tensor(source, shards, tiny):
    rs = ReinforcedSet(shards)
    assert (len(rs), rs.size, rs.augmentations, rs.n_teachers) == (N, tiny.image_size, K, 2)
    pp = {"size": [rs.size] * 2, "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    for step, i in ((0, 0), (7, 4), (11, 9)):
        view, captions, extras = rs.at_step(step)[i]
        a, s = rs.choice(i, step)
        image = source[i][0]
        params = sample_augmentation(np.random.default_rng([0, i, a]), *image.shape[:2], flip=0.5)
        assert params == rs.params[i][a]                                     # stored = drawn
        fresh = apply_augmentation(image, params, rs.size)
        assert view.dtype == np.uint8 and np.array_equal(view, fresh)        # bit-exact replay
        assert torch.equal(images_to_tensor([view], None, pp), images_to_tensor([fresh], None, pp))
        emb = tiny.encode_images(view[None]).features[0]                     # what the teacher saw
        np.testing.assert_allclose(extras["teacher"]["image_0"], emb, atol=1e-5)
        np.testing.assert_array_equal(extras["teacher"]["image_0"], extras["teacher"]["image_1"])
        assert captions == [source[i][1][0]]
        assert extras["extra_captions"] == [source[i][1][1 + s]]             # the other rewrites: synthetic
        np.testing.assert_allclose(extras["teacher"]["syn_text_0"], tiny.encode_texts(extras["extra_captions"])[0],
                                   atol=1e-5)
    choices = {rs.choice(3, t)[0] for t in range(30)}
    assert choices == set(range(K))                                          # steps visit every augmentation
    assert rs.choice(3, 5) == ReinforcedSet(shards).choice(3, 5)             # a pure function of (seed, step, i)


def test_shards_are_plain_webdataset(shards):
    samples = index_webdataset(sorted(shards.glob("shard-*.tar")))
    assert len(samples) == N and all(len(s.captions) == 1 for s in samples)


def test_interrupted_run_redoes_only_missing_shards(source, shards, tiny, tmp_path):
    out = tmp_path / "rs"
    reinforce(source, [tiny, tiny], out, augmentations=K, flip=0.5, shard_size=5, progress=False)
    (out / "shard-00001.tar").unlink()                                       # killed while writing shard 1
    (out / "shard-00001.done").unlink()
    (out / ".shard-00001.tar.tmp-123").write_bytes(b"partial")
    res = reinforce(source, [tiny, tiny], out, augmentations=K, flip=0.5, shard_size=5, progress=False)
    assert (res.n_shards, res.n_resumed) == (3, 2)
    assert not list(out.glob(".shard-*"))
    for name in ("shard-00000.tar", "shard-00001.tar", "shard-00002.tar"):
        assert (out / name).read_bytes() == (shards / name).read_bytes()
    with pytest.raises(UsageError, match="augmentations"):
        reinforce(source, [tiny, tiny], out, augmentations=2, flip=0.5, shard_size=5, progress=False)
    (out / "shard-00002.done").unlink()
    with pytest.raises(DataError, match="not finished"):
        ReinforcedSet(out)


def test_trainer_trains_a_student_on_reinforced_shards_without_a_teacher(shards, tmp_path):
    built = init_model(TINY_CFG, loss="mobileclip-dr")
    before = {k: v.clone() for k, v in built.model.state_dict().items()}
    row = Trainer(built.model, built.tokenizer, built.preprocess, ReinforcedSet(shards),
                  TrainConfig(steps=2, batch_size=4, warmup_steps=0, loss="mobileclip-dr", ckpt_every=0,
                              log_every=1, out_dir=str(tmp_path / "run")), progress=False).fit()
    assert {"loss_contrastive", "loss_distill"} <= set(row) and np.isfinite(row["loss"])
    assert any(not torch.equal(before[k], v) for k, v in built.model.state_dict().items())


def test_cli_reinforce_then_train(tiny_dir, tmp_path, capsys):
    export(ShapesWorld(seed=1, image_size=32), tmp_path / "src", n=6, task="captions", fmt="wds", progress=False)
    cfg = tmp_path / "student.json"
    cfg.write_text(json.dumps(TINY_CFG))
    assert main(["reinforce", str(tmp_path / "src"), "--teacher", f"{tiny_dir},{tiny_dir}", "--out",
                 str(tmp_path / "rs"), "--augmentations", "2"]) == 0
    assert main(["train", "--data", str(tmp_path / "rs"), "--loss", "mobileclip-dr", "--model-config", str(cfg),
                 "--steps", "1", "--batch-size", "3", "--out", str(tmp_path / "run"), "--warmup-steps", "0"]) == 0
    assert "loss_distill" in capsys.readouterr().out
    assert main(["reinforce", str(tmp_path / "src"), "--teacher", str(tiny_dir), "--out", str(tmp_path / "rs"),
                 "--augmentations", "2"]) == 2                                # other teachers: refused
