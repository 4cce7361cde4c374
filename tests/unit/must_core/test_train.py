"""Training loop: golden losses, §10 fixes, interrupt/resume, data robustness, export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from must_core.errors import (
    CheckpointError,
    DatasetError,
    EmptyDatasetError,
    InvalidConfigError,
    ModelLoadError,
)
from must_core.ml.checkpoint import load_training_checkpoint
from must_core.ml.config import BaseModelSpec, make_config
from must_core.ml.ema import make_teacher
from must_core.ml.losses import LossWeights
from must_core.ml.model import MaskedOutput, build_must_model, load_base_model
from must_core.ml.train import adapt, must_step_losses
from tests.conftest import make_labelled, save_local_dir, write_images

CLASSES = ["red", "green", "blue"]


def _cfg(**kw):  # type: ignore[no-untyped-def]
    base = {
        "batch_size": 8,
        "epochs": 2,
        "progress_every_steps": 1,
        "checkpoint_every_steps": 2,
        "conf_threshold": 0.3,
        "export_ema": True,
    }
    base.update(kw)
    return make_config(**base)


# ---- golden test of the loss components at step 0 --------------------------------------------
def test_golden_losses_at_step_zero(tiny_spec) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    base = load_base_model(tiny_spec)
    student = build_must_model(base, CLASSES, ["a photo of a {}."])
    teacher = make_teacher(student)
    g = torch.Generator().manual_seed(3)
    weak = torch.randn(4, 3, 32, 32, generator=g)
    strong = torch.randn(4, 3, 32, 32, generator=g)
    mask = torch.zeros(4, 4, 4, dtype=torch.long)
    mask[:, 0, 0] = 1
    mask[:, 2, 3] = 1
    w = LossWeights(fair=0.7, mim=1.0, align=0.3)
    tau = 0.34
    loss, parts, _ = must_step_losses(
        student,
        teacher,
        weak,
        strong,
        mask,
        conf_threshold=tau,
        weights=w,
        moving_average_fairness=False,
        fair_state=None,
    )

    # Independent computation, written from the spec with plain loops and indexing.
    with torch.no_grad():
        feats_t = F.normalize(teacher.visual(weak), dim=-1)
        q = torch.softmax(100.0 * feats_t @ teacher.classifier, dim=-1)
    conf, yhat = q.max(dim=-1)
    sel = [i for i in range(4) if conf[i].item() > tau]
    out = student(strong, mask)
    assert isinstance(out, MaskedOutput)
    if sel:
        st = torch.stack(
            [F.cross_entropy(out.logits[i : i + 1], yhat[i : i + 1]) for i in sel]
        ).mean()
    else:
        st = torch.tensor(0.0)
    pbar = torch.softmax(out.logits, -1).mean(0)
    fair = -sum(math.log(pbar[k].item()) for k in range(3)) / 3
    p = 8
    num, den = 0.0, 0
    for b in range(4):
        for r in range(4):
            for c in range(4):
                if mask[b, r, c]:
                    d = (
                        out.recon[b, :, r * p : (r + 1) * p, c * p : (c + 1) * p]
                        - strong[b, :, r * p : (r + 1) * p, c * p : (c + 1) * p]
                    ).abs()
                    num += d.sum().item()
                    den += 3 * p * p
    mim = num / den
    seq = student.encode(strong, mask)
    zc = F.normalize(student.visual.ln_post(seq[:, 0]) @ student.visual.proj, dim=-1)
    dists = []
    for b in range(4):
        for t in range(16):
            if mask[b].flatten()[t]:
                zi = F.normalize(student.ln_patch(seq[b, 1 + t]) @ student.visual.proj, dim=-1)
                dists.append(((zi - zc[b]) ** 2).sum().item())
    align = sum(dists) / len(dists)

    assert parts["st"].item() == pytest.approx(st.item(), rel=1e-4, abs=1e-6)
    assert parts["fair"].item() == pytest.approx(fair, rel=1e-4)
    assert parts["mim"].item() == pytest.approx(mim, rel=1e-4)
    assert parts["align"].item() == pytest.approx(align, rel=1e-4)
    assert parts["conf_ratio"].item() == pytest.approx(len(sel) / 4)
    assert loss.item() == pytest.approx(st.item() + 0.7 * fair + mim + 0.3 * align, rel=1e-4)


# ---- full runs -----------------------------------------------------------------------------
def test_adapt_flat_folder_no_labels_with_corrupt_files(tmp_path: Path, tiny_spec) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    write_images(data, 14, seed=1)
    write_images(data / "nested" / "deeper", 4, seed=2, fmt="jpg")
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (data / "empty.png").write_bytes(b"")
    (data / "notes.txt").write_text("ignored: not an image extension")
    Image.new("L", (40, 40), 128).save(data / "gray.png")
    Image.new("CMYK", (40, 40), (10, 20, 30, 0)).save(data / "cmyk.jpg")
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(data / "alpha.png")
    Image.new("P", (40, 40)).save(data / "palette.gif")
    events = []
    res = adapt(
        _cfg(),
        images_dir=data,
        class_names=CLASSES,
        output_dir=tmp_path / "out",
        base_model=tiny_spec,
        on_progress=events.append,
    )
    assert res.status == "completed"
    assert res.num_images == 14 + 4 + 4
    assert res.num_skipped == 2
    assert {p for p, _ in res.skipped} == {"broken.jpg", "empty.png"}
    assert res.step == res.total_steps == 2 * (22 // 8)
    assert events and events[-1].step == res.total_steps
    assert all(math.isfinite(v) for e in events for v in e.losses.values())
    assert res.model_path is not None and res.model_path.is_file()
    assert res.ema_model_path is not None and res.ema_model_path.is_file()
    assert (tmp_path / "out" / "metrics.json").is_file()


def test_nothing_confident_and_mask_ratio_zero_stay_finite(tmp_path: Path, tiny_spec) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "d"
    write_images(data, 16)
    events = []
    res = adapt(
        _cfg(conf_threshold=0.9, logit_scale=0.01, mask_ratio=0.0),
        images_dir=data,
        class_names=CLASSES,
        output_dir=tmp_path / "o",
        base_model=tiny_spec,
        on_progress=events.append,
    )
    assert res.status == "completed"
    for e in events:
        assert e.conf_ratio == 0.0
        assert e.losses["st"] == 0.0 and e.losses["mim"] == 0.0 and e.losses["align"] == 0.0
        assert math.isfinite(e.losses["loss"])


def test_min_steps_extends_small_datasets(tmp_path: Path, tiny_spec) -> None:  # type: ignore[no-untyped-def]
    write_images(tmp_path / "d", 8)
    res = adapt(
        _cfg(epochs=1, min_steps=3, progress_every_steps=10),
        images_dir=tmp_path / "d",
        class_names=CLASSES,
        output_dir=tmp_path / "o",
        base_model=tiny_spec,
    )
    assert res.total_steps == 3 and res.step == 3


def test_empty_dataset_fails_with_code(tmp_path: Path, tiny_spec) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(EmptyDatasetError) as ei:
        adapt(
            _cfg(),
            images_dir=tmp_path / "d",
            class_names=CLASSES,
            output_dir=tmp_path / "o",
            base_model=tiny_spec,
        )
    assert ei.value.code == "dataset_empty"
    with pytest.raises(DatasetError):
        adapt(
            _cfg(),
            images_dir=tmp_path / "missing",
            class_names=CLASSES,
            output_dir=tmp_path / "o",
            base_model=tiny_spec,
        )


def _states_equal(a: dict, b: dict) -> bool:  # type: ignore[type-arg]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupt_and_resume_matches_uninterrupted_run(tmp_path: Path, tiny_spec) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "d"
    write_images(data, 24, seed=5)
    cfg = _cfg(epochs=2, checkpoint_every_steps=100)  # 6 steps; checkpoints only on stop/end

    full = adapt(
        cfg,
        images_dir=data,
        class_names=CLASSES,
        output_dir=tmp_path / "full",
        base_model=tiny_spec,
    )
    assert full.status == "completed" and full.step == 6

    calls = {"n": 0}

    def stop_after_4() -> bool:
        calls["n"] += 1
        return calls["n"] > 4

    saved_steps = []
    part = adapt(
        cfg,
        images_dir=data,
        class_names=CLASSES,
        output_dir=tmp_path / "part",
        base_model=tiny_spec,
        should_stop=stop_after_4,
        on_checkpoint=lambda _p, s: saved_steps.append(s),
    )
    assert part.status == "stopped" and part.step == 4 and saved_steps == [4]
    saved = load_training_checkpoint(part.checkpoint_path)
    assert saved["step"] == 4

    # Resume and stop immediately: the re-saved state must equal what was loaded (EMA included).
    again = adapt(
        cfg,
        images_dir=data,
        class_names=CLASSES,
        output_dir=tmp_path / "part",
        base_model=tiny_spec,
        should_stop=lambda: True,
    )
    assert again.status == "stopped" and again.step == 4
    reloaded = load_training_checkpoint(again.checkpoint_path)
    assert _states_equal(saved["ema"], reloaded["ema"])
    assert _states_equal(saved["student"], reloaded["student"])
    assert reloaded["optimizer"]["state"].keys() == saved["optimizer"]["state"].keys()
    for k, st in saved["optimizer"]["state"].items():
        assert _states_equal(st, reloaded["optimizer"]["state"][k])
    assert [g["lr"] for g in saved["optimizer"]["param_groups"]] == [
        g["lr"] for g in reloaded["optimizer"]["param_groups"]
    ]

    events = []
    done = adapt(
        cfg,
        images_dir=data,
        class_names=CLASSES,
        output_dir=tmp_path / "part",
        base_model=tiny_spec,
        on_progress=events.append,
    )
    assert done.status == "completed" and done.step == 6
    assert [e.step for e in events] == [5, 6]  # continued at the saved step, not from 0
    final_full = load_training_checkpoint(full.checkpoint_path)
    final_part = load_training_checkpoint(done.checkpoint_path)
    for key in ("student", "ema"):
        for name, t in final_full[key].items():
            # Same run up to float reassociation (allocation-dependent SIMD paths). Adam turns a
            # reassociated near-zero gradient into a step of up to ~lr (3e-6 here) in either
            # direction, so the tolerance is a few such steps.
            assert torch.allclose(t, final_part[key][name], rtol=1e-4, atol=5e-5), (key, name)


def test_resume_refuses_checkpoint_of_another_run(tmp_path: Path, tiny_spec) -> None:  # type: ignore[no-untyped-def]
    write_images(tmp_path / "d", 8)
    adapt(
        _cfg(epochs=1),
        images_dir=tmp_path / "d",
        class_names=CLASSES,
        output_dir=tmp_path / "o",
        base_model=tiny_spec,
        should_stop=lambda: True,
    )
    with pytest.raises(CheckpointError):
        adapt(
            _cfg(epochs=1),
            images_dir=tmp_path / "d",
            class_names=["a", "b"],
            output_dir=tmp_path / "o",
            base_model=tiny_spec,
        )
    (tmp_path / "o" / "last.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        adapt(
            _cfg(epochs=1),
            images_dir=tmp_path / "d",
            class_names=CLASSES,
            output_dir=tmp_path / "o",
            base_model=tiny_spec,
        )


def test_eval_labels_mapped_by_class_name_and_export_matches_engine(
    tmp_path: Path, tiny_spec
) -> None:  # type: ignore[no-untyped-def]
    from must_core.ml.data import eval_transform, load_image, scan_labelled
    from must_core.ml.inference import AdaptedClassifier

    # Folder names sort as Blue, green, RED but the class order is red, green, blue.
    ev = make_labelled(tmp_path / "eval", ["RED", "green", "Blue"], per_class=3)
    items, _ = scan_labelled(ev, CLASSES)
    labels = {p.parent.name: lab for p, lab in items}
    assert labels == {"RED": 0, "green": 1, "Blue": 2}
    with pytest.raises(DatasetError):
        scan_labelled(make_labelled(tmp_path / "bad", ["purple"], 1), CLASSES)

    write_images(tmp_path / "d", 16)
    res = adapt(
        _cfg(epochs=1),
        images_dir=tmp_path / "d",
        class_names=CLASSES,
        output_dir=tmp_path / "o",
        base_model=tiny_spec,
        eval_dir=ev,
    )
    for key in ("zero_shot", "adapted", "adapted_ema"):
        assert 0.0 <= res.metrics[key]["top1"] <= 100.0
        assert res.metrics[key]["num_images"] == 9
        assert set(res.metrics[key]["per_class"]) == set(CLASSES)  # keyed by class name
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())["metrics"]
    assert set(saved["adapted"]["per_class"]) == set(CLASSES)
    # label-free spot checks: the same 16 images under the zero-shot and the adapted models
    hist = res.metrics["predicted_classes"]
    assert hist["num_images"] == 16
    for key in ("zero_shot", "adapted", "adapted_ema"):
        assert set(hist[key]) == set(CLASSES) and sum(hist[key].values()) == 16
    samples = json.loads((tmp_path / "o" / "gallery.json").read_text())
    assert set(samples) == set(CLASSES)
    served = res.metrics["served_model"]["weights"]
    assert res.metrics["gallery_weights"] == served  # the gallery shows what /classify serves
    key = {"student": "adapted", "ema": "adapted_ema", "zero_shot": "zero_shot"}[served]
    for name, shown in samples.items():
        assert len(shown) == min(hist[key][name], 8)
        assert [i["score"] for i in shown] == sorted((i["score"] for i in shown), reverse=True)
        assert all(i["thumbnail"].startswith("data:image/jpeg;base64,") for i in shown)
    assert res.model_path is not None
    clf = AdaptedClassifier.load(res.model_path)
    state = load_training_checkpoint(res.checkpoint_path)
    base = load_base_model(tiny_spec)
    engine = build_must_model(base, CLASSES, ["a photo of a {}."])
    engine.load_state_dict(state["student"])
    engine.eval()
    x = torch.stack([eval_transform(clf.preprocess)(load_image(p)) for p, _ in items])
    with torch.no_grad():
        assert torch.allclose(clf(x), engine(x), atol=1e-5)
    preds = clf.predict([load_image(p) for p, _ in items[:2]], top_k=10)
    assert len(preds[0].top_k) == 3 and preds[0].label in CLASSES


def test_model_loading_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown open_clip architecture"):
        load_base_model(BaseModelSpec(arch="ViT-Nope-99"))
    with pytest.raises(ModelLoadError, match="checkpoint file not found"):
        load_base_model(BaseModelSpec(arch="ViT-B-16", checkpoint=str(tmp_path / "missing.pt")))
    with pytest.raises(ModelLoadError, match="unknown pretrained tag"):
        load_base_model(BaseModelSpec(arch="ViT-B-16", pretrained="no-such-tag"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelLoadError):
        load_base_model(BaseModelSpec(arch="x", config=str(bad)))
    with pytest.raises(ModelLoadError):
        load_base_model(BaseModelSpec(arch=f"local-dir:{tmp_path}"))


def test_local_dir_and_checkpoint_bases_load(tmp_path: Path, tiny_spec) -> None:  # type: ignore[no-untyped-def]
    base = load_base_model(tiny_spec)
    folder = save_local_dir(base.clip, tmp_path / "tiny-local")
    loaded = load_base_model(BaseModelSpec(arch=f"local-dir:{folder}"))
    for k, v in base.clip.state_dict().items():
        assert torch.equal(v, loaded.clip.state_dict()[k]), k
    ckpt = tmp_path / "w.pt"
    torch.save(base.clip.state_dict(), ckpt)
    loaded2 = load_base_model(
        BaseModelSpec(arch="must-tiny", config=tiny_spec.config, checkpoint=str(ckpt))
    )
    assert torch.equal(loaded2.clip.visual.proj, base.clip.visual.proj)


def test_config_validation_and_presets() -> None:
    with pytest.raises(InvalidConfigError, match="mask_ratio"):
        make_config(mask_ratio=1.5)
    with pytest.raises(InvalidConfigError, match="unknown preset"):
        make_config("nope")
    with pytest.raises(InvalidConfigError, match="bogus"):
        make_config(bogus=1)
    c = make_config("imagenet_vit_b16", batch_size=256)
    assert c.mask_ratio == 0.3 and c.conf_threshold == 0.7 and c.batch_size == 256
    from must_core.ml.config import ema_schedule_params

    _d0, d1, warm = ema_schedule_params(c)
    assert warm == 8000 and d1 == pytest.approx(0.9998**0.25)
    assert ema_schedule_params(make_config("imagenet_vit_b16")) == (0.999, 0.9998, 2000)
    # Presets keep the reference (no horizon cap, crop scale 0.3) even for short runs.
    assert ema_schedule_params(make_config("imagenet_vit_b16"), total_steps=100) == (
        0.999,
        0.9998,
        2000,
    )
    assert make_config("dtd_vit_b16").strong_crop_scale == (0.3, 1.0)


def test_ema_horizon_caps_the_teacher_time_constant_on_short_runs() -> None:
    from must_core.ml.config import ema_schedule_params

    c = make_config(batch_size=64)  # generic defaults: ema_horizon 0.1
    assert c.ema_horizon == 0.1 and c.strong_crop_scale == (0.8, 1.0)
    d0, d1, warm = ema_schedule_params(c, total_steps=400)
    cap = 1 - 1 / (0.1 * 400)  # time constant 40 steps
    assert d0 == pytest.approx(cap) and d1 == pytest.approx(cap) and warm == 1600
    # Long runs keep the batch-scaled schedule wherever it is already faster than the cap.
    d0, d1, _ = ema_schedule_params(c, total_steps=10_000_000)
    assert d0 == pytest.approx(0.99 ** (64 / 1024)) and d1 == pytest.approx(0.9998 ** (64 / 1024))
    # 0 switches the cap off (the reference); without total_steps nothing is capped.
    off = make_config(batch_size=64, ema_horizon=0)
    assert ema_schedule_params(off, total_steps=400) == ema_schedule_params(c)
    with pytest.raises(InvalidConfigError, match="ema_horizon"):
        make_config(ema_horizon=-1)


def test_mask_patch_default_and_validation(tiny_spec) -> None:  # type: ignore[no-untyped-def]
    from must_core.ml.model import default_mask_patch_size, resolve_mask_patch_size

    assert default_mask_patch_size(224, 16) == 32
    assert default_mask_patch_size(224, 14) == 28
    assert default_mask_patch_size(64, 16) == 16
    model = build_must_model(load_base_model(tiny_spec), CLASSES, ["{}"])
    assert resolve_mask_patch_size(model, None) == 8
    with pytest.raises(InvalidConfigError):
        resolve_mask_patch_size(model, 12)
    _ = np  # numpy imported for helpers above


def test_strong_view_survives_maximum_randaugment_magnitude(tiny_spec) -> None:  # type: ignore[no-untyped-def]
    """timm's PosterizeIncreasing at magnitude 10 asks PIL for 0 bits; the engine caps it (bits = 1)."""
    import random

    from must_core.ml.data import strong_transform

    pp = load_base_model(tiny_spec).preprocess
    tf = strong_transform(pp, num_ops=10, magnitude=10.0, magnitude_std=0.0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    random.seed(0)
    for _ in range(30):
        assert tf(img).shape == (3, 32, 32)


def test_mask_token_starts_at_the_mean_patch_embedding(  # type: ignore[no-untyped-def]
    tmp_path: Path, tiny_spec, monkeypatch: pytest.MonkeyPatch
) -> None:
    from must_core.ml.data import eval_transform, load_image
    from must_core.ml.train import _init_mask_token

    data = tmp_path / "d"
    good = write_images(data, 6, seed=3)
    (data / "broken.png").write_bytes(b"not an image")
    torch.manual_seed(0)  # as adapt() does before building the model (random tiny weights)
    base = load_base_model(tiny_spec)
    model = build_must_model(base, CLASSES, ["a photo of a {}."])
    _init_mask_token(model, sorted(data.iterdir()), base.preprocess)  # the broken file is skipped
    tf = eval_transform(base.preprocess)
    with torch.no_grad():
        x = torch.stack([tf(load_image(p)) for p in good])
        expected = model.visual.conv1(x).mean(dim=(0, 2, 3))
    assert torch.allclose(model.mask_token_embedding.view(-1), expected, atol=1e-6)

    # wired into adapt(): with a vanishing lr the student's token stays at that init ("data_mean",
    # the default), while "random" keeps the reference's N(0, 0.02²) init
    tokens = {}
    for init in ("data_mean", "random"):
        adapt(
            _cfg(lr=1e-12, min_lr=0.0, epochs=1, mask_token_init=init),
            images_dir=data,
            class_names=CLASSES,
            output_dir=tmp_path / init,
            base_model=tiny_spec,
        )
        state = load_training_checkpoint(tmp_path / init / "last.pt")
        tokens[init] = state["student"]["mask_token_embedding"].view(-1)
    assert torch.allclose(tokens["data_mean"], expected, atol=1e-4)
    assert float(tokens["random"].std()) < 0.05 < float((tokens["random"] - expected).abs().max())

    # A resumed run takes the token from its checkpoint and decodes no images for the init.
    import must_core.ml.train as train_mod

    calls = []
    real_init = train_mod._init_mask_token
    monkeypatch.setattr(train_mod, "_init_mask_token", lambda *a: calls.append(1) or real_init(*a))
    resumed = adapt(
        _cfg(lr=1e-12, min_lr=0.0, epochs=1, mask_token_init="data_mean"),
        images_dir=data,
        class_names=CLASSES,
        output_dir=tmp_path / "data_mean",
        base_model=tiny_spec,
    )
    assert resumed.status == "completed" and calls == []
    state = load_training_checkpoint(tmp_path / "data_mean" / "last.pt")
    assert torch.equal(state["student"]["mask_token_embedding"].view(-1), tokens["data_mean"])
    adapt(
        _cfg(lr=1e-12, min_lr=0.0, epochs=1, mask_token_init="data_mean"),
        images_dir=data,
        class_names=CLASSES,
        output_dir=tmp_path / "fresh",
        base_model=tiny_spec,
    )
    assert calls == [1]  # a fresh run does initialise it


def test_random_init_is_refused_unless_allowed(tiny_spec) -> None:  # type: ignore[no-untyped-def]
    from must_core.ml.model import check_base_model_names

    no_weights = BaseModelSpec(arch="must-tiny", config=tiny_spec.config)
    with pytest.raises(ModelLoadError, match="allow_random_init") as exc:
        load_base_model(no_weights)
    assert exc.value.code == "invalid_base_model"
    with pytest.raises(ModelLoadError, match="random weights"):
        check_base_model_names(BaseModelSpec(arch="ViT-B-16"), custom_config=False)
    load_base_model(tiny_spec)  # allow_random_init=True
    check_base_model_names(
        BaseModelSpec(arch="ViT-B-16", allow_random_init=True), custom_config=False
    )
    check_base_model_names(BaseModelSpec(arch="ViT-B-16", pretrained="openai"), custom_config=False)
    with pytest.raises(ModelLoadError, match="unknown open_clip architecture"):
        check_base_model_names(
            BaseModelSpec(arch="ViT-Nope-99", pretrained="x"), custom_config=False
        )
    with pytest.raises(ModelLoadError, match="unknown pretrained tag"):
        check_base_model_names(
            BaseModelSpec(arch="ViT-B-16", pretrained="nope"), custom_config=False
        )


def test_openai_format_checkpoint_file_gets_quick_gelu(tmp_path: Path, tiny_spec) -> None:  # type: ignore[no-untyped-def]
    from open_clip.transformer import QuickGELU

    base = load_base_model(tiny_spec)
    state = dict(base.clip.state_dict())
    # OpenAI's own checkpoints carry these entries next to the weights.
    state.update(
        input_resolution=torch.tensor(64),
        context_length=torch.tensor(77),
        vocab_size=torch.tensor(49408),
    )
    ckpt = tmp_path / "openai-format.pt"
    torch.save(state, ckpt)
    loaded = load_base_model(
        BaseModelSpec(arch="must-tiny", config=tiny_spec.config, checkpoint=str(ckpt))
    )
    acts = [m for m in loaded.clip.visual.modules() if isinstance(m, QuickGELU)]
    assert acts, "OpenAI weights given as a checkpoint file must run with QuickGELU"
    assert loaded.model_cfg["quick_gelu"] is True
    assert torch.equal(loaded.clip.visual.proj, base.clip.visual.proj)
    # an open_clip-format checkpoint keeps GELU unless asked
    plain = tmp_path / "plain.pt"
    torch.save(base.clip.state_dict(), plain)
    spec = BaseModelSpec(arch="must-tiny", config=tiny_spec.config, checkpoint=str(plain))
    assert not any(isinstance(m, QuickGELU) for m in load_base_model(spec).clip.modules())
    forced = spec.model_copy(update={"force_quick_gelu": True})
    assert any(isinstance(m, QuickGELU) for m in load_base_model(forced).clip.modules())


def test_float_randaugment_magnitude(tiny_spec) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    from must_core.ml.config import make_config
    from must_core.ml.data import StrongView, strong_transform

    pp = load_base_model(tiny_spec).preprocess
    cfg = make_config(randaug_magnitude=7.5)
    view = StrongView(pp, cfg.strong_crop_scale, 2, cfg.randaug_magnitude, 0.5)
    assert view.augment is not None
    assert all(op.magnitude == 7.5 for op in view.augment.ops)
    out = view(np.full((80, 80, 3), 120, np.uint8))
    assert out.shape == (3, pp.image_size, pp.image_size)
    tf = strong_transform(pp, magnitude=7.5)
    from PIL import Image

    assert tf(Image.new("RGB", (80, 80))).shape[0] == 3


def test_strong_view_without_geometric_ops(tiny_spec) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    from must_core.ml.data import PHOTOMETRIC_OPS, StrongView

    pp = load_base_model(tiny_spec).preprocess
    full = StrongView(pp, num_ops=2)
    photo = StrongView(pp, num_ops=2, geometric=False)
    assert full.augment is not None and photo.augment is not None
    names = {op.name for op in full.augment.ops}
    assert {"Rotate", "TranslateXRel", "ShearY"} <= names
    assert (
        {op.name for op in photo.augment.ops}
        == set(PHOTOMETRIC_OPS)
        == names
        - {
            "Rotate",
            "ShearX",
            "ShearY",
            "TranslateXRel",
            "TranslateYRel",
        }
    )
    assert photo(np.full((80, 80, 3), 120, np.uint8)).shape == (3, pp.image_size, pp.image_size)


def test_bf16_head_logits_are_fp32(tiny_spec) -> None:  # type: ignore[no-untyped-def]
    model = build_must_model(load_base_model(tiny_spec), CLASSES, ["{}"])
    x = torch.randn(2, 3, model.image_size, model.image_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.dtype == torch.float32


def test_resume_with_other_hyperparameters_is_refused(tmp_path: Path, tiny_spec) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "d"
    write_images(data, 16, seed=5)
    cfg = _cfg(epochs=1, batch_size=4, checkpoint_every_steps=100)
    stop_at = {"n": 0}

    def stop() -> bool:
        stop_at["n"] += 1
        return stop_at["n"] > 2

    kw = {
        "images_dir": data,
        "class_names": CLASSES,
        "output_dir": tmp_path / "o",
        "base_model": tiny_spec,
    }
    assert adapt(cfg, should_stop=stop, **kw).status == "stopped"
    with pytest.raises(CheckpointError, match="fair_weight"):
        adapt(cfg.model_copy(update={"fair_weight": 1.0}), **kw)
    # runtime settings may differ
    res = adapt(cfg.model_copy(update={"progress_every_steps": 3, "eval_batch_size": 7}), **kw)
    assert res.status == "completed" and res.resumed_from_step == 2


@pytest.mark.parametrize(("served", "key"), [("ema", "adapted_ema"), ("zero_shot", "zero_shot")])
def test_the_gallery_shows_the_served_weights(tmp_path: Path, tiny_spec, served, key) -> None:  # type: ignore[no-untyped-def]
    write_images(tmp_path / "d", 16)
    res = adapt(
        _cfg(epochs=1, served_model=served),
        images_dir=tmp_path / "d",
        class_names=CLASSES,
        output_dir=tmp_path / "o",
        base_model=tiny_spec,
    )
    assert res.metrics["served_model"]["weights"] == served
    assert res.metrics["gallery_weights"] == served
    hist = res.metrics["predicted_classes"][key]  # the same 16 images under the served weights
    samples = json.loads((tmp_path / "o" / "gallery.json").read_text())
    assert {n: len(s) for n, s in samples.items()} == {n: min(c, 8) for n, c in hist.items()}


def test_a_resumed_run_shows_the_same_zero_shot_gallery(tmp_path: Path, tiny_spec) -> None:  # type: ignore[no-untyped-def]
    """A fresh run reuses its start-of-run zero-shot predictions; a resumed one predicts them again
    with a copy of the model at its zero-shot weights: the galleries are the same."""
    write_images(tmp_path / "d", 16)
    cfg = _cfg(epochs=1, served_model="zero_shot", checkpoint_every_steps=1)
    kw = {"images_dir": tmp_path / "d", "class_names": CLASSES, "base_model": tiny_spec}
    fresh = adapt(cfg, output_dir=tmp_path / "fresh", **kw)
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    assert adapt(cfg, output_dir=tmp_path / "r", should_stop=stop, **kw).status == "stopped"
    resumed = adapt(cfg, output_dir=tmp_path / "r", **kw)
    assert resumed.resumed_from_step and resumed.metrics["gallery_weights"] == "zero_shot"
    assert fresh.metrics["gallery_weights"] == "zero_shot"
    assert (tmp_path / "r" / "gallery.json").read_text() == (
        tmp_path / "fresh" / "gallery.json"
    ).read_text()
