"""Edema, fat and atrophy statistics on hand-built volumes with known values."""
import numpy as np
import pytest

from pipeline import signal
from pipeline.config import MeasureConfig, goutallier_grade
from pipeline.image import Image
from pipeline.sides import Mask
from tests.analytic_hips import make_affine

AFF = make_affine((0.8, 0.8, 4.0), np.eye(3), (0, 0, 0), (60, 60, 12))


def _box(lo, hi, shape=(60, 60, 12)):
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return Mask(np.zeros(3, int), m)


QF = _box((10, 10, 2), (30, 30, 10))
REF = _box((35, 10, 2), (55, 30, 10))
FAT = _box((10, 40, 2), (55, 55, 10))


def test_dixon_fat_fraction_exact_on_other_grid():
    # Dixon on a coarser, shifted, LPS-stored grid: constant 30 % fat inside the QF region
    aff = make_affine((1.6, 1.6, 3.0), np.eye(3), (0.3, -0.2, 0.5), (34, 34, 18), flips=(True, True, False))
    fat = np.full((34, 34, 18), 30.0, np.float32)
    water = np.full((34, 34, 18), 70.0, np.float32)
    cfg = MeasureConfig()
    out = signal.fat_dixon(Image(fat, aff), Image(water, aff), QF, AFF, cfg)
    assert out["fat_fraction"] == pytest.approx(0.30, abs=1e-6)
    assert cfg.goutallier_grade(out["fat_fraction"]) == 2


def _t1_signal(ff, pd_ratio, ff_fat, w_water=0.25, w_fat=0.76):
    """Spin-echo T1 signal of a muscle voxel whose fat fraction ff comes with adipose tissue's
    higher proton density (the physics the estimator models)."""
    pd = 1.0 + (pd_ratio - 1.0) * ff / ff_fat
    return 1000.0 * pd * ((1 - ff) * w_water + ff * w_fat)


@pytest.mark.parametrize("pd_ratio", [1.0, 1.2])
def test_t1_calibration_inverts_the_signal_model(pd_ratio):
    cfg = MeasureConfig(t1_adipose_muscle_pd_ratio=pd_ratio)
    fm, ff = cfg.t1_reference_muscle_ff, cfg.t1_subcutaneous_fat_ff
    s_m, s_f = _t1_signal(fm, pd_ratio, ff), _t1_signal(ff, pd_ratio, ff)
    for target in (0.03, 0.12, 0.25, 0.5):
        t1 = np.zeros((60, 60, 12), np.float32)
        t1[REF.array] = s_m
        t1[FAT.array] = s_f
        t1[QF.array] = _t1_signal(target, pd_ratio, ff)
        out = signal.fat_t1(Image(t1, AFF), QF, REF, FAT, AFF, cfg)
        assert out["fat_fraction"] == pytest.approx(target, abs=1e-4)
    # with pd_ratio 1 the mapping is linear between the references
    lin = signal.t1_fat_fraction(np.array([s_m, 0.5 * (s_m + s_f), s_f]), s_m, s_f, fm, ff, 1.0)
    assert lin == pytest.approx([fm, 0.5 * (fm + ff), ff], abs=1e-9)
    # ignoring the proton-density rise would underestimate a fatty muscle
    if pd_ratio > 1:
        s_q = _t1_signal(0.3, pd_ratio, ff)
        assert signal.t1_fat_fraction(np.array([s_q]), s_m, s_f, fm, ff, 1.0)[0] < 0.28


def test_t1_refuses_an_image_where_fat_is_not_bright():
    cfg = MeasureConfig()
    t1 = np.zeros((60, 60, 12), np.float32)
    t1[REF.array] = 300.0
    t1[QF.array] = 400.0
    t1[FAT.array] = 100.0
    out = signal.fat_t1(Image(t1, AFF), QF, REF, FAT, AFF, cfg)
    assert out["fat_fraction"] is None and "not brighter" in out["reason"]


