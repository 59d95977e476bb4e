"""CLIPScore / RefCLIPScore formulas, CLIP4DM word attribution, F-CLIPScore and ``cliplab score``.

The formulas were also run against jmhessel/clipscore (``get_clip_score``,
``get_refonlyclipscore``, unmodified) on the same shapes-tiny features: see
docs/anomaly_detection.md.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import cliplab
from cliplab.cli.main import main
from cliplab.data.shapes import ShapesWorld
from cliplab.dense.misalignment import (PREFIX, _text_with_attention, clip_score, f_clip_score, flag_words,
                                        ref_clip_score, word_attributions)
from cliplab.errors import DataError


def test_clip_score_formula():
    v = np.array([[3.0, 4.0], [1.0, 0.0], [1.0, 0.0]])
    c = np.array([[4.0, 3.0], [-1.0, 0.1], [0.5, 0.5]])      # cos .96, negative, 1/sqrt(2)
    np.testing.assert_allclose(clip_score(v, c), [2.5 * 0.96, 0.0, 2.5 / np.sqrt(2)])
    np.testing.assert_allclose(clip_score(v, c, w=1.0), [0.96, 0.0, 1 / np.sqrt(2)])


def test_ref_clip_score_formula():
    v, c = np.array([[3.0, 4.0], [3.0, 4.0]]), np.array([[4.0, 3.0], [4.0, 3.0]])   # CLIP-S 2.4
    refs = [np.array([[0.0, 1.0], [1.0, 0.0]]),            # cos .6 and .8: the best is .8
            np.array([[-4.0, -3.0]])]                       # cos -1: clipped to 0
    np.testing.assert_allclose(ref_clip_score(v, c, refs), [2 * 2.4 * 0.8 / (2.4 + 0.8), 0.0])


def test_f_clip_score_and_flags():
    np.testing.assert_allclose(f_clip_score([-0.2, 0.0], [1.25, 2.0]), [-0.1, 0.0])
    scores = np.array([0.3, -1e-4, np.nan, -2e-4, -1e-6])
    assert flag_words(scores) == [3]
    assert flag_words(scores, mode="threshold") == [1, 3]
    assert flag_words(np.array([0.1, 0.2])) == []          # nothing negative: nothing flagged


@pytest.fixture(scope="module")
def shapes_tiny():
    return cliplab.load("shapes-tiny")


def test_attention_forward_equals_the_text_encoder(tiny, shapes_tiny):
    for bb in (tiny, shapes_tiny):
        texts = [PREFIX + "a red star", PREFIX + "two blue squares on a striped background"]
        with torch.no_grad():
            feats, probs = _text_with_attention(bb.model, bb.tokenize(texts), 2)
        np.testing.assert_allclose(torch.nn.functional.normalize(feats, dim=-1).numpy(), bb.encode_texts(texts),
                                   atol=1e-5)
        assert len(probs) == 2 and torch.allclose(probs[0].sum(-1), torch.ones(()))


def test_word_attribution_is_gradient_times_attention(tiny):
    """r_i = mean over heads of dcos/dA[EOT, i] * A[EOT, i]; the gradient checked by a finite difference."""
    import copy

    img = np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)
    (a,) = word_attributions(tiny, img, ["a red star, twice"], n_layers=1)
    assert a.words == ["a", "red", "star,", "twice"] and len(a.token_scores) == 3 + 5
    assert np.isfinite(a.scores).all()
    model = copy.deepcopy(tiny.model).double()           # float64, so the finite difference is exact enough
    tokens = tiny.tokenize([PREFIX + a.caption])
    eot, key, heads = int(tokens.argmax()), 4, model.transformer.resblocks[-1].attn.num_heads
    target = torch.nn.functional.normalize(torch.from_numpy(img).double(), dim=-1)

    def cos(h: float) -> float:
        orig = torch.softmax

        def softmax(x, dim):                             # scale A[:, :, EOT, key] of the last layer by 1 + h
            p = orig(x, dim=dim)
            if p.dim() == 4:
                p = p.clone()
                p[:, :, eot, key] *= 1 + h
            return p

        torch.softmax = softmax
        try:
            with torch.no_grad():
                f, _ = _text_with_attention(model, tokens, 1)
        finally:
            torch.softmax = orig
        return float((torch.nn.functional.normalize(f, dim=-1) * target).sum())

    h = 1e-4
    fd = (cos(h) - cos(-h)) / (2 * h)                    # = sum_heads dcos/dA * A at (EOT, key)
    assert heads * a.token_scores[key - 1] == pytest.approx(fd, rel=2e-3)
    f, probs = _text_with_attention(model, tokens, 1)
    (torch.nn.functional.normalize(f, dim=-1) * target).sum().backward()
    exact = float((probs[0].grad * probs[0].detach())[0, :, eot, key].sum())
    assert exact == pytest.approx(fd, rel=1e-6)
    assert heads * a.token_scores[key - 1] == pytest.approx(exact, rel=1e-3)    # float32 vs float64


def test_too_long_caption_is_a_data_error(tiny):
    with pytest.raises(DataError, match="too long"):
        word_attributions(tiny, np.ones((1, 32)), ["word " * 40])


def test_the_wrong_colour_word_is_found_on_shapes_tiny(shapes_tiny):
    world = ShapesWorld(seed=11, n_objects=2)
    scenes = [world.scene("test", i) for i in range(12)]
    feats = shapes_tiny.encode_images([s.image for s in scenes], progress=False).features
    captions, wrong = [], []
    for s in scenes:
        o = s.objects[0]
        new = "red" if o.color != "red" and ("red", o.shape) not in {(x.color, x.shape) for x in s.objects} else "white"
        captions.append(f"a {o.size} {new} {o.shape} and a {s.objects[1].color} {s.objects[1].shape}")
        wrong.append(2)
    attributions = word_attributions(shapes_tiny, feats, captions)
    hits = sum(a.flagged() == [j] for a, j in zip(attributions, wrong))
    assert hits >= 6                # chance: 1 in 9 words


@pytest.fixture(scope="module")
def caption_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("captioned")
    world = ShapesWorld(seed=5, n_objects=2)
    rows = ["filepath,caption"]
    for i in range(2):
        s = world.scene("test", i)
        Image.fromarray(s.image).save(d / f"img{i}.png")
        rows += [f'img{i}.png,"{s.captions[0]}"', f"img{i}.png,a {s.objects[0].shape}"]
    (d / "caps.csv").write_text("\n".join(rows) + "\n")
    (d / "nocaption.csv").write_text("filepath,label\nimg0.png,x\n")
    (d / "empty.csv").write_text("")
    (d / "refs.csv").write_text("filepath,caption\nimg0.png,a shape\n")
    return d


def test_score_cli_json(caption_folder, capsys):
    d = caption_folder
    assert main(["score", str(d), "--captions", str(d / "caps.csv"), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and {"clip_score", "f_clip_score", "misaligned", "word_scores"} <= set(rows[0])
    assert all(0 <= r["clip_score"] <= 2.5 and r["f_clip_score"] <= 0 for r in rows)


@pytest.mark.parametrize("argv, code, msg", [
    (["--captions", "{d}/nocaption.csv"], 4, "no column 'caption'"),
    (["--captions", "{d}/empty.csv"], 4, "empty file"),
    (["--captions", "{d}/missing.csv"], 4, "no such file"),
    (["--captions", "{d}/caps.csv", "--references", "{d}/refs.csv"], 4, "no reference captions"),
    (["--captions", "{d}/caps.csv", "--images", "{d}/nowhere"], 2, "no such folder"),
])
def test_score_cli_bad_input_is_one_line(caption_folder, capsys, argv, code, msg):
    argv = [a.format(d=caption_folder) for a in argv]
    images = argv.pop(argv.index("--images") + 1) if "--images" in argv else str(caption_folder)
    argv = [a for a in argv if a != "--images"]
    rc = main(["score", images, *argv])
    err = capsys.readouterr().err
    assert rc == code and msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
