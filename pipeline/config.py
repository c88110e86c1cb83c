"""Cut-offs and reference values, each with its published source, in one place.

Every threshold the tool uses to raise a flag lives here. Reports print the value *and* the
source, so a reader knows which convention a flag follows. Change them per study with
``MeasureConfig(...)`` or a JSON file passed to the command line (``load_config``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

SOURCES = {
    "singer2015": "Singer AD et al., Skeletal Radiol 2015 (meta-analysis, 217 IFI / 140 control hips): "
                  "IFS <= 15 mm (sens 76.9 %, spec 81.0 %), QFS <= 10 mm",
    "tosun2012": "Tosun O et al., Skeletal Radiol 2012: normal IFS > 18 mm, QFS > 10 mm",
    "hatem2020": "Hatem M / Martin HD et al., 2020: decreased IFS <= 17 mm",
    "stir_url": "Quantitative STIR muscle edema: upper reference limit from healthy-muscle histogram, "
                "positive when > 2.5 % of pixels exceed it (muscle MRI literature)",
    "goutallier_fuchs": "Goutallier grading, MRI adaptation by Fuchs et al. 1999: 0 none, 1 streaks, "
                        "2 fat < muscle, 3 fat = muscle, 4 fat > muscle",
    "dixon_muscle_ff": "Proton-density fat fraction of healthy adult gluteal / thigh muscle ~2-5 % "
                       "(chemical-shift MRI literature); subcutaneous adipose tissue ~90-95 %",
    "proton_density": "Relative MR-visible proton density, adipose tissue ~0.9-1.0 vs skeletal muscle "
                      "~0.75-0.8 (tissue water/fat content; standard MR physics tables)",
    "ifi_seg_design": "ifi-seg design choice (no published value); see the comment at the field",
}

DISCLAIMER = (
    "Flags are imaging findings against published cut-offs, not diagnoses. Ischiofemoral space "
    "varies by 3-4 mm with hip rotation and position, and quadratus femoris edema is seen in ~9 % "
    "of people without symptoms."
)


@dataclass
class MeasureConfig:
    """Thresholds used by the measurement and signal modules (defaults: Singer 2015 meta-analysis)."""

    ifs_cutoff_mm: float = 15.0
    ifs_cutoff_source: str = "singer2015"
    qfs_cutoff_mm: float = 10.0
    qfs_cutoff_source: str = "singer2015"
    # QFS is taken from the hamstring origin, which sits on the ischial tuberosity inside the
    # ischiofemoral space, so a QFS above the IFS (by more than this, mm) is anatomically
    # implausible: it means part of the hamstring origin was missed. Such a QFS is kept but
    # marked (``qfs_plausible`` false) with a warning.
    qfs_above_ifs_tolerance_mm: float = 1.0
    # Likewise a QFS whose hamstring end point lies farther than this (mm) from the ischial
    # tuberosity, or whose other end point farther from the lesser trochanter, was measured on a
    # stray piece of tendon, not at the quadratus femoris (phantom truth: at most 9.6 and 13 mm);
    # it is marked implausible and raises no narrowing flag.
    qfs_landmark_max_mm: float = 25.0
    # Edema: reference upper limit = this percentile of the reference muscle's intensities
    edema_reference_percentile: float = 97.5
    # Share of QF voxels above that limit. The STIR literature calls a muscle positive above
    # 2.5 % with a limit from healthy controls; against the patient's own reference muscle a
    # healthy QF already shows ~2.5-5 % (noise, partial volume), so 'mild' starts at 4x that
    # (ifi-seg design choice) and 'marked' when most of the muscle exceeds the limit (median
    # above it: diffuse edema). Grade = marked if share >= marked or ratio >= ratio_marked, else
    # mild if share >= mild or ratio >= ratio_mild, else none (pipeline.signal.edema_grade).
    edema_fraction_mild: float = 0.10
    edema_fraction_marked: float = 0.50
    edema_ratio_mild: float = 1.25    # median QF / median reference muscle on the fluid image
    edema_ratio_marked: float = 1.8
    edema_source: str = "stir_url"
    # On a fat-suppressed fluid image fat is darker than muscle or about as bright (phantoms:
    # subcutaneous fat 0.13-1.17 times the reference muscle, T2 fat-sat leaving 5-25 % of fat's
    # signal); an unsuppressed fast spin-echo T2 shows fat at about 3-5 times muscle (fat T2
    # ~130-160 ms against muscle's ~35-45 ms). Above this ratio (subcutaneous fat near the QF
    # over the reference muscle) fat suppression failed or the series is not fat-suppressed: a
    # bright QF could then be fat as well as edema, so the edema grade is withheld (its
    # statistics are still reported).
    fat_suppression_max_ratio: float = 2.0
    fat_suppression_source: str = "ifi_seg_design"
    # Dixon fat and water swapped (a failed water-fat separation, often regional far from the
    # magnet's centre, or the two series given the wrong way round): subcutaneous fat, fat
    # fraction ~0.9 in every body, then reads ~0.1, and the reference muscle ~0.95. When at least
    # the first share of the subcutaneous fat near the QF reads a fat fraction below 0.5, or the
    # second share of the reference muscle near it above 0.5, the Dixon grade is withheld (the T1
    # grades the fat instead where there is one). Phantoms (79 Dixon hips of two cohorts, exact
    # and the default model's outlines): fat 0.00-0.26 and muscle 0.00-0.06 unswapped (skin and
    # partial volume are labelled with the fat); where a swap's edge crosses the hip's
    # surroundings fat 0.21-0.68 but muscle 0.46-0.55; swapped 0.82-1.00 both.
    dixon_subcut_max_swapped_share: float = 0.5
    dixon_reference_max_swapped_share: float = 0.3
    # Where every hip with a swap check reads swapped by both signs, its reference muscle at this
    # share or more and its subcutaneous fat at ``dixon_subcut_max_swapped_share`` or more
    # (phantoms with the whole pair swapped: muscle 0.80-1.00, fat 0.65-0.99, on labels
    # segmented from the swapped pair itself; where only part of the field was swapped the
    # muscle read at most 0.55), the pair was swapped throughout or given the wrong way round:
    # ``pipeline.api.run_subject`` exchanges fat and water and runs the scan again, with a
    # warning. Above 1: never.
    dixon_exchange_share: float = 0.7
    dixon_swap_source: str = "ifi_seg_design"
    # Fat fraction -> Goutallier grade boundaries (upper bounds of grades 0..3)
    goutallier_ff_bounds: tuple = (0.08, 0.20, 0.40, 0.55)
    goutallier_source: str = "goutallier_fuchs"
    fat_fraction_flag: float = 0.20
    # T1 fat-fraction estimate without Dixon: the QF's mean T1 signal mapped linearly between the
    # reference muscle and subcutaneous fat, whose fat fractions are taken as these values
    # (spin-echo signal is the sum of its water and fat parts, so linear in fat fraction).
    t1_reference_muscle_ff: float = 0.03
    t1_subcutaneous_fat_ff: float = 0.93
    t1_calibration_source: str = "dixon_muscle_ff"
    # Fatty infiltration replaces muscle by adipose tissue, whose MR-visible proton density is
    # higher (relative PD ~0.9-1.0 vs ~0.75-0.8 for muscle), so T1 signal rises faster than
    # linearly with the fat fraction; the T1 estimate inverts that (1.0: the linear mapping).
    t1_adipose_muscle_pd_ratio: float = 1.2
    t1_pd_source: str = "proton_density"
    # Statistics are taken inside the structures eroded by one in-plane voxel (partial volume
    # with the neighbouring fat / fluid), unless that leaves fewer than this many voxels.
    min_signal_voxels: int = 30
    # Fat fraction is averaged over the QF's core: voxels at least this deep (mm, in-plane) inside
    # the outline (T1: the voxel centres; the coarser Dixon voxels: their whole extent). A
    # segmentation that strays by a voxel into the fat around the muscle lifts a healthy QF's mean
    # fat fraction from 0.03 past the grade-1 bound (bundled network on held-out phantoms:
    # Goutallier agreement 78 % with one voxel of erosion, ~90 % with 2 mm).
    fat_core_depth_mm: float = 2.0
    # Reference tissues (gluteus maximus, subcutaneous fat) are taken within this distance (box
    # half-size) of the QF centre, where the coil sensitivity (bias field) is nearly the same.
    reference_radius_mm: float = 90.0
    # Surface-coil shading over that region is fitted on the uniform tissues (muscles other than
    # the QF; on T1 also subcutaneous fat) as a polynomial of this degree in world coordinates
    # and divided out before the T1 and fluid signals are compared (``signal.fit_shading``).
    shading_correction: bool = True
    shading_degree: int = 2
    # A fitted shading whose largest / smallest value around the QF exceeds this gets a warning
    # (held-out phantoms: 1.1-1.35 without added coil shading, 1.5-1.8 and 2.7-3.3 with it).
    shading_warn_ratio: float = 2.0
    # Pose: femoral shaft axis needs this much femur below the lesser trochanter (mm).
    pose_min_shaft_mm: float = 30.0
    pose_source: str = "ifi_seg_design"
    extra: dict = field(default_factory=dict)

    def source_text(self, key: str) -> str:
        """Full citation text for a source key."""
        return SOURCES.get(key, key)

    def to_dict(self) -> dict:
        return asdict(self)

    def goutallier_grade(self, fat_fraction: float | None) -> int | None:
        """Goutallier grade 0-4 of a mean muscle fat fraction (``goutallier_ff_bounds`` are the
        upper bounds of grades 0..3; a value equal to a bound takes the higher grade). The one definition used by the whole project."""
        return goutallier_grade(fat_fraction, self.goutallier_ff_bounds)


def goutallier_grade(fat_fraction: float | None, bounds=None) -> int | None:
    """Goutallier grade 0-4 from a fat fraction 0..1 (None stays None); ``bounds`` default to
    ``MeasureConfig().goutallier_ff_bounds``."""
    if fat_fraction is None:
        return None
    bounds = MeasureConfig.goutallier_ff_bounds if bounds is None else bounds
    return int(sum(float(fat_fraction) >= b for b in bounds))


def load_config(path: str | Path | None = None) -> MeasureConfig:
    """Defaults, overridden by the keys present in a JSON file (unknown keys are an error)."""
    cfg = MeasureConfig()
    if path is None:
        return cfg
    data = json.loads(Path(path).read_text())
    names = {f.name for f in fields(MeasureConfig)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{path}: unknown config keys {sorted(unknown)}; known: {sorted(names)}")
    for k, v in data.items():
        setattr(cfg, k, tuple(v) if isinstance(getattr(cfg, k), tuple) else v)
    return cfg
