"""Train the ifi-seg segmentation network (the engine behind ``train.py``).

Data layout
-----------
``--data`` is either

* a phantom cohort folder holding ``cohort.csv`` (written by ``data_scripts/make_phantoms.py``),
  columns ``subject,t1,fluid,fluid_kind,dixon_fat,dixon_water,labels,truth``; or
* any CSV file with columns ``subject,t1,fluid,labels`` and optionally ``label_table``, e.g. for a
  group's own scans exported from ITK-SNAP or 3D Slicer::

      subject,t1,fluid,labels,label_table
      case01,case01/t1.nii.gz,case01/stir.nii.gz,case01/seg.nii.gz,itksnap_labels.json
      case02,case02/t1.nii.gz,,case02/seg.nii.gz,itksnap_labels.json

Paths are relative to the CSV's folder (absolute paths also work). ``t1`` or ``fluid`` may be
empty, not both. ``labels`` is a NIfTI label map on any grid overlapping the images (resampled
in world coordinates); it uses the project's label values (``pipeline/labels.py``) unless
``label_table`` names a JSON ``{"name": value}`` table with its own numbering, which is mapped
onto the project's by structure name (unknown names become background).

**Partial annotations.** A subject with a ``label_table`` counts as annotated for the
structures its table names, and only for them: a group that outlined only the quadratus
femoris, lesser trochanter, ischial tuberosity and hamstring origin lists just those four.
Everything else in its map is "background or an unannotated structure". The network must not
be taught that the femur, gluteus maximus or subcutaneous fat, which the post-processing and the
signal measurements need, are background, so (``--unannotated``): when fine-tuning (``--init``)
the model as given (or ``--pseudo-labels-from``) completes each training subject's map where it
was left background with the structures the subject lacks (pseudo-labels,
``unannotated_filler``); otherwise the loss is the
marginal loss of Shi et al. (Medical Image Analysis 2021): the probabilities of the classes a
subject lacks are added to background's before Dice and cross-entropy. A structure the table
names but the map does not contain is annotated as absent. Subjects without a table use the
project's numbering and are annotated for every structure. Validation Dice skips a structure on
subjects not annotated for it (their maps are never completed).

What one training run does
--------------------------
Every subject is put on the working grid exactly as at inference (``pipeline.grid``) and cached
(``RUN_DIR/cache/*.npz`` on disk, then a MONAI ``CacheDataset`` in memory). Each step draws
``--batch`` random patches from one subject, centred on a structure (small structures are
oversampled), and augments them: left-right flip, small rotations/scaling, light elastic
deformation, SynthSeg-style random contrast per label, bias field, gamma, histogram shift,
noise, blur, simulated low resolution and random channel dropout (T1 only / fluid only / both).
Loss Dice + cross-entropy (``--class-weight NAME=W`` weighs a structure in both; ``--contact-weight``
weighs the cross-entropy where the measured structures touch), AdamW with a
polynomial learning-rate decay over the epoch or time budget. After each epoch: Dice per class
on the validation subjects (whole volumes, sliding window as at inference), ``RUN_DIR/log.csv``
+ ``log.txt``, bundles ``RUN_DIR/last`` and ``RUN_DIR/best`` (``.safetensors`` + ``.json``),
and ``RUN_DIR/checkpoint.pt`` (optimizer state, loaded with ``weights_only=True``) for
``--resume``.
"""
from __future__ import annotations

import collections
import csv
import datetime as _dt
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monai.transforms import MapTransform, RandomizableTransform, Transform

from pipeline.labels import (KEY_STRUCTURES, NUM_CLASSES, TISSUE_CLASSES, annotated_structures, label_names,
                             read_label_table, remap_to_project, tissue_lookup)

#: Structures the "done" criteria are about; the best checkpoint maximises their mean Dice.

#: Relative frequency of patch centres per class (index = label value): small structures first.
CLASS_RATIOS = {"background": 0.5, "quadratus_femoris": 2.0, "lesser_trochanter": 3.0,
                "ischial_tuberosity": 2.0, "hamstring_tendon": 2.0, "femur": 1.0, "pelvis": 1.0,
                "gluteus_maximus": 0.5, "subcutaneous_fat": 0.3, "iliopsoas_tendon": 1.5,
                "other_muscle": 0.5}

#: Structures whose contacts ``--contact-weight`` emphasises: the surfaces IFS and QFS run between.
CONTACT_STRUCTURES = ("quadratus_femoris", "lesser_trochanter", "ischial_tuberosity", "hamstring_tendon",
                      "iliopsoas_tendon")


@dataclass
class TrainConfig:
    """Options of one training run (mirrors the ``train.py`` command line)."""

    data: str
    out: str
    epochs: int = 1000
    minutes: float | None = None
    steps_per_epoch: int = 100
    batch: int = 2
    patches_per_subject: int = 2
    patch: tuple = (128, 128, 16)
    lr: float = 1e-3
    val_fraction: float = 0.15
    max_val: int = 8
    seed: int = 0
    resume: bool = False
    device: str = "auto"
    init: str | None = None
    workers: int = 0
    bf16: bool = False
    class_weights: dict | None = None
    contact_weight: float = 1.0
    tissue_contrast: float = 0.0
    other_plane: float = 0.0
    threads: int | None = None
    progress: bool = True
    description: str | None = None
    #: partially annotated subjects: "pseudo" fills their unannotated structures from the
    #: output of ``pseudo_labels_from`` (default: the ``init`` model), "marginal" leaves them to
    #: the marginal loss; "auto": pseudo when there is a model to fill them, marginal otherwise
    unannotated: str = "auto"
    pseudo_labels_from: str | None = None


