"""Spec §9 invariants on a tiny random-weight open_clip ViT (fp32, CPU)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from must_core.errors import InvalidConfigError
from must_core.ml.ema import EmaUpdater, ema_decay, make_teacher
from must_core.ml.losses import (
    LossWeights,
    align_loss,
    fairness_batch,
    fairness_moving_average,
    mim_loss,
    self_training_loss,
    total_loss,
)
from must_core.ml.masking import MaskGenerator
from must_core.ml.model import (
    MaskedOutput,
    MustModel,
    build_classifier_weights,
    build_must_model,
    build_visual_from_cfg,
    load_base_model,
)
from must_core.ml.optim import cosine_lr, layer_id, param_groups, scaled_lrs

CLASSES = ["cat", "dog", "red car"]


@pytest.fixture
def base(tiny_spec):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return load_base_model(tiny_spec)


@pytest.fixture
def model(base):  # type: ignore[no-untyped-def]
    return build_must_model(base, CLASSES, ["a photo of a {}.", "art of the {}."]).eval()


def _x(b: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g)


def _mask(b: int, g: int, cells: list[tuple[int, int]]) -> torch.Tensor:
    m = torch.zeros(b, g, g, dtype=torch.long)
    for r, c in cells:
        m[:, r, c] = 1
    return m


# 1. classifier init -------------------------------------------------------------------------
def test_classifier_columns_unit_norm_and_single_template(base) -> None:  # type: ignore[no-untyped-def]
    w = build_classifier_weights(base, CLASSES, ["a photo of a {}."])
    assert w.shape == (64, 3)
    assert torch.allclose(w.norm(dim=0), torch.ones(3), atol=1e-5)
    tok = base.tokenizer(["a photo of a dog."])
    ref = F.normalize(base.clip.encode_text(tok).float(), dim=-1)[0]
    assert torch.allclose(w[:, 1], ref, atol=1e-6)


def test_two_templates_average_of_normalised(base) -> None:  # type: ignore[no-untyped-def]
    w = build_classifier_weights(base, CLASSES, ["a photo of a {}.", "art of the {}."])
    with torch.no_grad():
        a = F.normalize(
            base.clip.encode_text(base.tokenizer(["a photo of a cat."])).float(), dim=-1
        )
        b = F.normalize(base.clip.encode_text(base.tokenizer(["art of the cat."])).float(), dim=-1)
    assert torch.allclose(w[:, 0], F.normalize(a + b, dim=-1)[0], atol=1e-6)


# 2. zero-shot equivalence --------------------------------------------------------------------
def test_unmasked_logits_equal_zero_shot_clip(base, model) -> None:  # type: ignore[no-untyped-def]
    x = _x()
    with torch.no_grad():
        ref = 100.0 * F.normalize(base.clip.encode_image(x), dim=-1) @ model.classifier
        out = model(x)
        z_vis = F.normalize(model.visual(x), dim=-1)
        z = model.features(x)
    assert isinstance(out, torch.Tensor)
    assert torch.allclose(out, ref, atol=1e-4)
    assert torch.allclose(z, z_vis, atol=1e-6)
    assert out.abs().max() <= 100.0 + 1e-4


# 3. teacher == student at init ---------------------------------------------------------------
def test_teacher_equals_student_at_init(model) -> None:  # type: ignore[no-untyped-def]
    teacher = make_teacher(model)
    for (k, s), (_, t) in zip(
        model.state_dict().items(), teacher.state_dict().items(), strict=True
    ):
        assert torch.equal(s, t), k
    assert all(not p.requires_grad for p in teacher.parameters())
    x = _x()
    with torch.no_grad():
        assert torch.equal(teacher(x), model(x))


# 4. empty mask == no mask --------------------------------------------------------------------
def test_empty_mask_equals_unmasked(model) -> None:  # type: ignore[no-untyped-def]
    x = _x()
    with torch.no_grad():
        out = model(x, torch.zeros(2, 4, 4, dtype=torch.long))
        plain = model(x)
    assert isinstance(out, MaskedOutput)
    assert torch.equal(out.logits, plain)
    assert mim_loss(out.recon, x, out.mask_pix).item() == 0.0
    assert align_loss(out.align, out.token_mask).item() == 0.0


# 5. masked pixels are invisible --------------------------------------------------------------
def test_masked_pixels_do_not_affect_outputs(model) -> None:  # type: ignore[no-untyped-def]
    x = _x()
    mask = _mask(2, 4, [(1, 2), (3, 0)])
    x2 = x.clone()
    x2[:, :, 8:16, 16:24] = torch.randn(2, 3, 8, 8) * 50  # token (1, 2) with p = 8
    x2[:, :, 24:32, 0:8] = 7.0  # token (3, 0)
    with torch.no_grad():
        a, b = model(x, mask), model(x2, mask)
    assert isinstance(a, MaskedOutput) and isinstance(b, MaskedOutput)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.recon, b.recon)
    assert torch.equal(a.align, b.align)
    assert mim_loss(a.recon, x, a.mask_pix) != mim_loss(b.recon, x2, b.mask_pix)
    x3 = x.clone()
    x3[:, :, 0, 0] += 1.0  # token (0, 0): not masked
    with torch.no_grad():
        c = model(x3, mask)
    assert isinstance(c, MaskedOutput)
    assert not torch.equal(a.logits, c.logits)


# 6. output shapes ----------------------------------------------------------------------------
def test_output_shapes(model) -> None:  # type: ignore[no-untyped-def]
    x = _x(3)
    mask = _mask(3, 4, [(0, 0), (2, 3)])
    with torch.no_grad():
        out = model(x, mask)
        plain = model(x)
    assert isinstance(out, MaskedOutput)
    assert out.logits.shape == (3, 3)
    assert out.recon.shape == (3, 3, 32, 32)
    assert out.align_masked().shape == (3, 2)
    assert out.mask_pix.shape == (3, 1, 32, 32)
    assert out.mask_pix.sum().item() == 3 * 2 * 8 * 8
    assert isinstance(plain, torch.Tensor) and plain.shape == (3, 3)


# 7. mask generator ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "m", "p", "r", "expected"),
    [
        (224, 32, 16, 0.3, 60),
        (224, 56, 14, 0.3, 80),
        (224, 32, 16, 0.1, 20),
        (224, 16, 16, 0.1, 20),
        (32, 8, 8, 0.0, 0),
    ],
)
def test_mask_generator_counts_and_blocks(
    size: int, m: int, p: int, r: float, expected: int
) -> None:
    gen = MaskGenerator(size, m, p, r)
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = gen(rng)
        assert mask.shape == (size // p, size // p)
        assert set(np.unique(mask)) <= {0, 1}
        assert int(mask.sum()) == expected == math.ceil(r * (size // m) ** 2) * (m // p) ** 2
        s = m // p
        blocks = mask.reshape(size // m, s, size // m, s)
        # every aligned s×s block is all ones or all zeros
        assert np.all(blocks.min(axis=(1, 3)) == blocks.max(axis=(1, 3)))


@pytest.mark.parametrize(("size", "m", "p"), [(224, 48, 16), (224, 24, 16)])
def test_mask_generator_rejects_bad_sizes(size: int, m: int, p: int) -> None:
    with pytest.raises(InvalidConfigError):
        MaskGenerator(size, m, p, 0.3)


# 8. PixelShuffle layout ----------------------------------------------------------------------
def test_pixel_shuffle_layout(model) -> None:  # type: ignore[no-untyped-def]
    p, g = 8, 4
    conv_out = torch.zeros(1, 3 * p * p, g, g)
    c, a, b, h, w = 2, 3, 5, 1, 2
    conv_out[0, c * p * p + a * p + b, h, w] = 42.0
    recon = model.decoder[1](conv_out)
    assert recon[0, c, h * p + a, w * p + b] == 42.0
    assert recon.sum() == 42.0


# 9. alignment values and gradients -----------------------------------------------------------
def test_alignment_values_and_gradient_paths(model) -> None:  # type: ignore[no-untyped-def]
    z = torch.tensor([[1.0, 0.0]])
    for other, expected in (([1.0, 0.0], 0.0), ([0.0, 1.0], 2.0), ([-1.0, 0.0], 4.0)):
        d = (torch.tensor([other]) - z).pow(2).sum(-1)
        assert d.item() == pytest.approx(expected)
    model.train()
    x = _x()
    out = model(x, _mask(2, 4, [(0, 1), (2, 2)]))
    assert isinstance(out, MaskedOutput)
    am = out.align_masked()
    assert torch.all(am >= 0) and torch.all(am <= 4)
    align_loss(out.align, out.token_mask).backward()
    assert model.ln_patch.weight.grad is not None and model.ln_patch.weight.grad.abs().sum() > 0
    assert model.visual.ln_post.weight.grad is not None
    assert model.visual.ln_post.weight.grad.abs().sum() > 0
    assert model.visual.proj.grad is not None and model.visual.proj.grad.abs().sum() > 0


# 10. MIM loss --------------------------------------------------------------------------------
def test_mim_loss_definition() -> None:
    mask_pix = torch.zeros(2, 1, 8, 8)
    mask_pix[:, :, :4, :4] = 1
    assert mim_loss(torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8), mask_pix).item() == 1.0
    t = torch.randn(2, 3, 8, 8)
    assert mim_loss(t, t, mask_pix).item() == 0.0
    r = torch.randn(2, 3, 8, 8)
    r2 = r.clone()
    r2[:, :, 6:, 6:] = 1000.0  # unmasked pixels
    assert mim_loss(r, t, mask_pix) == mim_loss(r2, t, mask_pix)
    expected = ((r - t).abs() * mask_pix).sum() / (3 * mask_pix.sum())
    assert torch.allclose(mim_loss(r, t, mask_pix), expected)


# 11. fairness --------------------------------------------------------------------------------
@pytest.mark.parametrize(("k", "value"), [(47, 3.850148), (10, 2.302585)])
def test_fairness_batch_uniform(k: int, value: float) -> None:
    b = torch.full((k,), 1.0 / k, requires_grad=True)
    loss = fairness_batch(b)
    assert loss.item() == pytest.approx(value, abs=1e-5)
    loss.backward()
    assert b.grad is not None
    assert torch.allclose(b.grad, torch.full((k,), -1.0), atol=1e-5)


def test_fairness_moving_average_variant() -> None:
    k = 1000
    b = torch.full((k,), 1.0 / k, requires_grad=True)
    loss, state = fairness_moving_average(b, None)
    assert loss.item() == pytest.approx(13.815511, abs=1e-4)
    b2 = torch.softmax(torch.randn(k), 0).requires_grad_(True)
    loss2, state2 = fairness_moving_average(b2, state)
    pbar = 0.5 * (state + b2.detach())
    assert torch.allclose(state2, pbar)
    loss2.backward()
    assert b2.grad is not None
    assert torch.allclose(b2.grad, -1.0 / (k * pbar), rtol=1e-4)


def test_fairness_variant_switch_at_512(tmp_path, tiny_spec) -> None:  # type: ignore[no-untyped-def]
    from must_core.ml.config import make_config

    cfg = make_config()
    assert 511 < cfg.fair_moving_average_min_classes <= 512


# 12. confidence mask and CE ------------------------------------------------------------------
def test_self_training_confident_only_and_strict_threshold() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 5, requires_grad=True)
    labels = torch.randint(0, 5, (8,))
    conf = torch.tensor([0.9, 0.5, 0.2, 0.95, 0.5, 0.1, 0.3, 0.4])
    confident = conf > 0.5  # 0.5 == tau is excluded
    assert int(confident.sum()) == 2
    loss = self_training_loss(logits, labels, confident)
    ref = F.cross_entropy(logits[[0, 3]], labels[[0, 3]])
    assert torch.allclose(loss, ref)


def test_self_training_nothing_confident_is_zero_not_nan() -> None:
    logits = torch.randn(4, 3, requires_grad=True)
    loss = self_training_loss(
        logits, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool)
    )
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


# 13. total loss ------------------------------------------------------------------------------
def test_total_loss_weights() -> None:
    t = [torch.tensor(v) for v in (1.5, 2.0, 0.25, 0.5)]
    w = LossWeights(fair=0.2, mim=1.0, align=0.5)
    assert total_loss(*t, w).item() == pytest.approx(1.5 + 0.2 * 2.0 + 0.25 + 0.5 * 0.5)


# 14. EMA -------------------------------------------------------------------------------------
def test_ema_update_every_tensor(model) -> None:  # type: ignore[no-untyped-def]
    teacher = make_teacher(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema = EmaUpdater(teacher, model)
    ema.update(0.9)
    s_state = model.state_dict()
    for k, v in teacher.state_dict().items():
        expected = 0.9 * before_t[k] + 0.1 * s_state[k]
        assert torch.allclose(v, expected, atol=1e-6), k
    for name in ("classifier", "decoder.0.weight", "ln_patch.weight", "mask_token_embedding"):
        assert not torch.equal(teacher.state_dict()[name], before_t[name])
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_ema_decay_schedule() -> None:
    assert ema_decay(0, 0.999, 0.9998, 2000) == pytest.approx(0.999)
    assert ema_decay(1000, 0.999, 0.9998, 2000) == pytest.approx(0.9994)
    assert ema_decay(2000, 0.999, 0.9998, 2000) == pytest.approx(0.9998)
    assert ema_decay(5000, 0.999, 0.9998, 2000) == pytest.approx(0.9998)


# 15/16. layer decay, weight decay, parameter count on ViT-B/16 ------------------------------------
@pytest.fixture(scope="module")
def vit_b16_must() -> MustModel:
    cfg = open_clip.get_model_config("ViT-B-16")
    visual = build_visual_from_cfg(cfg)
    return MustModel(visual, torch.randn(512, 1000))


def test_layer_ids_and_multipliers(vit_b16_must: MustModel) -> None:
    groups = param_groups(vit_b16_must, 12, 0.05, 0.65)
    scale = {}
    for g in groups:
        for n in g["names"]:
            scale[n] = (g["layer_id"], g["lr_scale"])
    for name in (
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.ln_pre.weight",
        "mask_token_embedding",
    ):
        assert scale[name][0] == 0
        assert scale[name][1] == pytest.approx(0.00369721, rel=1e-5)
    assert scale["visual.transformer.resblocks.0.attn.in_proj_weight"] == (
        1,
        pytest.approx(0.00568801, rel=1e-5),
    )
    assert scale["visual.transformer.resblocks.11.mlp.c_fc.weight"] == (12, pytest.approx(0.65))
    for name in (
        "visual.ln_post.weight",
        "visual.proj",
        "classifier",
        "ln_patch.bias",
        "decoder.0.weight",
    ):
        assert scale[name] == (13, 1.0)
    assert len({g["layer_id"] for g in groups}) == 14
    assert len(groups) == 28
    assert layer_id("x.transformer.resblocks.7.ln_1.weight", 12) == 8


def test_weight_decay_split_and_param_count(vit_b16_must: MustModel) -> None:
    groups = param_groups(vit_b16_must, 12, 0.05, 0.65)
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    params = dict(vit_b16_must.named_parameters())
    for n, p in params.items():
        assert wd[n] == (0.0 if p.ndim == 1 else 0.05), n
    for n in (
        "visual.positional_embedding",
        "visual.proj",
        "classifier",
        "visual.conv1.weight",
        "decoder.0.weight",
        "mask_token_embedding",
    ):
        assert wd[n] == 0.05
    assert wd["visual.class_embedding"] == 0.0
    total = sum(p.numel() for p in vit_b16_must.parameters() if p.requires_grad)
    assert total == 87_297_536
    text_side = ("token_embedding.", "transformer.", "ln_final.", "text_projection", "logit_scale")
    assert not any(n.startswith(text_side) for n in params)


def test_text_tower_not_in_must_model(model) -> None:  # type: ignore[no-untyped-def]
    names = [n for n, _ in model.named_parameters()]
    text_side = ("token_embedding.", "transformer.", "ln_final.", "text_projection", "logit_scale")
    assert names and not any(n.startswith(text_side) for n in names)
    assert all(
        n.startswith(("visual.", "classifier", "mask_token", "ln_patch", "decoder")) for n in names
    )


# 17. LR schedule ---------------------------------------------------------------------------------
def test_cosine_schedule() -> None:
    base, final, total = 8e-5, 4e-6, 10
    sched = [cosine_lr(i, total, base, final) for i in range(total)]
    assert sched[0] == base
    assert sched[5] == pytest.approx(4.2e-5)
    assert all(a >= b for a, b in itertools.pairwise(sched))
    assert sched[-1] > final
    assert scaled_lrs(2e-5, 1e-6, 1024) == (pytest.approx(8e-5), pytest.approx(4e-6))


# 18. transforms ---------------------------------------------------------------------------------
def test_transforms_shapes_and_eval_matches_open_clip(base) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    from must_core.ml.data import eval_transform, strong_transform, weak_transform

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    pp = base.preprocess
    for t in (eval_transform(pp), weak_transform(pp), strong_transform(pp)):
        out = t(img)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    _, _, oc_val = open_clip.create_model_and_transforms(
        "must-tiny", pretrained=None, precision="fp32"
    )
    assert torch.equal(eval_transform(pp)(img), oc_val(img))


def test_weak_view_never_mirrored(base) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    from must_core.ml.data import eval_transform, weak_transform

    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[:, :8] = 255  # bright left edge: asymmetric
    img = Image.fromarray(arr)
    ref = eval_transform(base.preprocess)(img)
    for _ in range(20):
        assert torch.equal(weak_transform(base.preprocess)(img), ref)


# 20. eval metric ----------------------------------------------------------------------------------
def test_top1_vs_mean_per_class_on_imbalanced_set() -> None:
    from must_core.ml.evaluate import accuracy_from_predictions

    targets = torch.tensor([0] * 8 + [1] * 2)
    preds = torch.tensor([0] * 8 + [0] * 2)
    res = accuracy_from_predictions(preds, targets, num_classes=3)  # class 2 absent: no NaN
    assert res.top1 == pytest.approx(80.0)
    assert res.mean_per_class == pytest.approx(50.0)
    assert set(res.per_class) == {"0", "1"}  # no names given: the index as a string
    named = accuracy_from_predictions(preds, targets, 3, ["cat", "dog", "eel"])
    assert named.per_class == {"cat": pytest.approx(100.0), "dog": pytest.approx(0.0)}
