"""Smoke tests of the training engine (pipeline/training.py) and train.py on tiny synthetic data."""
from __future__ import annotations

import csv
from pathlib import Path
import json

import numpy as np
import pytest
import torch

from pipeline.image import Image, save_nifti
from pipeline.labels import LABELS


def _write_subject(folder, seed, table=None):
    """A 48x44x10 scan (1x1x4 mm) with a few labelled boxes; T1 + STIR + label map."""
    rng = np.random.default_rng(seed)
    shape = (48, 44, 10)
    lab = np.zeros(shape, np.uint8)
    lab[4:44, 4:40, :] = LABELS["other_muscle"]
    for name, (x, y) in {"quadratus_femoris": (10, 10), "lesser_trochanter": (30, 12),
                         "ischial_tuberosity": (12, 28), "hamstring_tendon": (32, 30)}.items():
        dx, dy = rng.integers(-2, 3, 2)
        lab[x + dx:x + dx + 8, y + dy:y + dy + 7, 2:8] = LABELS[name]
    t1_mean = rng.uniform(50, 400, 11)
    fl_mean = rng.uniform(50, 400, 11)
    aff = np.diag([-1.0, -1.0, 4.0, 1.0])
    folder.mkdir(parents=True, exist_ok=True)
    save_nifti(Image((t1_mean[lab] + rng.normal(0, 10, shape)).astype(np.float32), aff, "t1"), folder / "t1.nii.gz")
    save_nifti(Image((fl_mean[lab] + rng.normal(0, 10, shape)).astype(np.float32), aff, "stir"), folder / "stir.nii.gz")
    out = lab.copy()
    if table is not None:  # the group's own numbering
        out = np.zeros_like(lab)
        for name, v in table.items():
            out[lab == LABELS[name]] = v
    save_nifti(Image(out, aff, "labels"), folder / "labels.nii.gz", dtype=np.uint8)
    return lab


@pytest.fixture()
def dataset(tmp_path):
    own = {"background": 0, "hamstring_tendon": 1, "quadratus_femoris": 2, "lesser_trochanter": 3,
           "ischial_tuberosity": 4, "other_muscle": 7}
    (tmp_path / "table.json").write_text(json.dumps(own))
    rows = []
    for i in range(3):
        _write_subject(tmp_path / f"s{i}", i, own if i == 2 else None)
        rows.append({"subject": f"s{i}", "t1": f"s{i}/t1.nii.gz", "fluid": "" if i == 1 else f"s{i}/stir.nii.gz",
                     "labels": f"s{i}/labels.nii.gz", "label_table": "table.json" if i == 2 else ""})
    with open(tmp_path / "data.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return tmp_path / "data.csv"


def test_read_dataset_and_label_table_remap(dataset):
    from models.bundle import default_metadata
    from pipeline.training import preprocess_subject, read_dataset

    recs = read_dataset(dataset)
    assert [r["subject"] for r in recs] == ["s0", "s1", "s2"] and recs[1]["fluid"] is None
    d = preprocess_subject(recs[2], default_metadata())
    truth = _write_subject(dataset.parent / "check", 2)       # same seed, project numbering
    # working grid of a 1x1x4 mm LPS scan is the RAS-flipped scan itself
    assert np.array_equal(d["label"][0], truth[::-1, ::-1, :])
    assert d["image"].dtype == np.float16 and d["image"].shape == (2, 48, 44, 10)


def test_training_smoke_run_and_resume(dataset, tmp_path):
    from models.bundle import load_bundle
    from pipeline.training import TrainConfig, run_training

    torch.set_num_threads(1)
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(dataset), out=str(run), epochs=1, steps_per_epoch=2, batch=2,
                      patch=(32, 32, 8), val_fraction=0.34, seed=1, progress=False,
                      class_weights={"hamstring_tendon": 2.0}, contact_weight=10.0, tissue_contrast=1.0,
                      other_plane=1.0)
    s = run_training(cfg)
    assert s["epochs"] == 1
    for name in ("best.safetensors", "best.json", "last.safetensors", "last.json", "checkpoint.pt",
                 "log.csv", "log.txt", "split.json"):
        assert (run / name).exists(), name
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and "state" in ck["optimizer"]
    net, meta = load_bundle(run / "last")
    assert meta["metrics"]["epoch"] == 1 and meta["training"]["n_val"] == 1
    assert meta["training"]["class_weights"] == {"hamstring_tendon": 2.0}
    assert meta["training"]["contact_weight"] == 10.0
    assert meta["training"]["tissue_contrast"] == 1.0 and "tissue contrast" in meta["training"]["augmentation"]
    assert meta["training"]["other_plane"] == 1.0 and "other-plane" in meta["training"]["augmentation"]
    assert set(meta["metrics"]["val_dice"]) == {n for n in LABELS if n != "background"}
    # s2's table names five structures: the others count as unannotated there
    assert meta["training"]["subjects_not_annotated_for"] == {
        n: 1 for n in ("femur", "pelvis", "gluteus_maximus", "subcutaneous_fat", "iliopsoas_tendon")}
    cfg.resume, cfg.epochs = True, 2
    s2 = run_training(cfg)
    assert s2["epochs"] == 2
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert "resumed at epoch 1" in (run / "log.txt").read_text()
    _, meta2 = load_bundle(run / "last")
    assert meta2["metrics"]["epoch"] == 2


