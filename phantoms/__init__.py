"""Synthetic 3D rotational angiography (3DRA) volumes with exact vessel labels.

A tortuous arterial tree (internal carotid artery entering through the skull base, Murray
bifurcations, saccular aneurysms) is drawn into a head with a skull base and calvarium whose
intensities overlap the contrast-filled vessels', then blurred, made noisy and quantised to
16 bits like a C-arm cone-beam reconstruction. The label is the lumen, one 26-connected
component. Sites (:func:`site_profile`) differ in noise, blur, contrast, bone, field of view
and vessel density, so a federation built from them is non-IID.

    from phantoms import generate_case, write_dataset
    image, label = generate_case((128, 128, 128), seed=3)   # SimpleITK images
    write_dataset("data/phantoms", cases=10, shape=(128, 128, 128), seed=0, sites=3)

Command line: ``python -m phantoms --help`` (datasets), ``python -m phantoms.preview --help``
(maximum-intensity projections with a mask overlaid).
"""

from phantoms.dataset import case_seed, write_dataset
from phantoms.generator import Phantom, generate_case, generate_volume
from phantoms.profiles import DEFAULT_PROFILE, SITE_PROFILES, SiteProfile, site_profile

__all__ = [
    "DEFAULT_PROFILE",
    "SITE_PROFILES",
    "Phantom",
    "SiteProfile",
    "case_seed",
    "generate_case",
    "generate_volume",
    "site_profile",
    "write_dataset",
]
