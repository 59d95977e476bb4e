"""DCLIP and DC-CLIP objectives: closed forms, a student equal to its teacher, a frozen teacher, bilingual data."""

import copy

import numpy as np
import pytest
import torch

from cliplab.data.shapes import ShapesWorld
from cliplab.train import TrainConfig, Trainer, init_model
from cliplab.train.datasets import ShapesTrainSet
from cliplab.train.distill import DCCLIPStage1, DCLIPObjective, cosine_distance, feature_smooth_l1, similarity_kd
from cliplab.train.losses import Batch, ModelOutputs
from cliplab.train.recipes import ShapesZeroShot

from _tiny import TINY_CFG


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def test_terms_equal_closed_forms():
    x, y, u, v = (_unit(5, 8, seed=k) for k in range(4))
    cos = lambda a, b: (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine_distance(x, u).item() == pytest.approx(np.mean(1 - cos(x.numpy(), u.numpy())), abs=1e-12)
    d = (x - u).numpy()
    huber = np.where(np.abs(d) < 1, 0.5 * d ** 2, np.abs(d) - 0.5).sum(1).mean()
    assert feature_smooth_l1(x, u).item() == pytest.approx(huber, abs=1e-12)
    big = 3 * x
    d = (big - u).numpy()
    assert feature_smooth_l1(big, u).item() == pytest.approx(
        np.where(np.abs(d) < 1, 0.5 * d ** 2, np.abs(d) - 0.5).sum(1).mean(), abs=1e-12)
    zs, zt = 5.0 * (x @ y.T).numpy() / 2, 9.0 * (u @ v.T).numpy() / 2
    kl = lambda t, s: (np.exp(_log_softmax(t)) * (_log_softmax(t) - _log_softmax(s))).sum(1).mean()
    want = (kl(zt, zs) + kl(zt.T, zs.T)) / 2
    assert similarity_kd(x, y, 5.0, u, v, 9.0, temperature=2.0).item() == pytest.approx(want, abs=1e-12)
    assert similarity_kd(x, y, 5.0, x, y, 5.0).item() == pytest.approx(0.0, abs=1e-12)


@pytest.fixture()
def teacher(tiny):
    return copy.deepcopy(tiny)


def _batch(model, n=4, seed=0):
    from open_clip import tokenize

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    texts = ["a red circle", "a blue square", "a green star on the left", "two shapes"][:n]
    tokens = tokenize(texts, context_length=model.context_length)
    return Batch(images=images, tokens=tokens, extra_tokens=tokens[:, None])


def test_a_student_equal_to_its_teacher_has_zero_distillation_terms(teacher):
    student = copy.deepcopy(teacher.model)
    for obj, keys in ((DCLIPObjective(teacher), ("feature", "kd")), (DCCLIPStage1(teacher), ("image", "text"))):
        batch = _batch(student)
        terms = obj(obj.forward_model(student, batch), batch)
        for k in keys:
            assert abs(terms[k].item()) < 1e-6, (k, terms[k])
        if "kd" in keys:
            assert terms["contrastive"].item() > 0                      # InfoNCE itself is not 0


def test_teacher_stays_frozen_and_bit_identical_while_the_student_trains(teacher, tmp_path):
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    world = ShapesWorld(seed=0, image_size=32, split_sizes={"train": 16})
    for name, obj, data in (("dclip", DCLIPObjective(teacher), ShapesTrainSet(world)),
                            ("dcclip", DCCLIPStage1(teacher), ShapesTrainSet(world, languages=("zh",), parallel=True))):
        built = init_model({**TINY_CFG, "text_cfg": {**TINY_CFG["text_cfg"], "context_length": 77}}, seed=1)
        student_before = {k: v.clone() for k, v in built.model.state_dict().items()}
        row = Trainer(built.model, built.tokenizer, built.preprocess, data,
                      TrainConfig(steps=2, batch_size=4, warmup_steps=0, ckpt_every=0, log_every=1,
                                  out_dir=str(tmp_path / name)), objective=obj, progress=False).fit()
        assert np.isfinite(row["loss"]) and all(f"loss_{k}" in row for k in obj(*_fake(built.model, obj)))
        assert all(not p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
        for k, v in teacher.model.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert any(not torch.equal(student_before[k], v) for k, v in built.model.state_dict().items())


def _fake(model, obj):
    from open_clip import tokenize

    tokens = tokenize(["a red circle", "红色圆形"], context_length=model.context_length)
    b = Batch(images=torch.zeros(2, 3, 32, 32), tokens=tokens, extra_tokens=tokens[:, None])
    return obj.forward_model(model, b), b


def test_teacher_reads_longer_student_tokens_and_other_preprocessing(teacher):
    from open_clip import tokenize

    obj = DCLIPObjective(teacher, preprocess_cfg={**teacher.preprocess_cfg, "size": [48, 48], "mean": [0.5] * 3,
                                                  "std": [0.5] * 3})
    long = tokenize(["红色圆形在蓝色方形的左边，还有一个绿色星形"], context_length=77)   # 30+ tokens
    want = teacher.model.encode_text(tokenize(["红色圆形在蓝色方形的左边，还有一个绿色星形"],
                                              context_length=teacher.context_length), normalize=True)
    torch.testing.assert_close(obj.teacher_texts(long), want)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    from PIL import Image

    big = np.stack([np.asarray(Image.fromarray(p).resize((48, 48), Image.Resampling.BICUBIC)) for p in pixels])
    x = torch.from_numpy(big).permute(0, 3, 1, 2).float() / 255
    got = obj.teacher_images((x - 0.5) / 0.5)                            # the student's normalisation, 48 px
    ref = torch.from_numpy(teacher.encode_images(pixels).features)
    assert torch.nn.functional.cosine_similarity(got, ref).min() > 0.97  # resized back to the teacher's 32 px


def test_projector_maps_a_narrower_student_and_is_trained(teacher):
    obj = DCLIPObjective(teacher, student_dim=16)
    assert obj.proj_image.weight.shape == (teacher.embed_dim, 16)
    student = init_model({**TINY_CFG, "embed_dim": 16}).model
    groups = obj.parameter_groups(student, 0.1)
    assert any(p is obj.proj_image.weight for g in groups for p in g["params"])


def test_bilingual_items_and_chinese_zero_shot(tiny):
    world = ShapesWorld(seed=0, image_size=32, split_sizes={"train": 4})
    scene = world.scene("train", 1)
    _, caps = ShapesTrainSet(world, languages=("en", "zh"))[1]
    assert caps == list(scene.captions) + scene.captions_zh
    _, caps, extras = ShapesTrainSet(world, languages=("zh",), parallel=True)[1]
    assert caps == scene.captions_zh and extras == {"extra_captions": [scene.captions[0]]}
    with pytest.raises(ValueError, match="languages"):
        ShapesTrainSet(world, languages=("fr",))
    from open_clip import SimpleTokenizer

    zh = ShapesZeroShot(world, "val", n=16, language="zh", tokenizer=SimpleTokenizer(context_length=24))(tiny.model)
    assert 0.0 <= zh["acc"] <= 1.0 and {"acc_color", "acc_shape"} <= set(zh)