def test_steps_draw_patches_from_several_subjects(dataset, tmp_path):
    """--patches-per-subject 1 with --batch 2 puts two subjects in a step; --batch must be a multiple."""
    from models.bundle import load_bundle
    from pipeline.training import TrainConfig, run_training

    torch.set_num_threads(1)
    cfg = TrainConfig(data=str(dataset), out=str(tmp_path / "run"), epochs=1, steps_per_epoch=1, batch=2,
                      patches_per_subject=1, patch=(32, 32, 8), val_fraction=0.34, seed=1, progress=False)
    assert run_training(cfg)["epochs"] == 1
    _, meta = load_bundle(tmp_path / "run" / "last")
    assert meta["training"]["patches_per_subject"] == 1 and meta["training"]["batch"] == 2
    cfg.out, cfg.batch, cfg.patches_per_subject = str(tmp_path / "one"), 1, 2    # one patch: one subject
    assert run_training(cfg)["epochs"] == 1
    cfg.out, cfg.batch, cfg.patches_per_subject = str(tmp_path / "bad"), 3, 2
    with pytest.raises(ValueError, match="multiple"):
        run_training(cfg)


def test_time_budget_never_starts_a_step_it_cannot_finish(dataset, tmp_path):
    """A spent budget starts no step: a fresh run still saves its (untrained) bundles once, and a
    resumed run whose budget is spent adds no empty epoch."""
    from pipeline.training import TrainConfig, run_training

    torch.set_num_threads(1)
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(dataset), out=str(run), minutes=1e-6, steps_per_epoch=50, batch=2,
                      patch=(32, 32, 8), val_fraction=0.34, seed=1, progress=False)
    assert run_training(cfg)["epochs"] == 1
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [r["steps"] for r in rows] == ["0"] and (run / "best.safetensors").exists()
    cfg.resume = True
    assert run_training(cfg)["epochs"] == 1
    assert len(list(csv.DictReader(open(run / "log.csv")))) == 1


