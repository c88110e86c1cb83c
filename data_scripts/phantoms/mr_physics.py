"""MR signal simulation for the phantom generator: tissue relaxation parameters and sequence equations.

Each fine voxel holds a tissue code (``model.TISSUES``), a fat fraction ``ff`` (fraction of its MR
visible protons in fat) and, in muscle, an edema fraction ``ed`` (excess free water). Its signal is

    S = rho_t * [ (1 - ff) * ((1 - ed) * w_t + ed * w_edema) + ff * r_fat * w_fat ]

where ``rho_t`` is the tissue's proton density, ``w`` the sequence's relaxation weighting of a
compartment (spin echo, STIR, ...) and ``r_fat`` the residual fat signal after fat suppression
(1 without suppression; a smooth spatially varying field for fat-sat). Dixon images are the water
and fat proton densities directly, so fat / (fat + water) recovers ``ff``.

Relaxation times (approximate literature values, 37 degrees C):
- muscle, fat, bone marrow, cartilage, synovial fluid at 1.5 T and 3 T: Gold et al., AJR
  2004;183:343-351 ("Musculoskeletal MRI at 3.0 T: relaxation times and image contrast").
- blood and nerve (optic nerve values): Stanisz et al., MRM 2005;54:507-512.
- tendon and cortical bone: short-T2 tissues (T2 ~ 0.4-7 ms; Du & Bydder, UTE literature), so
  they are dark on conventional sequences; T1 values are rough.
- skin, bowel and edema compartments are rough estimates chosen to give their usual appearance.
Per-subject random perturbation of every parameter (``perturb_tissues``) keeps a network from
learning one exact contrast.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .model import TISSUES

#: tissue -> (rho, T1 1.5 T, T2 1.5 T, T1 3 T, T2 3 T) of its WATER compartment, times in ms.
#: ``rho`` is the total relative proton density of the tissue (water + fat protons).
WATER_PARAMS: dict[str, tuple[float, float, float, float, float]] = {
    "air": (0.0, 1000.0, 1.0, 1000.0, 1.0),
    "fat": (0.95, 1000.0, 40.0, 1200.0, 35.0),      # water inside adipose tissue (ff ~0.95)
    "muscle": (0.78, 1130.0, 35.0, 1420.0, 32.0),   # Gold 2004
    "tendon": (0.55, 600.0, 5.0, 850.0, 4.0),       # short T2 -> dark
    "cortical_bone": (0.15, 250.0, 0.5, 300.0, 0.4),  # very short T2 -> black
    "marrow": (0.90, 900.0, 45.0, 1100.0, 40.0),    # water part of yellow marrow (ff ~0.85)
    # bladder urine / joint fluid: T2 of synovial fluid (Gold 2004); T1 between synovial fluid
    # (2850 / 3620 ms) and CSF (~4000+), so fluid stays darker than muscle on T1 spin echo
    "fluid": (1.00, 3300.0, 1210.0, 4000.0, 767.0),
    "vessel": (0.85, 1441.0, 290.0, 1932.0, 275.0),  # blood, Stanisz 2005
    "nerve": (0.80, 815.0, 77.0, 1083.0, 78.0),     # Stanisz 2005 (optic nerve)
    "bowel": (0.70, 900.0, 60.0, 1100.0, 55.0),
    "skin": (0.75, 800.0, 40.0, 1000.0, 35.0),
    "cartilage": (0.75, 1024.0, 30.0, 1240.0, 27.0),  # Gold 2004
}
#: fat compartment (T1, T2) in ms at 1.5 T and 3 T. T2: Gold 2004. T1: reported values are
#: ~250-290 ms (1.5 T) and ~330-380 ms (3 T); we use the effective values that the clinical STIR
#: inversion times null (TI = T1 ln 2: ~160 ms at 1.5 T, ~220 ms at 3 T).
FAT_PARAMS = {1.5: (230.0, 165.0), 3.0: (320.0, 133.0)}
#: free water of muscle edema (T1, T2) in ms at 1.5 T and 3 T (extracellular water, rough; proton
#: density 1): bright on T2 fat-sat / STIR, iso- to slightly hypointense on T1.
EDEMA_PARAMS = {1.5: (2500.0, 150.0), 3.0: (3200.0, 130.0)}

SEQUENCES = ("t1", "t2fs", "stir", "dixon")


@dataclass
class TissueSet:
    """Relaxation parameters of one subject at one field strength (arrays indexed by tissue code)."""

    field_t: float
    rho: np.ndarray      # (n_tissues,) relative proton density
    t1: np.ndarray       # (n_tissues,) water T1 ms
    t2: np.ndarray       # (n_tissues,) water T2 ms
    fat_t1: float
    fat_t2: float
    edema_t1: float
    edema_t2: float

    def as_dict(self) -> dict:
        """JSON-serialisable summary (per tissue name)."""
        names = sorted(TISSUES, key=TISSUES.get)
        return {
            "field_t": self.field_t,
            "water": {n: {"rho": round(float(self.rho[TISSUES[n]]), 4),
                          "t1_ms": round(float(self.t1[TISSUES[n]]), 1),
                          "t2_ms": round(float(self.t2[TISSUES[n]]), 2)} for n in names},
            "fat": {"t1_ms": round(self.fat_t1, 1), "t2_ms": round(self.fat_t2, 2)},
            "edema": {"t1_ms": round(self.edema_t1, 1), "t2_ms": round(self.edema_t2, 2)},
        }


def tissue_set(field_t: float) -> TissueSet:
    """Nominal (literature) tissue parameters at ``field_t`` (1.5 or 3.0 tesla)."""
    if field_t not in (1.5, 3.0):
        raise ValueError(f"field strength must be 1.5 or 3.0 T, got {field_t}")
    n = max(TISSUES.values()) + 1
    rho, t1, t2 = np.zeros(n), np.ones(n) * 1000.0, np.ones(n)
    col = 1 if field_t == 1.5 else 3
    for name, code in TISSUES.items():
        p = WATER_PARAMS[name]
        rho[code], t1[code], t2[code] = p[0], p[col], p[col + 1]
    ft1, ft2 = FAT_PARAMS[field_t]
    et1, et2 = EDEMA_PARAMS[field_t]
    return TissueSet(field_t, rho, t1, t2, ft1, ft2, et1, et2)


def perturb_tissues(ts: TissueSet, rng: np.random.Generator, spread: float = 0.12,
                    fat_t1_spread: float = 0.05) -> TissueSet:
    """Per-subject variation: every rho / T1 / T2 scaled by an independent factor in 1 +- ``spread``
    (fat T1 by 1 +- ``fat_t1_spread``: it decides how well STIR nulls fat, which varies less)."""
    n = len(ts.rho)
    f = lambda size=None, sp=spread: rng.uniform(1.0 - sp, 1.0 + sp, size)  # noqa: E731
    return TissueSet(
        ts.field_t, ts.rho * f(n), ts.t1 * f(n), ts.t2 * f(n),
        ts.fat_t1 * f(sp=fat_t1_spread), ts.fat_t2 * f(), ts.edema_t1 * f(), ts.edema_t2 * f(),
    )


@dataclass
class Sequence:
    """One sequence's parameters. ``kind`` in ``SEQUENCES``; times in ms.

    ``flow_factor`` scales blood signal (flow void on spin echo < 1, inflow on gradient echo >= 1).
    ``fat_residual`` = (min, max) residual fat signal of an imperfect fat saturation (t2fs only).
    """

    kind: str
    tr: float
    te: float
    ti: float | None = None
    flow_factor: float = 1.0
    fat_residual: tuple[float, float] | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-serialisable parameters."""
        d = {"kind": self.kind, "tr_ms": round(self.tr, 1), "te_ms": round(self.te, 1)}
        if self.ti is not None:
            d["ti_ms"] = round(self.ti, 1)
        if self.fat_residual is not None:
            d["fat_residual"] = [round(v, 3) for v in self.fat_residual]
        d["flow_factor"] = round(self.flow_factor, 3)
        d.update(self.extra)
        return d