def _fluid(qf_values, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(100.0, 5.0, (60, 60, 12)).astype(np.float32)
    img[QF.array] = qf_values(rng, int(QF.array.sum()))
    return Image(img, AFF, "stir", {"fluid_kind": "stir"})


def test_edema_grades():
    cfg = MeasureConfig()
    none = signal.edema(_fluid(lambda r, n: r.normal(100, 5, n)), QF, REF, AFF, cfg)
    assert none["grade"] == "none"
    assert none["fraction_above_reference"] < 0.06
    assert none["signal_ratio"] == pytest.approx(1.0, abs=0.03)

    def focal(r, n):   # a quarter of the muscle twice as bright
        v = r.normal(100, 5, n)
        v[: n // 4] *= 2.0
        return v
    mild = signal.edema(_fluid(focal), QF, REF, AFF, cfg)
    assert mild["grade"] == "mild"
    assert 0.15 < mild["fraction_above_reference"] < 0.35
    marked = signal.edema(_fluid(lambda r, n: r.normal(220, 10, n)), QF, REF, AFF, cfg)
    assert marked["grade"] == "marked"
    assert marked["signal_ratio"] == pytest.approx(2.2, abs=0.05)
    assert marked["fraction_above_reference"] > 0.99


def test_edema_is_not_graded_where_fat_is_not_suppressed():
    cfg = MeasureConfig()
    for fat_level, graded in ((40.0, True), (180.0, True), (400.0, False)):
        img = _fluid(lambda r, n: r.normal(220, 10, n))      # a QF as bright as marked edema
        img.array[FAT.array] = fat_level
        out = signal.edema(img, QF, REF, AFF, cfg, fat=FAT)
        assert out["fat_signal_ratio"] == pytest.approx(fat_level / 100.0, rel=0.02)
        assert out["signal_ratio"] == pytest.approx(2.2, abs=0.05)     # statistics still given
        if graded:
            assert out["grade"] == "marked" and out["reason"] is None
        else:
            assert out["grade"] is None and "not suppressed" in out["reason"]
    # without the fat mask there is no check
    assert signal.edema(img, QF, REF, AFF, cfg)["fat_signal_ratio"] is None


def test_edema_too_few_voxels_gives_reason():
    tiny = _box((10, 10, 2), (12, 12, 3))
    out = signal.edema(_fluid(lambda r, n: r.normal(100, 5, n)), tiny, REF, AFF, MeasureConfig())
    assert out["grade"] is None and "too few" in out["reason"]


def test_atrophy_volume_and_csa_exact():
    out = signal.atrophy(QF, AFF)
    assert out["qf_volume_ml"] == pytest.approx(20 * 20 * 8 * 0.8 * 0.8 * 4.0 / 1000)
    assert out["qf_max_csa_mm2"] == pytest.approx(20 * 20 * 0.64)
    assert signal.atrophy(None, AFF)["qf_volume_ml"] is None


def test_erosion_keeps_small_structures():
    small = _box((10, 10, 2), (13, 13, 4))
    assert signal.erode_inplane(small, AFF, 30).count == small.count
    assert signal.erode_inplane(QF, AFF, 30).count == 18 * 18 * 8


def test_erosion_stays_within_coronal_slices():
    """On a coronal acquisition (4 mm slices along anterior-posterior, stored second) the boundary
    layer is dropped within each slice, never across the thick slices."""
    aff = make_affine((0.8, 4.0, 0.8), np.eye(3), (0, 0, 0), (60, 12, 60), perm=(0, 1, 2))
    box = _box((10, 2, 10), (30, 10, 30), shape=(60, 12, 60))
    er = signal.erode_inplane(box, aff, 30).array
    idx = np.argwhere(er)
    assert er.sum() == 18 * 8 * 18
    assert idx[:, 1].min() == 2 and idx[:, 1].max() == 9        # all 8 slices kept


def test_goutallier_bounds_single_definition():
    b = MeasureConfig().goutallier_ff_bounds
    assert [goutallier_grade(x) for x in (0.0, b[0] - 1e-6, b[0], b[1] + 0.01, b[2] + 0.01, 0.99)] \
        == [0, 0, 1, 2, 3, 4]
    assert goutallier_grade(None) is None


def test_fat_fraction_ignores_an_outline_straying_into_fat():
    """A healthy QF (fat fraction 0.03) outlined two voxels (1.6 mm) too wide into the fat around
    it: the core average stays grade 0; averaging all but the outer voxel reads grade 1."""
    cfg = MeasureConfig()
    s_m, s_f = 300.0, 1000.0
    t1 = np.full((60, 60, 12), s_f, np.float32)      # fat everywhere around
    t1[REF.array] = s_m
    t1[QF.array] = s_m                               # muscle of the reference's fat fraction
    wide = _box((8, 8, 2), (32, 32, 10))
    out = signal.fat_t1(Image(t1, AFF), wide, REF, FAT, AFF, cfg)
    assert out["fat_fraction"] == pytest.approx(cfg.t1_reference_muscle_ff, abs=1e-6)
    assert cfg.goutallier_grade(out["fat_fraction"]) == 0
    thin = signal.fat_t1(Image(t1, AFF), wide, REF, FAT, AFF, MeasureConfig(fat_core_depth_mm=0.0))
    assert cfg.goutallier_grade(thin["fat_fraction"]) >= 1
    # Dixon takes the same core
    fat = np.where(t1 == s_f, 90.0, 3.0).astype(np.float32)
    water = (100.0 - fat).astype(np.float32)
    dx = signal.fat_dixon(Image(fat, AFF), Image(water, AFF), wide, AFF, cfg)
    assert dx["fat_fraction"] == pytest.approx(0.03, abs=1e-6)


def test_dixon_core_keeps_coarse_voxels_clear_of_fat_beyond_a_wide_outline():
    """Dixon voxels of 2.4 mm (3 label voxels) on an outline 1.6 mm too wide: a voxel centred
    2 mm inside the outline still straddles the fat beyond the true QF; the core must not take
    it."""
    fine = np.full((60, 60, 12), 0.9, np.float32)    # fat fraction on the label grid
    fine[QF.array] = 0.03
    wide = _box((8, 8, 2), (32, 32, 10))
    # Dixon voxel (i, j) covers label voxels 3i..3i+2, 3j..3j+2 (centre on label voxel 3i+1)
    aff = AFF.copy()
    aff[:3, :2] *= 3.0
    aff[:3, 3] = AFF[:3, :3] @ np.array([1.0, 1.0, 0.0]) + AFF[:3, 3]
    ff = fine.reshape(20, 3, 20, 3, 12).mean(axis=(1, 3))
    fat, water = (100.0 * ff).astype(np.float32), (100.0 * (1.0 - ff)).astype(np.float32)
    assert ff[3, 5, 5] == pytest.approx((0.9 + 2 * 0.03) / 3)      # straddles the QF's edge
    out = signal.fat_dixon(Image(fat, aff), Image(water, aff), wide, AFF, MeasureConfig())
    assert out["fat_fraction"] == pytest.approx(0.03, abs=1e-6)


def test_fit_shading_recovers_a_smooth_field_over_two_tissues():
    from pipeline.signal import fit_shading
    from pipeline.sides import Mask

    aff = np.diag([2.0, 2.0, 4.0, 1.0])
    aff[:3, 3] = (-60, -60, -20)
    xyz = (np.indices((61, 61, 11)).reshape(3, -1).T * (2.0, 2.0, 4.0) + aff[:3, 3]).reshape(61, 61, 11, 3)
    log_field = 0.004 * xyz[..., 0] - 0.003 * xyz[..., 1] + 4e-5 * (xyz[..., 0] ** 2 + xyz[..., 1] ** 2)
    muscle = np.hypot(xyz[..., 0], xyz[..., 1]) < 45
    fat = ~muscle
    rng = np.random.default_rng(0)
    img = np.where(muscle, 300.0, 900.0) * np.exp(log_field) * rng.normal(1, 0.02, muscle.shape)
    field = fit_shading(Image(img.astype(np.float32), aff), [Mask(np.zeros(3, int), muscle),
                        Mask(np.zeros(3, int), fat)], aff, np.zeros(3), 90.0, 2)
    pts = np.array([[0.0, 0, 0], [40, 0, 8], [-30, 35, -12], [50, -50, 0]])
    want = np.exp(0.004 * pts[:, 0] - 0.003 * pts[:, 1] + 4e-5 * (pts[:, 0] ** 2 + pts[:, 1] ** 2))
    got = field(pts)
    np.testing.assert_allclose(got / got[0], want / want[0], rtol=0.01)
    lo, hi = np.percentile(log_field, [1, 99])             # the range over (nearly) all samples
    assert field.range_ratio == pytest.approx(np.exp(hi - lo), rel=0.05)


def test_surface_coil_shading_does_not_read_as_less_fat_or_edema():
    """A deep QF under a surface coil is darker than its superficial references; dividing out the
    fitted shading restores muscle-like fat fraction and edema ratio on the healthy (left) hip."""
    from pipeline.measure import measure_hips
    from tests.synthetic_subject import make_images, make_labels

    lab = make_labels()
    imgs = make_images(lab, seed=3)
    xyz = lab.voxel_to_world(np.indices(lab.shape).reshape(3, -1).T).reshape(lab.shape + (3,))
    coil = (0.45 + 0.55 * (xyz[..., 0] ** 2 + xyz[..., 1] ** 2) / 100.0 ** 2).astype(np.float32)
    shaded = {k: v.with_array(v.array * coil) for k, v in imgs.items()}
    shaded["fluid"].meta["fluid_kind"] = "stir"
    on = measure_hips(lab, shaded)["hips"]["left"]
    off = measure_hips(lab, shaded, config=MeasureConfig(shading_correction=False))["hips"]["left"]
    truth_ff = MeasureConfig().t1_reference_muscle_ff       # the QF has the muscles' T1 signal
    assert off["qf_fat_fraction"] < 0.005 and off["qf_edema"]["signal_ratio"] < 0.85   # read low
    assert abs(on["qf_fat_fraction"] - truth_ff) < 0.02
    assert on["qf_edema"]["signal_ratio"] == pytest.approx(1.0, abs=0.06)
    assert on["signal_shading"]["t1"] > 1.5 and off["signal_shading"] == {"t1": None, "fluid": None}
    assert any("strong intensity shading on the t1 image" in w for w in on["warnings"])


def test_image_depth_counts_the_thick_slices_of_a_coronal_series_behind_axial_labels():
    """The erosion that keeps fluid voxels clear of the QF outline: half an axial pixel for an
    axial series, half the slice thickness for a coronal one (slices along A-P lie in the axial
    label grid's plane), whatever the storage order."""
    from pipeline.image import Image
    from pipeline.signal import image_depth_mm

    labels = np.diag([0.8, -0.8, 4.0, 1.0])                     # axial, stored R-P-S
    axial = Image(np.zeros((4, 4, 4), np.float32), np.diag([-0.6, 0.6, 5.0, 1.0]))
    coronal = Image(np.zeros((4, 4, 4), np.float32),
                    np.array([[0.7, 0, 0, 0], [0, 0, -4.0, 0], [0, 0.7, 0, 0], [0, 0, 0, 1.0]]))
    assert image_depth_mm(axial, labels) == pytest.approx(0.3)
    assert image_depth_mm(coronal, labels) == pytest.approx(2.0)
    assert image_depth_mm(coronal) == pytest.approx(0.35)         # its own in-plane pixel


def test_dixon_noise_floor_removed_as_power_at_low_snr():
    """Magnitude Dixon at SNR 8 (Rician noise, sigma 12.5 per channel against water 100): the
    fat image of lean muscle (3 % fat) is mostly noise floor. Removing 2 sigma^2 of power per
    voxel (E[M^2] = A^2 + 2 sigma^2) brings the QF's fat fraction back near 0.03 and grade 0;
    removing only sigma^2 would leave it near 0.1 (grade 1)."""
    rng = np.random.default_rng(7)
    sigma, shape = 12.5, (60, 60, 12)

    def rician(a):
        return np.sqrt((a + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2).astype(np.float32)

    fat = rician(np.full(shape, 3.0))
    water = rician(np.full(shape, 97.0))
    cfg = MeasureConfig()
    out = signal.fat_dixon(Image(fat, AFF), Image(water, AFF), QF, AFF, cfg, REF)
    assert out["noise_sigma"] == pytest.approx(sigma, rel=0.1)
    assert out["fat_fraction"] == pytest.approx(0.03, abs=0.03)
    assert cfg.goutallier_grade(out["fat_fraction"]) == 0