def test_augmentations_channel_dropout_and_domain_randomisation():
    from pipeline.training import RandChannelDropoutd, RandDomainRandomisationd

    img = torch.rand(2, 16, 16, 4) + 0.1
    lab = torch.zeros(1, 16, 16, 4)
    lab[0, 4:10, 4:10] = LABELS["lesser_trochanter"]
    drop = RandChannelDropoutd(prob=1.0)
    drop.set_random_state(0)
    seen = set()
    for _ in range(20):
        out = drop({"image": img})["image"]
        alive = tuple(bool(out[c].any()) for c in range(2))
        assert sum(alive) == 1
        seen.add(alive)
    assert seen == {(True, False), (False, True)}
    one = img.clone()
    one[1] = 0
    assert torch.equal(drop({"image": one})["image"], one)          # never drops the only channel
    dr = RandDomainRandomisationd(prob=1.0)
    dr.set_random_state(0)
    out = dr({"image": one, "label": lab})["image"]
    assert not out[1].any()                                          # absent channel stays absent
    inside = out[0][lab[0] == LABELS["lesser_trochanter"]]
    assert inside.std() < 0.2 and not torch.allclose(out[0], one[0])


def test_spatial_augmentations_move_image_and_labels_together(tmp_path):
    """Every spatial step of the training chain (flip, affine, grid distortion, elastic field),
    forced on, must deform the image and the label map alike: away from label edges the image,
    made from the labels, still reads the label value under it."""
    from monai.transforms import OneOf, RandAffined, RandFlipd, RandGridDistortiond, Rand3DElasticd

    from models.bundle import default_metadata
    from pipeline.training import train_transforms

    patch = (32, 32, 8)
    chain = train_transforms(default_metadata(patch_size=list(patch)), tmp_path, 1, patch)
    steps = [u for t in chain.transforms for u in (t.transforms if isinstance(t, OneOf) else [t])]
    spatial = [t for t in steps if isinstance(t, (RandFlipd, RandAffined, RandGridDistortiond, Rand3DElasticd))]
    elastic = next(t for t in chain.transforms if isinstance(t, OneOf))
    assert isinstance(elastic.transforms[0], Rand3DElasticd) and elastic.weights[0] == pytest.approx(0.03)
    assert {type(t) for t in spatial} == {RandFlipd, RandAffined, RandGridDistortiond, Rand3DElasticd}
    for t in spatial:
        t.prob = 1.0
    lab = torch.zeros(1, *patch)
    lab[0, 6:20, 5:14, 1:7] = LABELS["quadratus_femoris"]
    lab[0, 14:28, 18:28, 2:7] = LABELS["lesser_trochanter"]
    lab[0, 2:10, 20:30, 1:6] = LABELS["ischial_tuberosity"]    # inside the patch: no padding at play
    img = torch.cat([lab * 0.1, lab * 0.05])
    pool = torch.nn.functional.max_pool3d
    for t in spatial:                        # one at a time: chained interpolations blur further
        acted = 0
        for seed in range(4):
            t.set_random_state(seed)
            out = t({"image": img.clone(), "label": lab.clone()})
            o_img, o_lab = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])
            assert o_img.shape[1:] == patch and o_lab.shape[1:] == patch
            assert set(torch.unique(o_lab).tolist()) <= {0.0, *(float(v) for v in LABELS.values())}
            acted += int(not torch.allclose(o_img, img))    # the elastic step moves < 1 voxel here
            inner = (pool(o_lab[None], 3, 1, 1) == -pool(-o_lab[None], 3, 1, 1))[0, 0]
            inner[[0, -1]] = False                                   # edges at the border go unseen
            inner[:, [0, -1]] = False
            inner[:, :, [0, -1]] = False
            assert torch.allclose(o_img[0][inner], o_lab[0][inner] * 0.1, atol=0.02), type(t).__name__
            assert torch.allclose(o_img[1][inner], o_lab[0][inner] * 0.05, atol=0.01), type(t).__name__
        assert acted, type(t).__name__                                      # it did move something


def test_cache_dataset_caches_the_deterministic_head(tmp_path):
    """MONAI's CacheDataset caches up to the first random or non-Transform step: the subject loading,
    padding and class indices must all be cached, or every step recomputes them."""
    from monai.transforms import RandomizableTrait, Transform

    from models.bundle import default_metadata
    from pipeline.training import train_transforms

    chain = train_transforms(default_metadata(patch_size=[32, 32, 8]), tmp_path, 2, (32, 32, 8))
    first = chain.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
    names = [type(t).__name__ for t in chain.transforms[:first]]
    assert names[0] == "LoadCachedSubjectd" and "ClassesToIndicesd" in names
    assert isinstance(chain.transforms[first], RandomizableTrait)


