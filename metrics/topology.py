"""Topology-aware metrics: clDice with its two parts, and the Betti-0 (component count) error.

clDice (Shit et al., "clDice - a Novel Topology-Preserving Loss Function for Tubular Structure
Segmentation", CVPR 2021, eqs. 1-3), with V_P, V_L the predicted and ground-truth masks and
S_P, S_L their skeletons:

- topology precision  Tprec(S_P, V_L) = |S_P ∩ V_L| / |S_P|   (clPr)
- topology sensitivity Tsens(S_L, V_P) = |S_L ∩ V_P| / |S_L|  (clRe)
- clDice = 2 Tprec Tsens / (Tprec + Tsens)

These names follow the paper. The official clDice code (``clDice`` in jocpae/clDice) computes
``tprec = cl_score(v_p, skeletonize(v_l))``, i.e. the paper's sensitivity, and swaps the two
names; clDice itself is symmetric and unaffected. clRe and clPr here are the paper's Tsens and
Tprec, the recall-like and precision-like parts (in the seed paper's Table 1 clRe tracks Re and
clPr tracks Pr, as these definitions imply).

Skeletons are ``skimage.morphology.skeletonize`` (Lee et al. 1994 thinning in 3D), as the
SHINY-ICARUS scorer uses.
"""

from __future__ import annotations

from typing import NamedTuple

import cc3d
import numpy as np
from skimage.morphology import skeletonize

from metrics.masks import MaskPair, prepare, ratio


class ClDice(NamedTuple):
    """clDice and its parts: ``clre`` = topology sensitivity, ``clpr`` = topology precision."""

    cldice: float
    clre: float
    clpr: float


def skeleton(mask: np.ndarray) -> np.ndarray:
    """Skeleton of a bool mask by ``skimage.morphology.skeletonize``.

    Objects too small to thin vanish completely (a 2x2x2 cube has an empty skeleton); a
    non-empty mask whose whole skeleton is empty is its own skeleton here, so that clDice
    stays defined where the official code divides by zero.
    """
    skel = skeletonize(mask)
    return skel if skel.any() or not mask.any() else mask.copy()


def harmonic_mean(a: float, b: float) -> float:
    """``2ab / (a + b)``, and 0.0 where both are 0."""
    return 2.0 * a * b / (a + b) if a + b > 0 else 0.0


def cldice_of(pair: MaskPair) -> ClDice:
    skel_pred, skel_gt = skeleton(pair.pred), skeleton(pair.gt)
    tprec = ratio(np.count_nonzero(skel_pred & pair.gt), np.count_nonzero(skel_pred), pair)
    tsens = ratio(np.count_nonzero(skel_gt & pair.pred), np.count_nonzero(skel_gt), pair)
    cl = 1.0 if pair.both_empty else harmonic_mean(tprec, tsens)
    return ClDice(cldice=cl, clre=tsens, clpr=tprec)


def cldice(pred: np.ndarray, gt: np.ndarray) -> ClDice:
    """clDice = 2 Tprec Tsens / (Tprec + Tsens) (Shit et al., CVPR 2021).

    ``clpr`` = Tprec = |S_P ∩ V_L| / |S_P| (the predicted skeleton inside the ground truth),
    ``clre`` = Tsens = |S_L ∩ V_P| / |S_L| (the ground-truth skeleton inside the prediction),
    named as in the paper, not as in the official code, which swaps them.
    Both masks empty: (1, 1, 1); exactly one empty: (0, 0, 0).
    """
    return cldice_of(prepare(pred, gt))


def count_components(mask: np.ndarray) -> int:
    """Number of 26-connected foreground components (Betti-0) by ``cc3d``."""
    if not mask.any():
        return 0
    _, n = cc3d.connected_components(np.ascontiguousarray(mask), connectivity=26, return_N=True)
    return int(n)


def betti0_error_of(pair: MaskPair) -> int:
    return abs(count_components(pair.pred) - count_components(pair.gt))


def betti0_error(pred: np.ndarray, gt: np.ndarray) -> int:
    """Betti-0 error ``|b0(S) - b0(G)|``, b0 = number of 26-connected components.

    Compares the number of connected components only, not where they are (Hu et al.,
    "Topology-Preserving Deep Image Segmentation", NeurIPS 2019, use Betti-number errors).
    """
    return betti0_error_of(prepare(pred, gt))
