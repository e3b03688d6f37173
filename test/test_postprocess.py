"""Connected-component cleaning: physical, relative and confidence thresholds, 26-connectivity."""

import numpy as np
import pytest
from helpers import write_weights

from inference.predictor import Predictor, PredictorSettings
from inference.preprocessing import Geometry
from postprocess import DEFAULT_SETTINGS, CleaningSettings, clean_mask, component_sizes


def tree_with_fragments() -> np.ndarray:
    """A 1500-voxel bar (the "tree"), a 27-voxel cube and a 100-voxel block, apart."""
    mask = np.zeros((40, 40, 40), np.uint8)
    mask[5:35, 10:15, 10:15] = 1  # 30 * 25 = 750 voxels
    mask[5:35, 15:20, 10:15] = 1  # tree: 1500 voxels in total
    mask[30:33, 30:33, 30:33] = 1  # 27 voxels
    mask[2:6, 30:35, 2:7] = 1  # 100 voxels
    return mask


def test_components_below_the_physical_volume_are_dropped():
    mask = tree_with_fragments()
    # 1 mm voxels: the 27 mm^3 cube goes at 50 mm^3, the 100 mm^3 block stays
    cleaned = clean_mask(mask, (1.0, 1.0, 1.0), CleaningSettings(50.0, 0.0))
    assert cleaned.dtype == np.uint8 and set(np.unique(cleaned)) == {0, 1}
    assert cleaned.sum() == 1500 + 100
    assert cleaned[31, 31, 31] == 0 and cleaned[3, 32, 4] == 1


def test_the_threshold_is_physical_so_spacing_matters():
    mask = tree_with_fragments()
    # at 0.5 mm voxels the 100-voxel block is 12.5 mm^3: below 50 mm^3, dropped too
    cleaned = clean_mask(mask, (0.5, 0.5, 0.5), CleaningSettings(50.0, 0.0))
    assert cleaned.sum() == 1500


def test_components_far_smaller_than_the_largest_are_dropped():
    mask = tree_with_fragments()
    cleaned = clean_mask(mask, (1.0, 1.0, 1.0), CleaningSettings(0.0, 0.05))  # 5 % of 1500 = 75
    assert cleaned.sum() == 1500 + 100
    cleaned = clean_mask(mask, (1.0, 1.0, 1.0), CleaningSettings(0.0, 0.1))  # 150 voxels
    assert cleaned.sum() == 1500


def test_diagonal_neighbours_are_one_component_with_26_connectivity():
    mask = np.zeros((20, 20, 20), np.uint8)
    for i in range(15):  # a chain touching only at corners
        mask[i, i, i] = 1
    labels, sizes = component_sizes(mask)
    assert len(sizes) == 2 and sizes[1] == 15
    kept = clean_mask(mask, (1.0, 1.0, 1.0), CleaningSettings(10.0, 0.0))
    assert kept.sum() == 15  # 15 mm^3 as one piece survives a 10 mm^3 threshold


def test_zero_thresholds_and_empty_masks_change_nothing():
    mask = tree_with_fragments()
    np.testing.assert_array_equal(clean_mask(mask, (1, 1, 1), CleaningSettings(0.0, 0.0)), mask)
    empty = np.zeros((8, 8, 8), bool)
    assert clean_mask(empty, (1, 1, 1)).sum() == 0


def test_settings_come_from_the_manifest_with_defaults_and_overrides():
    assert CleaningSettings.from_dict({}) == DEFAULT_SETTINGS
    settings = CleaningSettings.from_dict({"min_volume_mm3": 5}, min_fraction_of_largest=0.2)
    assert settings == CleaningSettings(5.0, 0.2)
    unchanged = CleaningSettings.from_dict({"min_volume_mm3": 5}, min_volume_mm3=None)
    assert unchanged.min_volume_mm3 == 5
    with pytest.raises(ValueError, match="unknown postprocess settings"):
        CleaningSettings.from_dict({"min_size": 3})
    with pytest.raises(ValueError, match="out of range"):
        CleaningSettings.from_dict({"min_fraction_of_largest": 2})
    with pytest.raises(ValueError, match="out of range"):
        CleaningSettings.from_dict({"min_peak_probability": 1.5})


def confidence_of(mask: np.ndarray) -> np.ndarray:
    """A probability map over ``tree_with_fragments``: the tree and the small cube seen with
    certainty (0.99 at their cores), the larger block never above 0.7."""
    probability = np.where(mask > 0, 0.6, 0.1).astype(np.float32)
    probability[20, 12, 12] = probability[31, 31, 31] = 0.99
    probability[3, 32, 4] = 0.7
    return probability


def test_confidence_keeps_small_certain_pieces_and_drops_uncertain_ones_whatever_their_size():
    mask = tree_with_fragments()
    probability = confidence_of(mask)
    cleaned = clean_mask(mask, (1, 1, 1), CleaningSettings(0.0, 0.0, 0.9), probability)
    assert cleaned.sum() == 1500 + 27  # the 100-voxel block goes, the 27-voxel cube stays
    assert cleaned[31, 31, 31] == 1 and cleaned[3, 32, 4] == 0
    # the size rule cannot tell them apart: it keeps the block and drops the cube
    by_size = clean_mask(mask, (1, 1, 1), CleaningSettings(50.0, 0.0))
    assert by_size[31, 31, 31] == 0 and by_size[3, 32, 4] == 1
    # at 0.7 the block's peak reaches the bar: nothing goes
    kept = clean_mask(mask, (1, 1, 1), CleaningSettings(0.0, 0.0, 0.7), probability)
    np.testing.assert_array_equal(kept, mask)


def test_confidence_without_the_probability_map_is_a_clear_error():
    mask = tree_with_fragments()
    with pytest.raises(ValueError, match="needs the probability map"):
        clean_mask(mask, (1, 1, 1), CleaningSettings(0.0, 0.0, 0.9))
    with pytest.raises(ValueError, match="needs the probability map"):
        clean_mask(mask, (1, 1, 1), CleaningSettings(0.0, 0.0, 0.9), np.zeros((4, 4, 4)))


def test_the_predictor_cleans_by_the_confidence_its_manifest_asks_for(tmp_path):
    cleaning = {"min_volume_mm3": 0.0, "min_fraction_of_largest": 0.0, "min_peak_probability": 0.9}
    write_weights(tmp_path, folds=1, postprocess=cleaning)
    predictor = Predictor(tmp_path, PredictorSettings(device="cpu", backend="torch"))
    mask = tree_with_fragments()
    geometry = Geometry(mask.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    cleaned, volume_mm3 = predictor.mask_of(confidence_of(mask), geometry)
    assert cleaned.sum() == 1500 + 27 and volume_mm3 == 1527.0