def test_train_cli_help():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"), "--help", "--no-tcmalloc"], capture_output=True, text=True)
    assert r.returncode == 0 and "--minutes" in r.stdout and "--resume" in r.stdout
    assert "--unannotated" in r.stdout and "pseudo" in r.stdout


def test_class_weight_makes_errors_on_that_structure_cost_more():
    from pipeline.training import make_loss

    y = torch.zeros(1, 1, 8, 8, 4, dtype=torch.long)
    y[..., :4, :, :] = LABELS["quadratus_femoris"]
    y[..., 4:, :, :] = LABELS["other_muscle"]

    def logits_with_error(on: str):
        """Confident correct logits except on half of one structure, labelled background."""
        x = torch.nn.functional.one_hot(y[:, 0], 11).permute(0, 4, 1, 2, 3).float() * 8.0
        rows = slice(0, 2) if on == "quadratus_femoris" else slice(4, 6)
        x[:, :, rows] = 0.0
        x[:, 0, rows] = 8.0
        return x

    def ratio(loss):  # cost of an error on the QF relative to the same error on other muscle
        return float(loss(logits_with_error("quadratus_femoris"), y) / loss(logits_with_error("other_muscle"), y))

    assert ratio(make_loss()) == pytest.approx(1.0, abs=1e-4)
    assert ratio(make_loss({"quadratus_femoris": 3.0})) > 1.5
    with pytest.raises(ValueError, match="quadratus_femur"):
        make_loss({"quadratus_femur": 2.0})


def test_partial_annotations_merge_unannotated_classes_into_background(dataset):
    """A subject annotated only for some structures: the network's calling its unannotated
    tissue 'femur' costs nothing (it may well be femur), calling its QF background still costs,
    and with every class annotated the loss is the plain one, exactly."""
    from monai.data import CacheDataset, DataLoader, list_data_collate
    from torch.utils.data import Subset

    from models.bundle import default_metadata
    from pipeline.training import annotated_mask, make_loss, read_dataset, train_transforms

    y = torch.zeros(1, 1, 8, 8, 4, dtype=torch.long)
    y[..., :4, :, :] = LABELS["quadratus_femoris"]     # rows 4-7: background (maybe an unannotated femur)
    right = torch.nn.functional.one_hot(y[:, 0], 11).permute(0, 4, 1, 2, 3).float() * 8.0

    def relabel(rows, name):
        x = right.clone()
        x[:, :, rows] = 0.0
        x[:, LABELS[name], rows] = 8.0
        return x

    femur_in_bg = relabel(slice(4, 8), "femur")
    qf_missed = relabel(slice(0, 2), "background")
    only_qf = torch.tensor([[n in ("background", "quadratus_femoris") for n in LABELS]])
    everything = torch.ones(1, 11, dtype=torch.bool)
    for loss in (make_loss(), make_loss(contact_weight=10.0)):
        assert float(loss(femur_in_bg, y, only_qf)) < 0.01 < float(loss(femur_in_bg, y))
        assert float(loss(qf_missed, y, only_qf)) > 0.3
        for x in (femur_in_bg, qf_missed, right):
            assert float(loss(x, y, everything)) == float(loss(x, y))
        # a batch mixing a partial and a full sample: only the partial one is forgiven
        yy, both = torch.cat([y, y]), torch.cat([only_qf, everything])
        clean = float(loss(torch.cat([right, right]), yy, both))
        assert float(loss(torch.cat([femur_in_bg, right]), yy, both)) == pytest.approx(clean, abs=0.01)
        assert float(loss(torch.cat([right, femur_in_bg]), yy, both)) > clean + 0.1

    recs = read_dataset(dataset)            # s2's table names five structures; s0, s1 have none
    assert recs[0]["annotated"] == list(LABELS)
    assert recs[2]["annotated"] == ["background", "quadratus_femoris", "lesser_trochanter",
                                    "ischial_tuberosity", "hamstring_tendon", "other_muscle"]
    assert annotated_mask(recs[2]).tolist() == [n in recs[2]["annotated"] for n in LABELS]
    chain = train_transforms(default_metadata(patch_size=[32, 32, 8]), dataset.parent / "cache", 2, (32, 32, 8))
    chain.set_random_state(0)
    cached = CacheDataset(recs, chain, cache_rate=1.0, num_workers=0, progress=False)   # as in training
    for _ in range(20):     # MONAI's grid distortion made some masks tensors, left others numpy
        assert all(type(x["annotated"]) is torch.Tensor for x in cached[2])
        batch = next(iter(DataLoader(Subset(cached, [2]), batch_size=1, collate_fn=list_data_collate)))
        assert batch["image"].shape[0] == 2
        assert batch["annotated"].dtype == torch.bool
        assert batch["annotated"].tolist() == [annotated_mask(recs[2]).tolist()] * 2


