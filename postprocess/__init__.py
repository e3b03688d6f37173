"""Connected-component cleaning of vessel masks."""

from postprocess.components import (
    DEFAULT_SETTINGS,
    CleaningSettings,
    clean_mask,
    component_sizes,
)

__all__ = ["DEFAULT_SETTINGS", "CleaningSettings", "clean_mask", "component_sizes"]
