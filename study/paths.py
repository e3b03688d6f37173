"""Where the study keeps its data, runs and results: one root, absolute, never the cwd."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
ROOT_VARIABLE = "VESSEL_SEG_STUDY_DIR"


@dataclass(frozen=True)
class StudyPaths:
    root: Path

    @classmethod
    def at(cls, root: str | Path | None = None) -> StudyPaths:
        """``root``, else ``$VESSEL_SEG_STUDY_DIR``, else the repository's ``work/study``."""
        chosen = root or os.environ.get(ROOT_VARIABLE) or REPOSITORY / "work" / "study"
        return cls(Path(chosen).expanduser().resolve())

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def results(self) -> Path:
        return self.root / "results"

    def weights(self, run_folder: str) -> Path:
        return self.runs / run_folder / "weights"