def test_validation_dice_skips_structures_a_subject_is_not_annotated_for():
    """A 'network' that calls every voxel femur except the QF: on a subject annotated for the QF
    only, femur is not scored (its truth, background, may hold a femur); on a fully annotated
    subject it is, and a class no validation subject holds is NaN, not 0."""
    from models.bundle import default_metadata
    from pipeline.training import validate

    class Oracle(torch.nn.Module):          # channel 0 carries the label map / 10
        def forward(self, x):
            lab = (x[:, 0] * 10).round().long()
            lab = torch.where(lab == LABELS["quadratus_femoris"], lab, torch.full_like(lab, LABELS["femur"]))
            return torch.nn.functional.one_hot(lab, 11).permute(0, 4, 1, 2, 3).float() * 10

    lab = np.zeros((1, 16, 16, 8), np.uint8)
    lab[0, 4:10, 4:10, 2:6] = LABELS["quadratus_femoris"]
    lab[0, 10:14, 4:10, 2:6] = LABELS["femur"]
    image = np.stack([lab[0] / 10.0, lab[0] / 10.0]).astype(np.float32)
    partial = np.array([n in ("background", "quadratus_femoris") for n in LABELS])
    meta = default_metadata(patch_size=[16, 16, 8])
    item = {"image": image, "label": lab, "annotated": partial}
    d = validate(Oracle(), [item], meta, torch.device("cpu"))
    assert d["quadratus_femoris"] == 1.0 and np.isnan(d["femur"]) and np.isnan(d["lesser_trochanter"])
    full = dict(item, annotated=np.ones(11, bool))
    d = validate(Oracle(), [full], meta, torch.device("cpu"))
    assert 0.0 < d["femur"] < 0.2 and np.isnan(d["lesser_trochanter"])
    assert validate(Oracle(), [item, full], meta, torch.device("cpu"))["femur"] == d["femur"]


