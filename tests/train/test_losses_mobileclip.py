"""MobileCLIP's reinforced-data loss: closed form, the authors' numbers, a teacher equal to the student."""

import numpy as np
import pytest
import torch

from cliplab.train.losses import Batch, ModelOutputs, get_loss
from cliplab.train.losses.infonce import infonce_loss
from cliplab.train.losses.mobileclip import dr_clip_terms, ensemble_targets


def _parity_inputs():
    """The features the reference was run on (see test_matches_the_authors_drcliploss)."""
    g = torch.Generator().manual_seed(0)

    def n(*s):
        return torch.nn.functional.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)

    dims = [16, 24]
    img, txt, syn = n(6, 32), n(6, 32), n(6, 32)
    t_img, t_txt, t_syn = [n(6, d) for d in dims], [n(6, d) for d in dims], [n(6, d) for d in dims]
    teacher = {**{f"image_{m}": t for m, t in enumerate(t_img)}, **{f"text_{m}": t for m, t in enumerate(t_txt)},
               **{f"syn_text_{m}": t for m, t in enumerate(t_syn)}}
    return img, txt, syn, teacher, torch.tensor(14.0, dtype=torch.float64)


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _closed_form(img, txt, t_img, t_txt, t, s):
    """Eqs. (C) and (D) in NumPy: InfoNCE and the soft cross-entropy to the averaged teacher softmax."""
    z = t * img @ txt.T
    logp_i, logp_t = np.log(_softmax(z)), np.log(_softmax(z.T))
    clip = -(np.trace(logp_i) + np.trace(logp_t)) / (2 * len(z))
    p_i = np.mean([_softmax(s * a @ b.T) for a, b in zip(t_img, t_txt)], axis=0)
    p_t = np.mean([_softmax(s * b @ a.T) for a, b in zip(t_img, t_txt)], axis=0)
    distill = (-(p_i * logp_i).sum(1).mean() - (p_t * logp_t).sum(1).mean()) / 2
    return clip, distill


def test_terms_equal_the_closed_form():
    img, txt, syn, teacher, t = _parity_inputs()
    t_img = [teacher["image_0"].numpy(), teacher["image_1"].numpy()]
    t_txt = [teacher["text_0"].numpy(), teacher["text_1"].numpy()]
    clip, distill = dr_clip_terms(img, txt, t, [torch.from_numpy(a) for a in t_img],
                                  [torch.from_numpy(a) for a in t_txt], [100.0, 100.0])
    want = _closed_form(img.numpy(), txt.numpy(), t_img, t_txt, 14.0, 100.0)
    assert clip.item() == pytest.approx(want[0], abs=1e-12)
    assert distill.item() == pytest.approx(want[1], abs=1e-12)
    torch.testing.assert_close(clip, infonce_loss(img, txt, t), atol=1e-12, rtol=0)


def test_loss_sums_real_and_synthetic_batches_with_lambda():
    img, txt, syn, teacher, t = _parity_inputs()
    out = get_loss("mobileclip-dr", distill_weight=0.25)(ModelOutputs(img, txt, t, extra_text_features=syn[:, None]),
                                                          Batch(images=None, teacher=teacher))
    ti, tt, ts = [teacher[f"image_{m}"] for m in (0, 1)], [teacher[f"text_{m}"] for m in (0, 1)], \
        [teacher[f"syn_text_{m}"] for m in (0, 1)]
    c1, d1 = dr_clip_terms(img, txt, t, ti, tt, [100.0] * 2)
    c2, d2 = dr_clip_terms(img, syn, t, ti, ts, [100.0] * 2)
    assert out["contrastive"].item() == pytest.approx(0.75 * (c1 + c2).item(), abs=1e-12)
    assert out["distill"].item() == pytest.approx(0.25 * (d1 + d2).item(), abs=1e-12)


def test_matches_the_authors_drcliploss():
    """Expected numbers from apple/ml-mobileclip ``DRClipLoss`` (open_clip 3.3.0 ``loss.py`` with
    ``training/open_clip_v2.patch`` applied, unmodified), run on these float64 features with
    ``teacher_dimension=[16, 24], distill_loss_weights=[0.25, 0.75], average_after_softmax=True,
    dist_logit_scale=[100, 100]``; cliplab differed by at most 8.9e-16."""
    img, txt, syn, teacher, t = _parity_inputs()
    out = get_loss("mobileclip-dr", distill_weight=0.75)(ModelOutputs(img, txt, t, extra_text_features=syn[:, None]),
                                                          Batch(images=None, teacher=teacher))
    assert out["contrastive"].item() == pytest.approx(1.5348178926042113, abs=1e-12)
    assert out["distill"].item() == pytest.approx(4.57816028934301, abs=1e-12)


def test_a_teacher_equal_to_the_student_leaves_only_its_entropy():
    img, txt, _, _, _ = _parity_inputs()
    t = 7.0
    clip, distill = dr_clip_terms(img, txt, t, [img], [txt], [t])
    p_i, p_t = ensemble_targets([img], [txt], [t]), ensemble_targets([txt], [img], [t])
    entropy = (-(p_i * p_i.log()).sum(1).mean() - (p_t * p_t.log()).sum(1).mean()) / 2
    assert (distill - entropy).abs().item() < 1e-12                       # KL(P || softmax S) = 0
    assert (ensemble_targets([img, img], [txt, txt], [t, t]) - p_i).abs().max().item() < 1e-15


def test_errors():
    img, txt, syn, teacher, t = _parity_inputs()
    loss = get_loss("mobileclip-dr")
    with pytest.raises(ValueError, match="teacher"):
        loss(ModelOutputs(img, txt, t), Batch(images=None))
    with pytest.raises(ValueError, match="lambda"):
        get_loss("mobileclip-dr", distill_weight=1.5)
    with pytest.raises(ValueError, match="2 teachers"):
        get_loss("mobileclip-dr", teacher_scale=[100.0])(ModelOutputs(img, txt, t), Batch(images=None, teacher=teacher))


def test_mix_variant_uses_one_caption_batch_with_the_chosen_captions_teachers():
    img, txt, syn, teacher, t = _parity_inputs()
    mask = torch.tensor([True, False, True, True, False, False])
    out = ModelOutputs(img, txt, t, extra_text_features=syn[:, None], extras={"synthetic": mask})
    got = get_loss("mobileclip-dr-mix", distill_weight=0.5)(out, Batch(images=None, teacher=teacher))
    ti = [teacher[f"image_{m}"] for m in (0, 1)]
    tt = [torch.where(mask[:, None], teacher[f"syn_text_{m}"], teacher[f"text_{m}"]) for m in (0, 1)]
    c, d = dr_clip_terms(img, txt, t, ti, tt, [100.0] * 2)
    assert got["contrastive"].item() == pytest.approx(0.5 * c.item(), abs=1e-12)
    assert got["distill"].item() == pytest.approx(0.5 * d.item(), abs=1e-12)


def test_mix_variant_picks_captions_from_the_step():
    from _tiny import make_model

    model = make_model()
    tokens = torch.randint(1, 400, (64, 24))
    extra = torch.randint(1, 400, (64, 1, 24))
    loss = get_loss("mobileclip-dr-mix", synthetic_ratio=0.5)
    masks = [loss.forward_model(model, Batch(images=torch.zeros(64, 3, 32, 32), tokens=tokens, extra_tokens=extra,
                                             step=s)).extras["synthetic"] for s in (0, 0, 1)]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert 10 < int(masks[0].sum()) < 54