# ----------------------------------------------------------------------------------- data
def read_dataset(data: str | Path) -> list[dict]:
    """Read the subject list (see module docstring); returns dicts with absolute paths."""
    data = Path(data)
    csv_path = data / "cohort.csv" if data.is_dir() else data
    if not csv_path.exists():
        raise FileNotFoundError(f"{csv_path} not found (expected a cohort folder with cohort.csv or a CSV file)")
    root = csv_path.parent
    out = []
    with open(csv_path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            def path(key):
                v = (row.get(key) or "").strip()
                return str((root / v).resolve()) if v else None
            rec = {"subject": (row.get("subject") or f"row{i}").strip(), "t1": path("t1"),
                   "fluid": path("fluid"), "labels": path("labels"), "label_table": path("label_table")}
            if rec["labels"] is None or (rec["t1"] is None and rec["fluid"] is None):
                raise ValueError(f"{csv_path}: row {i + 1} ({rec['subject']}) needs labels and t1 and/or fluid")
            rec["annotated"] = annotated_structures(rec["label_table"])
            out.append(rec)
    if not out:
        raise ValueError(f"{csv_path}: no subjects")
    return out


def annotated_mask(rec: dict) -> np.ndarray:
    """(K,) bool: which classes ``rec`` is annotated for (background always)."""
    listed = set(rec.get("annotated") or label_names())
    return np.array([n == "background" or n in listed for n in label_names()], dtype=bool)


def preprocess_subject(rec: dict, meta: dict) -> dict:
    """Load one subject and put images (float16) and labels (uint8) on its working grid."""
    from pipeline.grid import labels_to_grid, prepare_inputs
    from pipeline.image import load_nifti

    images = {}
    if rec.get("t1"):
        images["t1"] = load_nifti(rec["t1"], "t1")
    if rec.get("fluid"):
        images["fluid"] = load_nifti(rec["fluid"])
    inp = prepare_inputs(images, meta["input_channels"], meta["working_spacing_mm"], None, meta["normalisation"])
    lab = load_subject_labels(rec)
    return {"image": inp.array.astype(np.float16), "label": labels_to_grid(lab, inp.grid)[None]}


def load_subject_labels(rec: dict):
    """A subject's label map in project values (remapped through its ``label_table`` if any)."""
    from pipeline.image import load_nifti

    lab = load_nifti(rec["labels"], "labels")
    if rec.get("label_table"):
        return lab.with_array(remap_to_project(lab.array, read_label_table(rec["label_table"])))
    if lab.array.max() >= NUM_CLASSES:
        raise ValueError(f"{rec['labels']}: values above {NUM_CLASSES - 1}; give a label_table column")
    return lab


class LoadCachedSubjectd(Transform):
    """Deterministic MONAI transform: record -> preprocessed arrays (disk cache in ``cache_dir``);
    with a ``filler`` (``unannotated_filler``) a partially annotated subject's label map is
    completed by it and then counts as annotated for every structure.

    A MONAI ``Transform`` subclass on purpose: ``CacheDataset`` caches the deterministic head of
    the chain only up to the first object that is not one, and without the in-memory cache every
    step would reload the subject and recompute its class indices in the loader.
    """

    def __init__(self, meta: dict, cache_dir: Path, filler=None):
        self.meta, self.cache_dir = meta, Path(cache_dir)
        self.filler = filler

    def __call__(self, rec: dict) -> dict:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        key = "".join(c if c.isalnum() or c in "-_." else "_" for c in rec["subject"])
        path = self.cache_dir / f"{key}.npz"
        stamp = max(os.path.getmtime(p) for p in (rec["t1"], rec["fluid"], rec["labels"]) if p)
        if path.exists() and os.path.getmtime(path) >= stamp:
            with np.load(path, allow_pickle=False) as z:
                d = {"image": z["image"], "label": z["label"]}
        else:
            d = preprocess_subject(rec, self.meta)
            from pipeline.image import atomic_write

            atomic_write(path, lambda tmp: np.savez(open(tmp, "wb"), **d))
        annotated = annotated_mask(rec)
        if self.filler is not None and not annotated.all():
            # kept in memory only (CacheDataset): the disk cache holds the annotation as drawn
            d = dict(d, label=self.filler(d["image"], d["label"], annotated))
            annotated = np.ones_like(annotated)
        return {"subject": rec["subject"], **d, "annotated": annotated}


def unannotated_filler(net, meta: dict, device, min_probability: float = 0.5):
    """Pseudo-labels for partial annotations: a function ``(image, label, annotated) -> label``
    that gives each voxel the annotation left as background the structure ``net`` (the model
    being fine-tuned, as loaded) finds there, where that structure is one the subject was not
    annotated for and the network gives it at least ``min_probability``. Drawn structures and
    drawn background stay as they are (self-training, as TotalSegmentator filled the classes a
    dataset lacked with a model's predictions). Keeping the filled labels a few millimetres
    from the drawn structures, the rest left to the marginal loss, was worse (docs/performance.md)."""
    import torch

    from pipeline.segment import predict_logits

    def fill(image, label, annotated):
        probs = torch.softmax(predict_logits(net, np.asarray(image, np.float32), meta, device), dim=0)
        conf, pred = probs.max(dim=0)
        pred, conf = pred.numpy(), conf.numpy()
        out = np.array(label, copy=True)
        take = (out[0] == 0) & ~np.asarray(annotated, bool)[pred] & (conf >= min_probability)
        out[0][take] = pred[take]
        return out

    return fill


# ----------------------------------------------------------------------------- transforms
class _PerChannelByLabel(RandomizableTransform, MapTransform):
    """Base of the label-guided intensity transforms: with probability ``prob``, every present
    channel of ``keys`` is replaced by ``self._channel(channel, lab, prepared)``; an absent
    (all-zero) channel stays absent. ``lab``: the label map as class indices."""

    def __init__(self, keys=("image",), label_key="label", prob=0.3):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.label_key = label_key

    def _prepare(self, lab):
        """Per-sample work shared by the channels (default: none)."""
        return None

    def _channel(self, x, lab, prepared):
        raise NotImplementedError

    def __call__(self, data):
        import torch

        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        lab = torch.as_tensor(d[self.label_key])[0].round().long().clamp(0, NUM_CLASSES - 1)
        prepared = self._prepare(lab)
        for key in self.keys:
            img = torch.as_tensor(d[key]).clone()
            for c in range(img.shape[0]):
                if torch.any(img[c] != 0):
                    img[c] = self._channel(img[c], lab, prepared)
            d[key] = img
        return d


class RandDomainRandomisationd(_PerChannelByLabel):
    """SynthSeg-style contrast randomisation (Billot et al. 2023).

    With probability ``prob`` every present image channel is replaced by a random intensity per
    label (mean ~ U(0, 1.2), sd ~ U(0, 0.08) of the normalised range, drawn per sample and
    channel), blurred; unlabelled tissue (background) keeps its own texture scaled by a random
    factor. The network then keys on shape and context rather than on the phantom's contrast.
    """

    def _channel(self, x, lab, prepared):
        import torch
        from monai.transforms import GaussianSmooth

        mu = torch.from_numpy(self.R.uniform(0.0, 1.2, NUM_CLASSES)).float()
        sd = torch.from_numpy(self.R.uniform(0.0, 0.08, NUM_CLASSES)).float()
        noise = torch.from_numpy(self.R.standard_normal(lab.shape).astype(np.float32))
        new = mu[lab] + sd[lab] * noise
        bg = lab == 0
        new[bg] = x[bg] * float(self.R.uniform(0.5, 1.5))
        sigma = float(self.R.uniform(0.0, 1.0))
        if sigma > 0.1:
            new = GaussianSmooth(sigma=(sigma, sigma, sigma * 0.25))(new[None])[0]
        return torch.as_tensor(new).clamp(0.0, 1.5)


class RandTissueContrastd(_PerChannelByLabel):
    """Another scanner's tissue contrast on the image itself (unlike ``RandDomainRandomisationd``,
    which replaces the image): with probability ``prob`` each present channel's tissue classes
    (``labels.TISSUE_CLASSES``: muscle, fat, bone, tendon) are multiplied by their own factor,
    log-uniform in [1 / ``max_factor``, ``max_factor``]. Unlabelled voxels whose intensity is
    nearer the channel's median fat than its median muscle (fat planes, pelvic fat) change with
    the fat; the rest keep their signal. The channel is then rescaled so that its 99.5th
    percentile stays where it was, as inference's percentile normalisation would. The probe
    ``shift_cohort.py --shift tissue`` showed the bundled models lose accuracy to exactly this.
    """

    def __init__(self, keys=("image",), label_key="label", prob=0.3, max_factor=2.0):
        super().__init__(keys, label_key, prob)
        self.max_factor = float(max_factor)
        self._tissue_of = tissue_lookup().astype(np.int64)     # label value -> tissue (0: none)
        self._fat = list(TISSUE_CLASSES).index("fat") + 1
        self._muscle = list(TISSUE_CLASSES).index("muscle") + 1

    def _prepare(self, lab):
        import torch

        tissue = torch.from_numpy(self._tissue_of)[lab]
        step = max(1, tissue.numel() // 50_000)               # statistics on a strided sample
        return tissue, step, tissue.reshape(-1)[::step]

    def _channel(self, x, lab, prepared):
        import torch

        tissue, step, t_s = prepared
        log_m = np.log(self.max_factor)
        table = torch.ones(len(TISSUE_CLASSES) + 1)
        table[1:] = torch.from_numpy(np.exp(self.R.uniform(-log_m, log_m, len(TISSUE_CLASSES)))).float()
        x_s = x.reshape(-1)[::step]
        cls = tissue
        fat_s, mus_s = x_s[t_s == self._fat], x_s[t_s == self._muscle]
        if fat_s.numel() and mus_s.numel():
            fat_med, mus_med = fat_s.median(), mus_s.median()
            fatlike = (tissue == 0) & ((x - fat_med).abs() < (x - mus_med).abs())
            cls = torch.where(fatlike, torch.full_like(tissue, self._fat), tissue)
        new = x * table[cls]
        # back to the normalised range, as inference's percentile normalisation would put it
        body_old, new_s = x_s[x_s > 0], new.reshape(-1)[::step][x_s > 0]
        if body_old.numel():
            top_new = torch.quantile(new_s, 0.995)
            if top_new > 0:
                new = new * (torch.quantile(body_old, 0.995) / top_new)
        return new.clamp(0.0, 1.5)


class _RandOneOfPresentChannels(RandomizableTransform, MapTransform):
    """Base of the transforms that alter one of the present (not all-zero) channels: with
    probability ``prob``, ``self._apply(image, present channel indices)`` for each key; it
    returns the new image, or None to leave it."""

    def __init__(self, keys=("image",), prob=0.5):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)

    def _apply(self, img, alive: list[int]):
        raise NotImplementedError

    def __call__(self, data):
        import torch

        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.keys:
            img = torch.as_tensor(d[key])
            out = self._apply(img, [c for c in range(img.shape[0]) if bool((img[c] != 0).any())])
            if out is not None:
                d[key] = out
        return d


class RandOtherPlaned(_RandOneOfPresentChannels):
    """One channel acquired in another plane, as a coronal STIR beside an axial T1 is.

    With probability ``prob`` one present channel is averaged over slices of 3-5 mm (gap 0 or
    10-30 %) stacked along the working grid's anterior-posterior axis (coronal, 70 %) or
    left-right axis (sagittal), sampled at the slice centres (random phase) and interpolated
    back linearly, as resampling such a series onto the axial working grid does at inference
    (its 1 mm voxels taken as 1 mm). When the other channel is present too, with probability
    ``p_slab`` the channel then covers only a slab along that axis (at least 40 % of the patch)
    and is zero beyond, as a series covering part of the body is. The coronal-fluid probe
    (``make_phantoms.py --protocol fluid_plane=coronal``) showed the bundled models lose a little
    accuracy inside such a slab, and their reference tissues beyond it.
    """

    def __init__(self, keys=("image",), prob=0.2, p_slab=0.5):
        super().__init__(keys, prob)
        self.p_slab = float(p_slab)

    def _reslice(self, x, axis: int):
        import torch
        import torch.nn.functional as F

        n = x.shape[axis]
        thick = self.R.uniform(3.0, 5.0)
        step = thick * (1.0 + (0.0 if self.R.uniform() < 0.5 else self.R.uniform(0.1, 0.3)))
        k = max(1, int(round(thick)))
        moved = x.movedim(axis, -1)
        lines = moved.reshape(-1, 1, n)
        box = F.avg_pool1d(F.pad(lines, (k // 2, (k - 1) // 2), mode="replicate"), k, stride=1)[:, 0]
        centres = np.arange(self.R.uniform(0.0, step), n, step)
        if centres.size < 2:
            return x
        samples = box[:, np.clip(np.rint(centres).astype(int), 0, n - 1)]
        pos = np.clip(np.arange(n, dtype=float), centres[0], centres[-1])
        j = np.clip(np.searchsorted(centres, pos, side="right") - 1, 0, centres.size - 2)
        w = torch.from_numpy((pos - centres[j]) / (centres[j + 1] - centres[j])).to(x.dtype)
        out = samples[:, j] * (1 - w) + samples[:, j + 1] * w
        return out.reshape(moved.shape).movedim(-1, axis)

    def _apply(self, img, alive):
        import torch

        if not alive:
            return None
        img = img.clone()
        c = alive[self.R.randint(len(alive))]
        axis = 1 if self.R.uniform() < 0.7 else 0          # channel axes: R, A, S
        img[c] = self._reslice(img[c], axis)
        if len(alive) >= 2 and self.R.uniform() < self.p_slab:
            n = img.shape[axis + 1]
            width = int(round(self.R.uniform(0.4, 1.0) * n))
            lo = self.R.randint(0, n - width + 1)
            keep = torch.zeros(n, dtype=torch.bool)
            keep[lo:lo + width] = True
            view = [1, 1, 1]
            view[axis] = n
            img[c] = img[c] * keep.reshape(view)
        return img


class RandChannelDropoutd(_RandOneOfPresentChannels):
    """With probability ``prob`` zero one of the two channels (T1 only / fluid only at inference).

    Applied last, so a dropped channel is exactly zero like a missing series at inference.
    Never drops the only channel that carries signal.
    """

    def __init__(self, keys=("image",), prob=0.4):
        super().__init__(keys, prob)

    def _apply(self, img, alive):
        if len(alive) < 2:
            return None
        img = img.clone()
        img[alive[self.R.randint(len(alive))]] = 0
        return img


def train_transforms(meta: dict, cache_dir: Path, samples: int, patch, tissue_contrast: float = 0.0,
                     other_plane: float = 0.0, filler=None) -> "object":
    """The MONAI dictionary transform chain (deterministic head is cached by CacheDataset).

    ``samples``: patches drawn from each subject (the loader stacks the subjects of one step).
    ``tissue_contrast``: probability of ``RandTissueContrastd``; at 0 it is left out of the chain,
    so that the bundled models' recipe draws exactly the random numbers it drew; likewise
    ``other_plane``, the probability of ``RandOtherPlaned``.
    """
    from monai.transforms import (CastToTyped, ClassesToIndicesd, Compose, EnsureTyped, Identityd, OneOf,
                                  Rand3DElasticd, RandAdjustContrastd, RandAffined, RandBiasFieldd,
                                  RandCropByLabelClassesd, RandFlipd, RandGaussianNoised, RandGaussianSmoothd,
                                  RandGridDistortiond, RandHistogramShiftd, RandSimulateLowResolutiond,
                                  SpatialPadd)

    patch = tuple(int(p) for p in patch)
    big = (int(patch[0] * 1.25), int(patch[1] * 1.25), int(patch[2] + 4))
    names = label_names()
    ratios = [CLASS_RATIOS.get(n, 1.0) for n in names]
    keys = ("image", "label")
    return Compose([
        LoadCachedSubjectd(meta, cache_dir, filler),
        SpatialPadd(keys, big),
        ClassesToIndicesd("label", num_classes=NUM_CLASSES, max_samples_per_class=2000),
        EnsureTyped(keys, track_meta=False),
        # --- random from here on (not cached)
        RandCropByLabelClassesd(keys, "label", big, ratios=ratios, num_classes=NUM_CLASSES,
                                num_samples=samples, indices_key="label_cls_indices", warn=False),
        CastToTyped(keys, dtype=(np.float32, np.float32)),
        # Left-right mirroring is safe: the classes are side-agnostic (no left/right label values);
        # sides are assigned from world coordinates after segmentation.
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandAffined(keys, spatial_size=patch, prob=0.8, rotate_range=(0.1, 0.1, 0.3),
                    scale_range=(0.12, 0.12, 0.12), mode=("bilinear", "nearest"), padding_mode="zeros"),
        # Non-rigid deformation: a smooth elastic field costs ~12x more per patch on the CPU than
        # a coarse grid distortion (0.19 s vs 0.017 s for 128x128x16 on one core), so deformed
        # patches mostly get the grid distortion and only a few the elastic field.
        RandGridDistortiond(keys, num_cells=(4, 4, 2), distort_limit=(-0.1, 0.1), prob=0.2,
                            mode=("bilinear", "nearest"), padding_mode="zeros"),
        # OneOf rather than prob=0.03: MONAI's Rand3DElasticd resamples every patch through an
        # identity grid when it draws "no" (29 of 72 ms per patch, measured), OneOf skips it.
        OneOf([Rand3DElasticd(keys, sigma_range=(6, 8), magnitude_range=(20, 60), prob=1.0,
                              mode=("bilinear", "nearest"), padding_mode="zeros"),
               Identityd(keys)], weights=(0.03, 0.97)),
        RandDomainRandomisationd(("image",), "label", prob=0.3),
        *([RandTissueContrastd(("image",), "label", prob=tissue_contrast)] if tissue_contrast > 0 else []),
        *([RandOtherPlaned(("image",), prob=other_plane)] if other_plane > 0 else []),
        RandBiasFieldd("image", coeff_range=(0.0, 0.3), prob=0.3),
        RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
        RandHistogramShiftd("image", num_control_points=(5, 10), prob=0.1),
        RandSimulateLowResolutiond("image", zoom_range=(0.5, 1.0), prob=0.15),
        RandGaussianSmoothd("image", sigma_x=(0.0, 0.8), sigma_y=(0.0, 0.8), sigma_z=(0.0, 0.3), prob=0.1),
        RandGaussianNoised("image", std=0.05, prob=0.3),
        RandChannelDropoutd(("image",), prob=0.4),
        EnsureTyped(keys, track_meta=False),
        # MONAI's grid distortion turns some patches' masks into tensors and leaves others numpy
        EnsureTyped("annotated", track_meta=False, allow_missing_keys=True),
    ])


def val_transforms(meta: dict, cache_dir: Path):
    """Deterministic chain for validation volumes."""
    from monai.transforms import Compose

    return Compose([LoadCachedSubjectd(meta, cache_dir)])


# ------------------------------------------------------------------------------- training
def contact_mask(label, structures=None, radius: int = 2):
    """Voxels of the measurement structures lying within ``radius`` in-plane voxels of another one.

    ``label``: integer tensor ``(B, 1, X, Y, Z)`` (axes 0-1 in-plane on the working grid). Returns a
    bool tensor of the same shape: where the hamstring origin sits on the ischial tuberosity, the
    QF meets the lesser trochanter, and so on (the surfaces IFS and QFS are measured between).
    """
    import torch

    values = torch.tensor([label_names().index(n) for n in (structures or CONTACT_STRUCTURES)],
                          device=label.device).view(1, -1, 1, 1, 1)
    own = label == values                                          # (B, S, X, Y, Z), one channel each
    near = own.to(torch.uint8)
    # Separable square dilation by shifted ORs: several times faster than max_pool3d on the CPU.
    for axis in (2, 3):
        n = near.shape[axis]
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (4 - axis)] = pad[2 * (4 - axis) + 1] = radius
        padded = torch.nn.functional.pad(near, pad)
        near = torch.zeros_like(near)
        for shift in range(2 * radius + 1):
            near |= padded.narrow(axis, shift, n)
    # Its own structure counts once; a second one within reach makes a contact.
    return own.any(1, keepdim=True) & (near.sum(1, keepdim=True) >= 2)


def make_loss(class_weights: dict | None = None, device=None, contact_weight: float = 1.0):
    """Dice + cross-entropy (MONAI ``DiceCELoss``) on softmax outputs and integer labels.

    ``class_weights`` (structure name -> weight, e.g. ``{"hamstring_tendon": 3}``) weighs those
    classes in both terms; every other class keeps weight 1. ``contact_weight`` > 1 also weighs
    the cross-entropy of the voxels in ``contact_mask`` (boundary weighting as in Ronneberger et
    al. 2015, restricted to where the measured structures touch).
    """
    import torch
    from monai.losses import DiceCELoss, DiceLoss

    class_weights = dict(class_weights or {})
    unknown = sorted(set(class_weights) - set(label_names()))
    if unknown:
        raise ValueError(f"unknown structure(s) in class weights: {', '.join(unknown)} "
                         f"(known: {', '.join(label_names())})")
    if any(not float(w) > 0 for w in class_weights.values()):
        raise ValueError(f"class weights must be positive: {class_weights}")
    if not float(contact_weight) >= 1.0:
        raise ValueError(f"contact weight must be at least 1: {contact_weight}")
    weight = None
    if any(float(w) != 1.0 for w in class_weights.values()):
        weight = torch.tensor([float(class_weights.get(n, 1.0)) for n in label_names()],
                              dtype=torch.float32, device=device)
    loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, weight=weight)
    marginal_dice = DiceLoss(to_onehot_y=True, softmax=False, batch=True, weight=weight)

    def weighted_ce(log_probs, y):
        """Cross-entropy of (B, K, ...) log-probabilities, ``contact_weight`` on the contacts."""
        target = y[:, 0].long()
        ce = torch.nn.functional.nll_loss(log_probs, target, weight=weight, reduction="none")
        voxel_w = 1.0 + (float(contact_weight) - 1.0) * contact_mask(y)[:, 0].float()
        class_w = weight[target] if weight is not None else torch.ones_like(ce)
        return (ce * voxel_w).sum() / class_w.sum()

    def full(out, y):
        if float(contact_weight) == 1.0:
            return loss(out, y)
        return loss.dice(out, y) + weighted_ce(torch.log_softmax(out, dim=1), y)

    def marginal(out, y, annotated):
        """Classes a sample is not annotated for are merged into its background (Shi et al.
        2021): their probability counts as background's, and they get none of their own."""
        probs = torch.softmax(out, dim=1)
        missing = ~annotated.to(device=out.device, dtype=torch.bool)
        missing[:, 0] = False
        m = missing.to(probs.dtype)[(...,) + (None,) * (probs.ndim - 2)]
        kept = probs * (1.0 - m)
        merged = torch.cat([kept[:, :1] + (probs * m).sum(dim=1, keepdim=True), kept[:, 1:]], dim=1)
        return marginal_dice(merged, y) + weighted_ce(torch.log(merged.clamp_min(1e-7)), y)

    def loss_fn(out, y, annotated=None):
        """Dice + cross-entropy of logits ``out`` against ``y``; ``annotated`` (B, K) bool marks
        the classes each sample is annotated for (None: all)."""
        if annotated is None or bool(torch.as_tensor(annotated).all()):
            return full(out, y)
        return marginal(out, y, torch.as_tensor(annotated))

    return loss_fn


def _log(run_dir: Path, text: str) -> None:
    with open(run_dir / "log.txt", "a") as f:
        f.write(text + "\n")


def _split(records: list[dict], cfg: TrainConfig, run_dir: Path) -> tuple[list[dict], list[dict]]:
    split_path = run_dir / "split.json"
    if cfg.resume and split_path.exists():
        s = json.loads(split_path.read_text())
        by = {r["subject"]: r for r in records}
        return [by[n] for n in s["train"] if n in by], [by[n] for n in s["val"] if n in by]
    order = list(range(len(records)))
    random.Random(cfg.seed).shuffle(order)
    n_val = 0 if len(records) < 2 else min(cfg.max_val, max(1, int(round(cfg.val_fraction * len(records)))))
    val = [records[i] for i in order[:n_val]]
    train = [records[i] for i in order[n_val:]]
    split_path.write_text(json.dumps({"train": [r["subject"] for r in train],
                                      "val": [r["subject"] for r in val]}, indent=1))
    return train, val


def validate(net, val_items: list[dict], meta: dict, device) -> dict[str, float]:
    """Dice per class (MONAI DiceMetric) over whole validation volumes, both channels: the mean
    over the subjects annotated for the class whose truth holds it; NaN where none does."""
    import torch
    from monai.metrics import DiceMetric

    from pipeline.segment import predict_logits

    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    net.eval()
    rows = []
    for it in val_items:
        logits = predict_logits(net, np.asarray(it["image"], np.float32), meta, device)
        pred = logits.argmax(0)
        lab = torch.as_tensor(np.asarray(it["label"][0]), dtype=torch.long)
        oh_p = torch.nn.functional.one_hot(pred, NUM_CLASSES).permute(3, 0, 1, 2)[None]
        oh_t = torch.nn.functional.one_hot(lab, NUM_CLASSES).permute(3, 0, 1, 2)[None]
        row = metric(oh_p, oh_t)[0].cpu().numpy().astype(float)
        annotated = np.asarray(it.get("annotated", np.ones(NUM_CLASSES, bool)), bool)
        row[~annotated[1:]] = np.nan
        rows.append(row)
    per = np.full(NUM_CLASSES - 1, np.nan)
    if rows:
        rows = np.array(rows)
        seen = ~np.isnan(rows).all(axis=0)
        per[seen] = np.nanmean(rows[:, seen], axis=0)
    names = label_names()[1:]
    return {n: float(v) for n, v in zip(names, per)}


def run_training(cfg: TrainConfig) -> dict:
    """Train per ``cfg``; returns a summary (best score, epochs, run dir). See module docstring."""
    import torch
    from monai.data import CacheDataset, DataLoader, list_data_collate
    from monai.utils import set_determinism

    from models.bundle import default_metadata, load_bundle, model_from_metadata, save_bundle
    from models.net import bf16_native, memory_layout

    t_start = time.time()
    for flag, p in (("--tissue-contrast", cfg.tissue_contrast), ("--other-plane", cfg.other_plane)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{flag} {p} is not a probability (0 to 1)")
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    use_bf16 = bool(cfg.bf16) and bf16_native(device)
    if cfg.bf16 and not use_bf16:
        # emulated bfloat16 would make every step many times slower (55 s against 2 s, 2 AVX2 cores)
        print("warning: --bf16 ignored: this CPU has no native bfloat16 (AVX-512 BF16 / AMX); "
              "training in float32", file=sys.stderr)
    set_determinism(seed=cfg.seed)
    records = read_dataset(cfg.data)
    train_recs, val_recs = _split(records, cfg, run_dir)
    if not train_recs:
        raise ValueError("no training subjects")
    command = "python train.py " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("train.py") else None
    meta = default_metadata(patch_size=list(cfg.patch))
    meta["inference"]["roi_size"] = [max(224, cfg.patch[0]), max(224, cfg.patch[1]), max(48, cfg.patch[2])]
    meta["training"] = {
        "description": cfg.description or f"{len(records)} subjects from {cfg.data}",
        "data": str(cfg.data), "n_train": len(train_recs), "n_val": len(val_recs),
        "train_subjects": [r["subject"] for r in train_recs], "val_subjects": [r["subject"] for r in val_recs],
        "seed": cfg.seed, "batch": cfg.batch, "patches_per_subject": min(cfg.patches_per_subject, cfg.batch),
        "patch": list(cfg.patch), "lr": cfg.lr,
        "class_weights": dict(cfg.class_weights or {}), "contact_weight": cfg.contact_weight,
        "tissue_contrast": cfg.tissue_contrast, "other_plane": cfg.other_plane,
        "epochs": cfg.epochs, "minutes": cfg.minutes, "steps_per_epoch": cfg.steps_per_epoch,
        "command": command, "device": device.type, "bf16": use_bf16, "torch": torch.__version__,
        "augmentation": "flip LR, affine, grid distortion, elastic, SynthSeg contrast, "
                        + ("tissue contrast, " if cfg.tissue_contrast > 0 else "")
                        + ("other-plane channel, " if cfg.other_plane > 0 else "")
                        + "bias, gamma, histogram shift, "
                        "low resolution, blur, noise, channel dropout",
    }
    if cfg.unannotated not in ("auto", "pseudo", "marginal"):
        raise ValueError(f"unannotated must be auto, pseudo or marginal, not {cfg.unannotated!r}")
    labeller = cfg.pseudo_labels_from or cfg.init
    if cfg.unannotated == "pseudo" and not labeller:
        raise ValueError("pseudo-labels for unannotated structures need a model: --init or --pseudo-labels-from")
    partial = {n: sum(n not in r["annotated"] for r in records) for n in label_names()}
    partial = {n: k for n, k in partial.items() if k}
    fill = bool(partial) and cfg.unannotated != "marginal" and bool(labeller)
    if partial:        # how many subjects lack each structure's annotation
        how = (f"training subjects completed by pseudo-labels from {labeller}" if fill
               else "marginal loss")
        meta["training"]["subjects_not_annotated_for"] = partial
        meta["training"]["unannotated"] = how
        _log(run_dir, f"partial annotations ({how}); subjects not annotated for: "
                      + ", ".join(f"{n} {k}" for n, k in partial.items()))
    cohort_info = Path(cfg.data) / "cohort.json" if Path(cfg.data).is_dir() else None
    if cohort_info is not None and cohort_info.exists():
        meta["training"]["cohort"] = json.loads(cohort_info.read_text())

    loss_fn = make_loss(cfg.class_weights, device, cfg.contact_weight)   # bad weights fail before caching
    net = model_from_metadata(meta).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-5)
    start_epoch, elapsed_before, best = 0, 0.0, -1.0
    ckpt_path = run_dir / "checkpoint.pt"
    if cfg.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        last_net, _ = load_bundle(run_dir / "last", device=device)
        net.load_state_dict(last_net.state_dict())
        opt.load_state_dict(ck["optimizer"])
        start_epoch, elapsed_before, best = int(ck["epoch"]), float(ck["elapsed_s"]), float(ck["best"])
        _log(run_dir, f"resumed at epoch {start_epoch} (elapsed {elapsed_before / 60:.1f} min, best {best:.4f})")
    elif cfg.init:
        init_net, _ = load_bundle(cfg.init, device=device)
        net.load_state_dict(init_net.state_dict())
        _log(run_dir, f"initialised from {cfg.init}")

    cache_dir = run_dir / "cache"
    t0 = time.time()
    per_subject = min(cfg.patches_per_subject, cfg.batch)
    if per_subject < 1 or cfg.batch % per_subject:
        raise ValueError(f"--batch {cfg.batch} is not a multiple of --patches-per-subject {cfg.patches_per_subject}")
    filler = None
    if fill:           # the model as given, whatever this run (or a resumed one) makes of it
        label_net, label_meta = load_bundle(labeller, device=device)
        filler = unannotated_filler(label_net.eval(), label_meta, device)
    chain = train_transforms(meta, cache_dir, per_subject, cfg.patch, cfg.tissue_contrast, cfg.other_plane,
                             filler)
    train_ds = CacheDataset(train_recs, chain, cache_rate=1.0, num_workers=0, progress=cfg.progress)
    val_items = [val_transforms(meta, cache_dir)(r) for r in val_recs]
    _log(run_dir, f"cached {len(train_recs)} training + {len(val_recs)} validation subjects "
                  f"in {time.time() - t0:.0f} s")
    loader = DataLoader(train_ds, batch_size=cfg.batch // per_subject, shuffle=True,
                        num_workers=cfg.workers,
                        collate_fn=list_data_collate, persistent_workers=cfg.workers > 0)
    budget_s = cfg.minutes * 60.0 if cfg.minutes else None
    names = label_names()[1:]
    log_csv = run_dir / "log.csv"
    if not log_csv.exists():
        with open(log_csv, "w", newline="") as f:
            csv.writer(f).writerow(["epoch", "steps", "elapsed_min", "lr", "train_loss", "val_key_mean",
                                    "val_mean"] + [f"dice_{n}" for n in names])

    def elapsed() -> float:
        return elapsed_before + (time.time() - t_start)

    def progress_fraction(epoch_float: float) -> float:
        f = epoch_float / max(cfg.epochs, 1)
        if budget_s:
            f = max(f, elapsed() / budget_s)
        return min(f, 1.0)

    from tqdm import tqdm

    epoch, stop, last_val_s, step_s = start_epoch, False, 0.0, 0.0
    recent_steps: collections.deque = collections.deque(maxlen=20)    # slowest recent step = margin
    layout = memory_layout(device, use_bf16)      # as at inference, which validation runs
    it = iter(loader)
    while epoch < cfg.epochs and not stop:
        net.train()
        net.to(memory_format=layout)
        losses = []
        bar = tqdm(range(cfg.steps_per_epoch), desc=f"epoch {epoch + 1}", disable=not cfg.progress,
                   leave=False, file=sys.stderr)
        for step in bar:
            # Start a step only if it and the closing validation can end inside the budget.
            if budget_s and elapsed() + step_s + last_val_s >= budget_s:
                stop = True
                break
            t_step = time.time()
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            lr = cfg.lr * (1.0 - progress_fraction(epoch + step / cfg.steps_per_epoch)) ** 0.9
            for g in opt.param_groups:
                g["lr"] = max(lr, cfg.lr * 1e-3)
            x = batch["image"].to(device).contiguous(memory_format=layout)
            y = batch["label"].to(device).round().long()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = net(x)
            loss = loss_fn(out.float(), y, batch.get("annotated"))
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            recent_steps.append(time.time() - t_step)
            step_s = max(recent_steps)
        bar.close()
        if not losses and epoch > 0:
            break                       # budget spent at an epoch's end: the saved bundles are final
        epoch += 1
        t_val = time.time()
        dice = validate(net, val_items, meta, device)
        last_val_s = time.time() - t_val
        key = [dice[n] for n in KEY_STRUCTURES if not math.isnan(dice[n])]
        key_mean = float(np.mean(key)) if key else float("nan")
        all_vals = [v for v in dice.values() if not math.isnan(v)]
        mean_all = float(np.mean(all_vals)) if all_vals else float("nan")
        train_loss = float(np.mean(losses)) if losses else float("nan")
        with open(log_csv, "a", newline="") as f:
            csv.writer(f).writerow([epoch, len(losses), f"{elapsed() / 60:.2f}", f"{opt.param_groups[0]['lr']:.2e}",
                                    f"{train_loss:.4f}", f"{key_mean:.4f}", f"{mean_all:.4f}"]
                                   + [f"{dice[n]:.4f}" for n in names])
        _log(run_dir, f"epoch {epoch} steps {len(losses)} elapsed {elapsed() / 60:.1f} min loss {train_loss:.4f} "
                      f"val key-mean Dice {key_mean:.4f} mean {mean_all:.4f} | "
                      + " ".join(f"{n}={dice[n]:.3f}" for n in names))
        meta["metrics"] = {"epoch": epoch, "val_dice": dice, "val_key_mean": key_mean, "val_mean": mean_all,
                           "elapsed_min": round(elapsed() / 60, 2)}
        meta["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        save_bundle(run_dir / "last", net, meta)
        score = key_mean if not math.isnan(key_mean) else -train_loss
        if score > best:
            best = score
            save_bundle(run_dir / "best", net, meta)
        from pipeline.image import atomic_write

        state = {"optimizer": opt.state_dict(), "epoch": epoch, "elapsed_s": elapsed(), "best": best}
        atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))
    summary = {"run_dir": str(run_dir), "epochs": epoch, "best_key_dice": best,
               "elapsed_min": round(elapsed() / 60, 2)}
    _log(run_dir, "finished: " + json.dumps(summary))
    return summary