def test_pseudo_labels_complete_only_what_was_not_annotated(dataset, tmp_path):
    """The model being fine-tuned fills the structures a subject was not annotated for, where
    the map says background; what was drawn (structures and background alike) stays. A
    fine-tune (--init) on partial maps does so by default and records it; without --init
    'pseudo' is refused."""
    from models.bundle import default_metadata, load_bundle
    from pipeline.training import TrainConfig, run_training, unannotated_filler

    class Says(torch.nn.Module):            # femur on rows 0-7, QF on rows 8-15, confidently
        def forward(self, x):
            lab = torch.full(x.shape[:1] + x.shape[2:], LABELS["femur"], dtype=torch.long)
            lab[:, 8:] = LABELS["quadratus_femoris"]
            return torch.nn.functional.one_hot(lab, 11).permute(0, 4, 1, 2, 3).float() * 10

    label = np.zeros((1, 16, 16, 8), np.uint8)
    label[0, 4:12, 4:12] = LABELS["quadratus_femoris"]           # drawn QF, half under 'femur'
    only_qf = np.array([n in ("background", "quadratus_femoris") for n in LABELS])
    meta = default_metadata(patch_size=[16, 16, 8])              # 1 x 1 x 4 mm working voxels
    image = np.zeros((2, 16, 16, 8), np.float32)
    drawn = label[0] == LABELS["quadratus_femoris"]
    out = unannotated_filler(Says(), meta, torch.device("cpu"))(image, label, only_qf)[0]
    assert (out[drawn] == LABELS["quadratus_femoris"]).all()             # the drawing wins
    assert (out[:8][~drawn[:8]] == LABELS["femur"]).all()                 # unannotated: filled
    assert (out[8:][~drawn[8:]] == 0).all()                               # annotated: drawn background
    everything = np.ones(11, bool)
    assert np.array_equal(unannotated_filler(Says(), meta, torch.device("cpu"))(image, label, everything), label)

    torch.set_num_threads(1)
    base = TrainConfig(data=str(dataset), out=str(tmp_path / "base"), epochs=1, steps_per_epoch=1, batch=2,
                       patch=(32, 32, 8), val_fraction=0.34, seed=1, progress=False)
    run_training(base)
    base.out, base.init = str(tmp_path / "ft"), str(tmp_path / "base" / "last.safetensors")
    run_training(base)
    _, meta = load_bundle(tmp_path / "ft" / "last")
    assert meta["training"]["unannotated"].startswith("training subjects completed by pseudo-labels")
    assert "pseudo-labels" in (tmp_path / "ft" / "log.txt").read_text()
    base.out, base.unannotated = str(tmp_path / "marg"), "marginal"
    run_training(base)
    assert load_bundle(tmp_path / "marg" / "last")[1]["training"]["unannotated"] == "marginal loss"
    base.out, base.init, base.unannotated = str(tmp_path / "bad"), None, "pseudo"
    with pytest.raises(ValueError, match="--init"):
        run_training(base)
    # from scratch, another model fills the maps
    labeller = str(tmp_path / "base" / "last.safetensors")
    base.out, base.unannotated, base.pseudo_labels_from = str(tmp_path / "scratch"), "auto", labeller
    run_training(base)
    assert load_bundle(tmp_path / "scratch" / "last")[1]["training"]["unannotated"].endswith(labeller)


def test_contact_weight_makes_errors_where_structures_touch_cost_more():
    from pipeline.training import contact_mask, make_loss

    y = torch.zeros(1, 1, 16, 8, 2, dtype=torch.long)
    y[:, :, 2:6] = LABELS["ischial_tuberosity"]
    y[:, :, 6:9] = LABELS["hamstring_tendon"]           # lies on the IT: rows 4-7 touch (radius 2)
    y[:, :, 12:15] = LABELS["quadratus_femoris"]        # 3 rows of background away from the tendon
    touch = contact_mask(y)[0, 0, :, 0, 0]
    assert touch.tolist() == [r in (4, 5, 6, 7) for r in range(16)]
    assert contact_mask(y, radius=1)[0, 0, :, 0, 0].tolist() == [r in (5, 6) for r in range(16)]

    def logits_with_error(rows):
        x = torch.nn.functional.one_hot(y[:, 0], 11).permute(0, 4, 1, 2, 3).float() * 8.0
        x[:, :, rows] = 0.0
        x[:, LABELS["gluteus_maximus"], rows] = 8.0
        return x

    at_contact, away = logits_with_error(slice(6, 7)), logits_with_error(slice(13, 14))
    plain = make_loss()
    assert float(plain(at_contact, y)) == pytest.approx(float(plain(away, y)), rel=0.05)
    weighted = make_loss(contact_weight=10.0)
    assert float(weighted(at_contact, y)) > 2.0 * float(weighted(away, y))
    assert float(make_loss(contact_weight=1.0)(away, y)) == pytest.approx(float(plain(away, y)))
    with pytest.raises(ValueError, match="contact weight"):
        make_loss(contact_weight=0.5)


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_contact_mask_matches_a_max_pooling_dilation(radius):
    from pipeline.training import CONTACT_STRUCTURES, contact_mask

    y = torch.randint(0, 11, (2, 1, 24, 20, 3), generator=torch.Generator().manual_seed(radius))
    k = 2 * radius + 1
    values = [LABELS[n] for n in CONTACT_STRUCTURES]
    near = sum(torch.nn.functional.max_pool3d((y == v).float(), (k, k, 1), stride=1, padding=(radius, radius, 0))
               for v in values)
    inside = sum((y == v).int() for v in values) > 0
    assert torch.equal(contact_mask(y, radius=radius), inside & (near >= 2))


