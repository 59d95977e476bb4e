"""Adaptive worst-case sharpness, layer-wise sharpness and layer-wise LMC on a tiny CLIP."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

CLASSES = ["star", "circle", "square"]
TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tiny models run fastest that way on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    """8 random preprocessed images (N, 3, 32, 32) and labels over the 3 classes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    return x, y


@pytest.fixture(scope="module")
def finetuned(tiny):
    """The tiny model with every tensor moved by 5 % relative noise: a stand-in for θ_1."""
    from cliplab import Backbone

    model = copy.deepcopy(tiny.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * p.abs() * torch.randn(p.shape, generator=g))
    return Backbone(model, model_cfg=tiny.model_cfg, preprocess_cfg=tiny.preprocess_cfg,
                    tokenizer=tiny.tokenizer, name="tiny-ft")


def _sd(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_sd_equal(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _loss(bb, x, y, normalize):
    """Eqs. (1)-(3) written out independently of the module: (loss, logits)."""
    m = bb.model
    tok = bb.tokenize([TEMPLATE.format(c) for c in CLASSES])
    img = m.encode_image(x, normalize=True)                          # (N, D)
    txt = m.encode_text(tok, normalize=True)                         # (C, D)
    z = m.logit_scale.exp() * img @ txt.T                            # (N, C)
    logits = z
    if normalize:
        z = z - z.mean(1, keepdim=True)
        z = z / z.norm(dim=1, keepdim=True)
    return F.cross_entropy(z, torch.as_tensor(y)), logits


# ------------------------------------------------------------------------ sharpness
def test_rho_zero_is_exactly_zero(tiny, data):
    from cliplab.eval.sharpness import layer_sharpness, sharpness

    x, y = data
    assert sharpness(tiny, x, y, CLASSES, rho=0.0, n_iters=3, batch_size=4) == 0.0
    vals = layer_sharpness(tiny, x, y, CLASSES, rho=0.0, n_iters=1, batch_size=8,
                           layers=["visual.conv1", "transformer.resblocks.1"])
    assert vals == {"visual.conv1": 0.0, "transformer.resblocks.1": 0.0}


@pytest.mark.parametrize("normalize", [True, False])
def test_positive_and_more_iterations_never_lower(tiny, data, normalize):
    from cliplab.eval.sharpness import sharpness

    x, y = data
    kw = dict(rho=1e-3, batch_size=4, normalize_logits=normalize)
    s1 = sharpness(tiny, x, y, CLASSES, n_iters=1, **kw)
    s6 = sharpness(tiny, x, y, CLASSES, n_iters=6, **kw)
    assert 0 < s1 <= s6                          # same first iterate, the best loss is kept
    s_rand = sharpness(tiny, x, y, CLASSES, n_iters=3, init="random", seed=3, **kw)
    assert s_rand >= 0 and np.isfinite(s_rand)


@pytest.mark.parametrize("normalize", [True, False])
def test_first_order_closed_form(tiny, data, normalize):
    """One sign step to the box corner: S ≈ ρ Σ_i |w_i| |∂L/∂w_i| for small ρ."""
    from cliplab.eval.sharpness import sharpness

    x, y = data
    rho = 1e-5
    s = sharpness(tiny, x, y, CLASSES, rho=rho, n_iters=1, batch_size=8, normalize_logits=normalize)
    loss, _ = _loss(tiny, x, y, normalize)
    params = list(tiny.model.parameters())
    grads = torch.autograd.grad(loss, params)
    expected = rho * sum(float((p.detach().abs() * g.abs()).sum()) for p, g in zip(params, grads))
    assert expected > 0
    assert s == pytest.approx(expected, rel=0.05)


def test_batches_are_averaged(tiny, data):
    """S is the unweighted mean of the per-batch maxima (m-sharpness)."""
    from cliplab.eval.sharpness import sharpness

    x, y = data
    kw = dict(rho=1e-3, n_iters=3)
    both = sharpness(tiny, x, y, CLASSES, batch_size=4, **kw)
    halves = [sharpness(tiny, x[s], y[s], CLASSES, batch_size=4, **kw) for s in (slice(0, 4), slice(4, 8))]
    assert both == pytest.approx(np.mean(halves), rel=1e-6)


def test_uint8_images_match_preprocessed_tensor(tiny):
    from cliplab.models.transforms import uint8_to_tensor
    from cliplab.eval.sharpness import sharpness

    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    y = [0, 1, 2, 1]
    kw = dict(rho=1e-3, n_iters=2, batch_size=4)
    a = sharpness(tiny, arrays, y, CLASSES, **kw)
    b = sharpness(tiny, uint8_to_tensor(arrays, tiny.preprocess_cfg), y, CLASSES, **kw)
    assert a == b and a > 0


def test_weights_restored_bit_for_bit(tiny, data):
    from cliplab.eval.sharpness import _model_sharpness, sharpness

    x, y = data
    before = _sd(tiny.model)
    flags = {n: p.requires_grad for n, p in tiny.model.named_parameters()}
    sharpness(tiny, x, y, CLASSES, rho=1e-2, n_iters=4, batch_size=4)
    _assert_sd_equal(_sd(tiny.model), before)                         # the input is unchanged
    assert {n: p.requires_grad for n, p in tiny.model.named_parameters()} == flags
    assert not tiny.model.training

    # The in-place core restores the weights it perturbs, and the grad flags, exactly.
    model = copy.deepcopy(tiny.model)
    model.requires_grad_(False)
    names = [n for n, _ in model.named_parameters() if n.startswith("visual.transformer")]
    tok = tiny.tokenize([TEMPLATE.format(c) for c in CLASSES])
    s = _model_sharpness(model, x, torch.as_tensor(y), tok, names, rho=1e-2, n_iters=4,
                         batch_size=4, normalize_logits=True, init="random", seed=0)
    assert s > 0
    _assert_sd_equal(_sd(model), before)
    assert not any(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------ layer sharpness
def test_layer_groups_partition_the_parameters(tiny):
    from cliplab.eval.sharpness import layer_groups

    groups = layer_groups(tiny)
    flat = [n for names in groups.values() for n in names]
    assert sorted(flat) == sorted(n for n, _ in tiny.model.named_parameters())
    assert len(flat) == len(set(flat))
    depth_v = len(tiny.model.visual.transformer.resblocks)
    depth_t = len(tiny.model.transformer.resblocks)
    for i in range(depth_v):
        assert f"visual.transformer.resblocks.{i}" in groups
    for i in range(depth_t):
        assert f"transformer.resblocks.{i}" in groups
    for g in ("visual.conv1", "visual.ln_pre", "visual.proj", "visual.class_embedding",
              "token_embedding", "positional_embedding", "text_projection", "ln_final", "logit_scale"):
        assert g in groups, g
    assert groups["visual.conv1"] == ["visual.conv1.weight"]
    assert len(groups["transformer.resblocks.0"]) == 12


def test_layer_sharpness_is_additive_to_first_order(tiny, data):
    """With one step and small ρ, per-layer values sum to the all-parameter value."""
    from cliplab.eval.sharpness import layer_groups, layer_sharpness, sharpness

    x, y = data
    kw = dict(rho=1e-5, n_iters=1, batch_size=8)
    per_layer = layer_sharpness(tiny, x, y, CLASSES, **kw)
    assert list(per_layer) == list(layer_groups(tiny))
    vals = np.array(list(per_layer.values()))
    assert np.all(np.isfinite(vals)) and np.all(vals >= 0)
    total = sharpness(tiny, x, y, CLASSES, **kw)
    assert vals.sum() == pytest.approx(total, rel=0.05)
    assert vals.max() <= total * 1.05
    # A one-group run is the same computation as that group's entry.
    g = "visual.transformer.resblocks.1"
    assert sharpness(tiny, x, y, CLASSES, layers=[g], **kw) == pytest.approx(per_layer[g], rel=1e-6)
    # Prefixes select whole towers: the image tower is the sum of its groups.
    vis = sharpness(tiny, x, y, CLASSES, layers="visual", **kw)
    assert vis == pytest.approx(sum(v for k, v in per_layer.items() if k.startswith("visual.")), rel=0.05)


def test_layer_sharpness_named_groups(tiny, data):
    from cliplab.eval.sharpness import layer_sharpness

    x, y = data
    out = layer_sharpness(tiny, x, y, CLASSES, rho=1e-3, n_iters=2, batch_size=8,
                          layers={"towers-out": ["visual.proj", "text_projection"],
                                  "conv": ["visual.conv1.weight"]})
    assert list(out) == ["towers-out", "conv"]
    assert all(v > 0 for v in out.values())


# ------------------------------------------------------------------ straggler layers
def test_straggler_endpoints_are_the_two_models(tiny, finetuned, data):
    from cliplab.eval.sharpness import straggler_layers

    x, y = data
    with torch.no_grad():
        l0, z0 = _loss(tiny, x, y, normalize=False)
        l1, z1 = _loss(finetuned, x, y, normalize=False)
    acc0 = float((z0.argmax(1) == torch.as_tensor(y)).float().mean())
    res = straggler_layers(tiny, finetuned, x, y, CLASSES, alphas=[0.5, 0.25], batch_size=4)
    np.testing.assert_array_equal(res["alphas"], [0.0, 0.25, 0.5, 1.0])  # endpoints added, sorted
    full = res["full"]
    assert full["loss"][0] == pytest.approx(float(l0), abs=1e-5)
    assert full["loss"][-1] == pytest.approx(float(l1), abs=1e-5)
    assert full["acc"][0] == pytest.approx(acc0)
    assert float(l0) != pytest.approx(float(l1), abs=1e-4)            # the endpoints really differ
    for g, rec in res["groups"].items():                              # others at the zero-shot endpoint
        assert rec["loss"][0] == pytest.approx(float(l0), abs=1e-5), g
        assert rec["barrier"] >= 0 and rec["params"]
    barriers = [b for _, b in res["ranking"]]
    assert barriers == sorted(barriers, reverse=True)
    assert list(res["groups"]) == [g for g, _ in res["ranking"]]
    # Anchored at the fine-tuned model, α = 1 is the fine-tuned model for every group.
    res_ft = straggler_layers(tiny, finetuned, x, y, CLASSES, alphas=[0, 1], anchor="finetuned",
                              groups=["visual.transformer.resblocks.0", "token_embedding"])
    for rec in res_ft["groups"].values():
        assert rec["loss"][-1] == pytest.approx(float(l1), abs=1e-5)


def test_straggler_group_curve_matches_manual_swap(tiny, finetuned, data):
    """α = 1 for one group equals the zero-shot model with that group's tensors replaced."""
    from cliplab import Backbone
    from cliplab.eval.sharpness import straggler_layers

    x, y = data
    g = "visual.transformer.resblocks.0"
    res = straggler_layers(tiny, finetuned, x, y, CLASSES, alphas=[0, 1], groups=[g])
    model = copy.deepcopy(tiny.model)
    sd, sd1 = model.state_dict(), finetuned.model.state_dict()
    model.load_state_dict({k: sd1[k] if k.startswith(g + ".") else v for k, v in sd.items()})
    swapped = Backbone(model, model_cfg=tiny.model_cfg, preprocess_cfg=tiny.preprocess_cfg,
                       tokenizer=tiny.tokenizer)
    with torch.no_grad():
        ls, _ = _loss(swapped, x, y, normalize=False)
    assert res["groups"][g]["loss"][-1] == pytest.approx(float(ls), abs=1e-5)


def test_identical_backbones_have_zero_barriers(tiny, data):
    from cliplab.eval.sharpness import straggler_layers

    x, y = data
    res = straggler_layers(tiny, tiny, x, y, CLASSES, alphas=np.linspace(0, 1, 5), batch_size=8)
    assert res["full"]["barrier"] == pytest.approx(0, abs=1e-6)
    for g, rec in res["groups"].items():
        assert rec["barrier"] == pytest.approx(0, abs=1e-6), g
        assert rec["acc_barrier"] == pytest.approx(0, abs=1e-9), g
        np.testing.assert_allclose(rec["loss"], res["full"]["loss"][0], atol=1e-6)


# -------------------------------------------------------------------------- errors
def test_errors(tiny, finetuned, data):
    from cliplab.errors import UsageError
    from cliplab.eval.sharpness import layer_sharpness, sharpness, straggler_layers

    x, y = data
    with pytest.raises(UsageError, match="classnames is empty"):
        sharpness(tiny, x, y, [])
    with pytest.raises(UsageError, match="8 images"):
        sharpness(tiny, x, y[:5], CLASSES)
    with pytest.raises(UsageError, match=r"labels must lie in \[0, 3\)"):
        sharpness(tiny, x, y + 1, CLASSES)
    with pytest.raises(UsageError, match="rho"):
        sharpness(tiny, x, y, CLASSES, rho=-1e-3)
    with pytest.raises(UsageError, match="n_iters"):
        sharpness(tiny, x, y, CLASSES, n_iters=0)
    with pytest.raises(UsageError, match="batch_size"):
        sharpness(tiny, x, y, CLASSES, batch_size=0)
    suggests = r"unknown layer 'visual\.resblocks\.0'.*include visual\.transformer\.resblocks\.0"
    with pytest.raises(UsageError, match=suggests):
        sharpness(tiny, x, y, CLASSES, layers=["visual.resblocks.0"])
    with pytest.raises(UsageError, match="unknown layer 'nope'"):
        layer_sharpness(tiny, x, y, CLASSES, layers=["token_embedding", "nope"])
    with pytest.raises(UsageError, match="init"):
        sharpness(tiny, x, y, CLASSES, init="gauss")
    with pytest.raises(UsageError, match="preprocessed"):
        sharpness(tiny, torch.zeros(8, 32, 32), y, CLASSES)
    with pytest.raises(UsageError, match="alphas"):
        straggler_layers(tiny, finetuned, x, y, CLASSES, alphas=[0, 1.5])
    with pytest.raises(UsageError, match="anchor"):
        straggler_layers(tiny, finetuned, x, y, CLASSES, anchor="mid")
    with pytest.raises(UsageError, match="Backbone"):
        sharpness(tiny.model, x, y, CLASSES)