def draw_sequence(kind: str, field_t: float, rng: np.random.Generator) -> Sequence:
    """Draw a clinically plausible parameter set for ``kind`` at ``field_t``."""
    if kind == "t1":  # spin echo T1, no fat suppression
        return Sequence("t1", rng.uniform(400, 700), rng.uniform(10, 20), flow_factor=rng.uniform(0.05, 0.4))
    if kind == "t2fs":  # fast spin echo T2 with (imperfect) spectral fat saturation
        # residual fat 5-25 %: lowest near the magnet's sweet spot, rising towards the periphery
        lo = rng.uniform(0.05, 0.10)
        return Sequence("t2fs", rng.uniform(3000, 5000), rng.uniform(60, 90),
                        flow_factor=rng.uniform(0.05, 0.4), fat_residual=(lo, rng.uniform(lo + 0.04, 0.25)))
    if kind == "stir":  # inversion recovery; TI drawn around the nominal fat null point T1 ln 2
        ti = FAT_PARAMS[field_t][0] * np.log(2.0) * rng.uniform(0.92, 1.08)
        return Sequence("stir", rng.uniform(3500, 6000), rng.uniform(40, 70), ti=ti,
                        flow_factor=rng.uniform(0.05, 0.4))
    if kind == "dixon":  # low-flip 3D gradient echo, reported as proton densities
        return Sequence("dixon", rng.uniform(5, 8), rng.uniform(1.2, 2.5), flow_factor=rng.uniform(1.0, 1.5),
                        extra={"flip_deg": round(float(rng.uniform(3, 10)), 1)})
    raise ValueError(f"unknown sequence kind {kind!r}")