def test_bf16_is_refused_where_the_cpu_would_only_emulate_it(dataset, tmp_path, monkeypatch, capsys):
    """--bf16 on a CPU without native bfloat16 trains in float32 (emulated bfloat16 is ~25x slower
    there), says so, and records what it used; autocast is never entered with bfloat16."""
    import models.net
    from models.bundle import load_bundle
    from pipeline.training import TrainConfig, run_training

    torch.set_num_threads(1)
    monkeypatch.setattr(models.net, "bf16_native", lambda device: False)
    used = []
    real_autocast = torch.autocast

    def spy(device_type, dtype=None, enabled=True, **kw):
        used.append(bool(enabled) and dtype == torch.bfloat16)
        return real_autocast(device_type, dtype=dtype, enabled=enabled, **kw)

    monkeypatch.setattr(torch, "autocast", spy)
    cfg = TrainConfig(data=str(dataset), out=str(tmp_path / "run"), epochs=1, steps_per_epoch=1, batch=2,
                      patch=(32, 32, 8), val_fraction=0.34, seed=1, progress=False, bf16=True)
    assert run_training(cfg)["epochs"] == 1
    assert used and not any(used)
    assert "--bf16 ignored" in capsys.readouterr().err
    _, meta = load_bundle(tmp_path / "run" / "last")
    assert meta["training"]["bf16"] is False


def test_tissue_contrast_scales_each_tissue_of_the_image_by_its_own_factor():
    """Each tissue class of a channel gets one factor (muscles alike), fat-like unlabelled voxels
    follow the fat, other unlabelled voxels only the channel's renormalisation, an absent channel
    nothing; the transform joins the chain only when asked for, so the bundled recipe's random
    draws are unchanged."""
    from pipeline.training import RandTissueContrastd, train_transforms

    lab = torch.zeros(1, 24, 24, 4)
    img = torch.full((2, 24, 24, 4), 0.1)
    regions = {"quadratus_femoris": (slice(0, 6), 0.15), "gluteus_maximus": (slice(6, 12), 0.15),
               "subcutaneous_fat": (slice(12, 16), 0.5), "femur": (slice(16, 20), 0.3),
               "hamstring_tendon": (slice(20, 22), 0.03)}
    for name, (xs, v) in regions.items():
        lab[0, xs, :12] = LABELS[name]
        img[0, xs, :12] = v
    img[0, :, 12:18] = 0.48                                  # unlabelled fat plane
    img[0, :, 18:] = 0.1                                     # unlabelled, not fat
    img[1] = 0                                               # absent channel
    for seed in range(6):
        tc = RandTissueContrastd(prob=1.0, max_factor=2.0)
        tc.set_random_state(seed)
        out = tc({"image": img, "label": lab})["image"]
        assert not out[1].any()
        ratio = out[0] / img[0]
        norm = ratio[0, 20, 0]                               # unlabelled, not fat: renormalisation only
        assert torch.allclose(ratio[:, 18:], norm)
        qf, gm = ratio[lab[0] == LABELS["quadratus_femoris"]], ratio[lab[0] == LABELS["gluteus_maximus"]]
        assert torch.allclose(qf, qf[0]) and torch.allclose(gm, qf[0])    # muscles share one factor
        fat = ratio[lab[0] == LABELS["subcutaneous_fat"]]
        assert torch.allclose(ratio[:, 12:18], fat[0], rtol=1e-4)       # the fat plane changes with the fat
        factors = [float(r / norm) for r in (qf[0], fat[0], ratio[lab[0] == LABELS["femur"]][0],
                                             ratio[lab[0] == LABELS["hamstring_tendon"]][0])]
        assert len({round(f, 4) for f in factors}) == 4 and all(0.5 - 1e-4 <= f <= 2.0 + 1e-4 for f in factors)
        assert float(out[0].max()) <= 0.5 + 1e-5                         # the channel's top stays put
    names = lambda chain: [type(t).__name__ for t in chain.transforms]
    assert "RandTissueContrastd" not in names(train_transforms({}, Path("."), 2, (32, 32, 8)))
    assert "RandTissueContrastd" in names(train_transforms({}, Path("."), 2, (32, 32, 8), tissue_contrast=0.3))


