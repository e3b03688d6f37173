"""Acquisition and anatomy profiles of the simulated sites.

A :class:`SiteProfile` gathers every knob that differs between hospitals: the C-arm's noise
and blur, how much contrast reached the vessels, how much bone lies in the field of view, how
dense the visible arterial tree is and how large the reconstructed cylinder is. Distinct
profiles make a federation non-IID in the way real sites are (different scanners, injection
protocols and patient positioning), which is what FedAvg has to cope with.

Intensities are in Hounsfield-like units (water 0, air -1000), as in C-arm cone-beam CT.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SiteProfile:
    """Everything that makes one site's volumes look different from another's.

    Lengths are in millimetres, intensities in Hounsfield-like units (HU).
    """

    name: str = "reference"
    # Imaging chain.
    noise_hu: float = 25.0
    """Standard deviation of the noise in soft tissue after blurring (HU)."""
    noise_signal_gain: float = 1.0
    """Poisson-like part: noise variance grows by this factor per 1000 HU of signal."""
    psf_sigma_mm: float = 0.19
    """Standard deviation of the Gaussian point-spread function (0.19 mm is FWHM ~2 voxels)."""
    streak_hu: float = 0.0
    """Peak amplitude of streak artefacts; 0 turns them off."""
    fov_radius: float | None = None
    """Radius of the reconstructed cylinder as a fraction of half the in-plane width;
    None keeps the whole slice. Outside it the scanner writes `outside_hu`."""
    outside_hu: float = -1024.0
    # Contrast and tissue.
    vessel_hu: float = 1000.0
    """Intensity of a fully opacified lumen."""
    contrast_jitter: float = 0.08
    """Relative spread of opacification between branches (incomplete mixing)."""
    tissue_hu: float = 40.0
    texture_hu: float = 12.0
    """Amplitude of the smooth soft-tissue variation."""
    # Bone.
    cortical_hu: float = 1250.0
    """Intensity of cortical bone; overlaps the vessels' on purpose."""
    diploe_hu: float = 550.0
    """Intensity of trabecular bone (diploe, skull base marrow)."""
    bone_amount: float = 1.0
    """Scales skull-base height and calvarium thickness."""
    # Vessel tree.
    trunk_radius_mm: float = 2.1
    """Radius of the internal carotid artery where it enters the field of view."""
    min_radius_mm: float = 0.22
    """Branches thinner than this are not visible and are not grown."""
    length_factor: tuple[float, float] = (8.0, 18.0)
    """Range of the branch-length factor f: length = f * r_trunk^0.7 * r^0.3 voxels,
    shortened in small crops (see phantoms.tree.branch_length)."""
    tortuosity: float = 1.0
    """Scales the random curvature of the centrelines."""
    side_branch_rate: float = 0.5
    """Expected side branches per 10 radii of a parent's length."""
    aneurysm_rate: float = 1.0
    """Expected number of saccular aneurysms per case (at least one when >= 0.5, where a
    large bifurcation has room for it)."""

    def replace(self, **changes: object) -> SiteProfile:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)


DEFAULT_PROFILE = SiteProfile()

SITE_PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile(
        name="site-a-lownoise",
        noise_hu=15.0,
        psf_sigma_mm=0.16,
        vessel_hu=1150.0,
        bone_amount=0.9,
        min_radius_mm=0.2,
        side_branch_rate=0.7,
    ),
    SiteProfile(
        name="site-b-noisy-dense-bone",
        noise_hu=45.0,
        noise_signal_gain=2.0,
        psf_sigma_mm=0.22,
        vessel_hu=850.0,
        cortical_hu=1400.0,
        diploe_hu=650.0,
        bone_amount=1.35,
        streak_hu=160.0,
        trunk_radius_mm=1.9,
        min_radius_mm=0.25,
    ),
    SiteProfile(
        name="site-c-small-fov",
        noise_hu=28.0,
        psf_sigma_mm=0.2,
        vessel_hu=1000.0,
        fov_radius=0.92,
        bone_amount=1.0,
        length_factor=(10.0, 22.0),
        tortuosity=1.4,
        side_branch_rate=0.35,
    ),
    SiteProfile(
        name="site-d-weak-contrast",
        noise_hu=35.0,
        psf_sigma_mm=0.25,
        vessel_hu=700.0,
        contrast_jitter=0.15,
        cortical_hu=1100.0,
        diploe_hu=500.0,
        bone_amount=1.15,
        min_radius_mm=0.28,
        side_branch_rate=0.3,
        streak_hu=80.0,
    ),
)
"""Four distinct acquisition settings; `site_profile` cycles through them."""


def site_profile(k: int, seed: int = 0) -> SiteProfile:
    """Profile of site `k` (1-based): preset `(k-1) mod 4`, jittered by (seed, k).

    The jitter (a few per cent on noise, contrast, blur and bone) keeps sites distinct when
    there are more than four of them and makes each federation seed a different draw, while
    the presets keep the sites' differences large and stable.
    """
    if k < 1:
        raise ValueError(f"site index must be >= 1, got {k}")
    base = SITE_PROFILES[(k - 1) % len(SITE_PROFILES)]
    rng = np.random.default_rng(np.random.SeedSequence([seed, k, 0x51E]))
    jitter = rng.uniform(0.92, 1.08, size=5)
    return base.replace(
        name=f"site{k}-{base.name}",
        noise_hu=base.noise_hu * float(jitter[0]),
        vessel_hu=base.vessel_hu * float(jitter[1]),
        psf_sigma_mm=base.psf_sigma_mm * float(jitter[2]),
        bone_amount=base.bone_amount * float(jitter[3]),
        cortical_hu=base.cortical_hu * float(jitter[4]),
    )