def _weighting(seq: Sequence, t1, t2):
    """Relaxation weighting (0..1) of a compartment with ``t1``/``t2`` (scalars or arrays) in ``seq``."""
    t1 = np.asarray(t1, dtype=np.float64)
    t2 = np.asarray(t2, dtype=np.float64)
    decay = np.exp(-seq.te / t2)
    if seq.kind in ("t1", "t2fs"):
        return (1.0 - np.exp(-seq.tr / t1)) * decay
    if seq.kind == "stir":  # magnitude inversion recovery
        return np.abs(1.0 - 2.0 * np.exp(-seq.ti / t1) + np.exp(-seq.tr / t1)) * decay
    raise ValueError(f"no relaxation weighting for {seq.kind!r}")


def signal_tables(seq: Sequence, ts: TissueSet) -> dict[str, np.ndarray | float]:
    """Lookup tables for ``simulate``: per tissue code rho*w_water and rho, plus w_edema and w_fat."""
    if seq.kind == "dixon":
        raise ValueError("use dixon_images for Dixon")
    w = _weighting(seq, ts.t1, ts.t2)
    w[TISSUES["vessel"]] *= seq.flow_factor
    w[TISSUES["air"]] = 0.0
    return {
        "rho_w": (ts.rho * w).astype(np.float32),
        "rho": ts.rho.astype(np.float32),
        "w_edema": float(_weighting(seq, ts.edema_t1, ts.edema_t2)),
        "w_fat": float(_weighting(seq, ts.fat_t1, ts.fat_t2)),
    }


def reference_signal(seq: Sequence, ts: TissueSet, tissue: str = "muscle", ff: float = 0.02) -> float:
    """Noise-free signal of a homogeneous voxel of ``tissue`` (used to set SNR in healthy muscle)."""
    if seq.kind == "dixon":
        return float(ts.rho[TISSUES[tissue]] * (1.0 - ff))
    tab = signal_tables(seq, ts)
    code = TISSUES[tissue]
    fat_res = 1.0 if seq.fat_residual is None else float(np.mean(seq.fat_residual))
    return float(tab["rho_w"][code] * (1 - ff) + tab["rho"][code] * ff * tab["w_fat"] * fat_res)