def test_other_plane_reslices_one_channel_along_a_p_or_l_r():
    """A channel made to look coronal / sagittal: averaged over 3-5 mm slices along one in-plane
    axis and interpolated between slice centres (a sharp edge along that axis becomes a ramp, the
    other axes keep theirs); with the other channel present, sometimes a slab with zeros beyond;
    the other channel untouched; in the chain only when asked for."""
    from pipeline.training import RandOtherPlaned, train_transforms

    x = torch.zeros(2, 40, 40, 6)
    x[0, :, 20:] = 1.0                                  # a step along y (A-P)
    x[0, 20:, :] += 0.5                                 # and one along x (L-R)
    x[1] = 0.7
    seen = set()
    for seed in range(12):
        t = RandOtherPlaned(prob=1.0, p_slab=0.0)
        t.set_random_state(seed)
        out = t({"image": x.clone()})["image"]
        changed = [c for c in (0, 1) if not torch.equal(out[c], x[c])]
        assert len(changed) == 1 and float(out.min()) >= 0.0 and float(out.max()) <= 1.5 + 1e-6
        c = changed[0]
        if c == 1:                                      # a uniform channel stays uniform
            assert torch.allclose(out[1], x[1])
            continue
        ramp_y = torch.unique(out[0, 5, 14:27, 2]).numel() > 2        # intermediate values along y
        ramp_x = torch.unique(out[0, 14:27, 5, 2]).numel() > 2
        assert ramp_y != ramp_x                          # exactly one axis resliced
        seen.add("y" if ramp_y else "x")
        assert torch.equal(out[0, :, :, 0], out[0, :, :, 5])           # S untouched
    assert seen == {"x", "y"}
    t = RandOtherPlaned(prob=1.0, p_slab=1.0)
    slabs = 0
    for seed in range(12):
        t.set_random_state(seed)
        out = t({"image": x.clone() + 0.1})["image"]
        for c in (0, 1):
            zero = (out[c] == 0).all(dim=2)
            if zero.any():
                slabs += 1
                assert zero.all(dim=0).any() or zero.all(dim=1).any()   # whole planes across the axis
    assert slabs == 12
    single = x.clone()
    single[1] = 0.0
    for seed in range(6):                               # one channel alone: never cut to a slab
        t.set_random_state(seed)
        out = t({"image": single.clone() + torch.tensor([0.1, 0.0])[:, None, None, None]})["image"]
        assert not (out[0] == 0).any() and not out[1].any()
    names = lambda chain: [type(t).__name__ for t in chain.transforms]
    assert "RandOtherPlaned" not in names(train_transforms({}, Path("."), 2, (32, 32, 8)))
    assert "RandOtherPlaned" in names(train_transforms({}, Path("."), 2, (32, 32, 8), other_plane=0.2))