def nonzero_box(volume: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Bounding box (index slices) of the non-zero voxels of ``volume``, or None if all zero."""
    idx = np.flatnonzero(volume)
    if idx.size == 0:
        return None
    ijk = np.unravel_index(idx, volume.shape)
    return tuple(slice(int(a.min()), int(a.max()) + 1) for a in ijk)  # type: ignore[return-value]


def _apply_factor(vol: np.ndarray, factor) -> None:
    """Multiply ``vol`` in place by a scalar, a broadcastable array or a tuple of 1D axis factors."""
    if isinstance(factor, tuple):  # separable field: one 1D factor per axis
        for axis, fac in enumerate(factor):
            shape = [1, 1, 1]
            shape[axis] = -1
            vol *= np.asarray(fac, dtype=np.float32).reshape(shape)
    elif np.isscalar(factor):
        if factor != 1.0:
            vol *= np.float32(factor)
    else:
        vol *= np.asarray(factor, dtype=np.float32)


def simulate(seq: Sequence, ts: TissueSet, tissue: np.ndarray, fat_fraction: np.ndarray,
             edema: np.ndarray, fat_residual=1.0, edema_box="auto") -> np.ndarray:
    """Noise-free signal (float32, same shape as ``tissue``) of ``seq`` for a voxel model.

    ``fat_residual`` multiplies the fat compartment: a scalar, an array broadcastable to the
    volume, or a tuple of three 1D factors (a separable field, applied without a full-size
    temporary) for spatially varying fat suppression. Magnitude sequences only (t1, t2fs, stir).
    Per-tissue lookup tables keep this to a few passes over the volume. ``edema_box``: index box
    holding all non-zero edema (None: no edema; "auto": found here).
    """
    tab = signal_tables(seq, ts)
    water = tab["rho_w"][tissue]                                   # rho * w_water(tissue)
    fat = (tab["rho"] * np.float32(tab["w_fat"]))[tissue]          # rho * w_fat
    box = nonzero_box(edema) if isinstance(edema_box, str) else edema_box
    if box is not None:  # edema replaces part of the tissue water by free water (muscle only)
        w = water[box]
        ed = edema[box].astype(np.float32, copy=False)
        w += ed * (np.float32(tab["w_edema"]) - w)
    _apply_factor(fat, fat_residual)
    # S = water * (1 - ff) + fat * ff = water + ff * (fat - water)
    fat -= water
    fat *= fat_fraction
    water += fat
    _infiltration_density(water, ts, tissue, fat_fraction)
    return water


def _infiltration_density(volume: np.ndarray, ts: TissueSet, tissue: np.ndarray,
                          fat_fraction: np.ndarray) -> None:
    """Scale fatty-infiltrated muscle voxels by their proton density, in place.

    Fatty infiltration replaces muscle by adipose tissue, so a voxel's proton density moves from
    muscle's towards adipose tissue's as its fat fraction rises (a fully replaced voxel looks like
    subcutaneous fat). Without this a 'fatty muscle' voxel would stay darker than fat on T1.
    """
    idx = np.flatnonzero((tissue == TISSUES["muscle"]) & (fat_fraction > 0.03))
    if idx.size == 0:
        return
    rho_m, rho_f = float(ts.rho[TISSUES["muscle"]]), float(ts.rho[TISSUES["fat"]])
    share = np.minimum(fat_fraction.reshape(-1)[idx] / np.float32(0.95), 1.0)
    flat = volume.reshape(-1)
    flat[idx] *= 1.0 + share * np.float32(rho_f / max(rho_m, 1e-6) - 1.0)


def dixon_images(ts: TissueSet, seq: Sequence, tissue: np.ndarray, fat_fraction: np.ndarray,
                 edema: np.ndarray, edema_box="auto") -> tuple[np.ndarray, np.ndarray]:
    """Water and fat proton-density images (float32) of a voxel model; fat/(fat+water) = ff.

    Edema adds free water (raises the water image). Blood gets ``seq.flow_factor`` (inflow).
    Short-T2 tissues (cortical bone, tendon) decay before the echo and are dark in both.
    """
    decay = np.exp(-seq.te / np.maximum(ts.t2, 1e-3) * 0.5)  # T2* < T2; only matters for short T2
    decay = np.where(ts.t2 < 10, decay * 0.3, 1.0)
    dens = (ts.rho * decay).astype(np.float32)
    dens[TISSUES["vessel"]] *= seq.flow_factor
    dens[TISSUES["air"]] = 0.0
    water = dens[tissue]
    _infiltration_density(water, ts, tissue, fat_fraction)
    fat = water * fat_fraction
    water -= fat
    box = nonzero_box(edema) if isinstance(edema_box, str) else edema_box
    if box is not None:
        water[box] *= 1.0 + 0.3 * edema[box].astype(np.float32, copy=False)
    return water, fat


def bias_field_1d(n: int, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A smooth random log-profile along one axis of length ``n`` (low-order Legendre), float32."""
    u = np.linspace(-1.0, 1.0, n)
    coeffs = rng.normal(0.0, 1.0, 4) * np.array([0.0, 1.0, 0.7, 0.4])
    prof = np.polynomial.legendre.legval(u, coeffs)
    prof -= prof.mean()
    span = np.ptp(prof)
    if span > 0:
        prof *= strength / span
    return prof.astype(np.float32)


def bias_field(shape: tuple[int, int, int], rng: np.random.Generator,
               variation: tuple[float, float] = (0.10, 0.40)) -> tuple[np.ndarray, np.ndarray]:
    """Smooth multiplicative bias field for a volume of ``shape`` (I, J, K), K the slice axis.

    Separable low-order log-polynomials along each axis plus an in-plane cross term, scaled so
    that the field's max/min ratio is 1 + a fraction drawn from ``variation``. Returned as two
    float32 factors, ``(f_ij, f_k)`` of shapes (I, J) and (K,): the field is
    ``f_ij[:, :, None] * f_k[None, None, :]`` (kept factored so it costs no full-size temporary).
    """
    target = rng.uniform(*variation)
    li, lj, lk = (bias_field_1d(n, rng, 1.0) for n in shape)
    ui = np.linspace(-1, 1, shape[0], dtype=np.float32)[:, None]
    uj = np.linspace(-1, 1, shape[1], dtype=np.float32)[None, :]
    a, b, c = rng.normal(0, 0.5, 3)
    log_ij = li[:, None] + lj[None, :] + (a * ui * uj + b * ui ** 2 * uj + c * ui * uj ** 2)
    span = float(np.ptp(log_ij) + np.ptp(lk))
    scale = np.log1p(target) / max(span, 1e-6)
    f_ij = np.exp((log_ij - log_ij.mean()) * scale).astype(np.float32)
    f_k = np.exp((lk - lk.mean()) * scale).astype(np.float32)
    return f_ij, f_k


def apply_bias(volume: np.ndarray, bias: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Multiply ``volume`` (I, J, K) in place by a factored field from ``bias_field``."""
    f_ij, f_k = bias
    volume *= f_ij[:, :, None]
    volume *= f_k[None, None, :]
    return volume


def texture_field(shape: tuple[int, int, int], pixel_mm: float, rng: np.random.Generator,
                  amplitude=(0.02, 0.06), grain_mm=(1.5, 4.0)) -> np.ndarray:
    """Mild multiplicative tissue texture (1 + a * smooth unit noise), float32, for an acquisition
    grid of in-plane ``pixel_mm`` (K = slice axis; thick slices get independent patterns).

    Breaks the piecewise-constant look of a label-driven phantom (a network should not learn that
    tissue is perfectly flat); grain and amplitude are drawn per series.
    """
    amp = rng.uniform(*amplitude)
    step = max(1, int(round(rng.uniform(*grain_mm) / pixel_mm)))
    coarse = (-(-shape[0] // step) + 1, -(-shape[1] // step) + 1, shape[2])
    n = rng.standard_normal(coarse, dtype=np.float32)
    n = ndimage.gaussian_filter(n, (0.7, 0.7, 0.0))
    n *= np.float32(amp / max(float(n.std()), 1e-6))
    # linear upsampling as two small matrix products per slice (much faster than ndimage.zoom)
    wx, wy = (_interp_matrix(coarse[a], shape[a], step) for a in (0, 1))
    up = wx @ np.moveaxis(n, 2, 0) @ wy.T          # (K, I, J)
    up += np.float32(1.0)
    return np.moveaxis(up, 0, 2)                   # (I, J, K) view


def _interp_matrix(n_coarse: int, n_fine: int, step: int) -> np.ndarray:
    """(n_fine, n_coarse) linear-interpolation weights, coarse node c at fine index c * step."""
    pos = np.arange(n_fine) / step
    i0 = np.minimum(np.floor(pos).astype(int), n_coarse - 2)
    t = (pos - i0).astype(np.float32)
    w = np.zeros((n_fine, n_coarse), np.float32)
    w[np.arange(n_fine), i0] = 1.0 - t
    w[np.arange(n_fine), i0 + 1] = t
    return w


def add_rician_noise(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of (signal + complex Gaussian noise of std ``sigma`` per channel), in place, float32."""
    n = rng.standard_normal(signal.shape, dtype=np.float32)
    n *= np.float32(sigma)
    signal += n
    np.square(signal, out=signal)
    rng.standard_normal(signal.shape, dtype=np.float32, out=n)
    n *= np.float32(sigma)
    np.square(n, out=n)
    signal += n
    np.sqrt(signal, out=signal)
    return signal


__all__ = [
    "WATER_PARAMS", "FAT_PARAMS", "EDEMA_PARAMS", "SEQUENCES", "TissueSet", "Sequence", "tissue_set",
    "perturb_tissues", "draw_sequence", "signal_tables", "reference_signal", "simulate", "dixon_images",
    "nonzero_box",
    "bias_field", "bias_field_1d", "apply_bias", "texture_field", "add_rician_noise",
]
