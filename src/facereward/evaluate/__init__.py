"""`facereward evaluate`: the BFR benchmark table (docs/methods.md 3) for several methods side by side.

`evaluate(config)` scores a paired test set (`paired.py`) or whole photos without GT (`photos.py`); the columns are
measures of `facereward.measures` (`columns.py`); `outputs.py` writes and reads back the results.
"""

from __future__ import annotations

from facereward.plugins import import_plugins

from .columns import DEFAULT_MEASURES, build_columns
from .config import EvaluateConfig, sampler_options
from .outputs import (
    EvaluateResult,
    evaluation_grid,
    format_value,
    markdown_table,
    redraw_grid,
)
from .paired import evaluate_paired
from .photos import evaluate_photos, face_crops


def evaluate(config: EvaluateConfig) -> EvaluateResult:
    """Import the plugins, then score `config.photos` (whole photos) or `config.testset`; writes OUT/results.* and grid.png."""
    import_plugins(config.imports, option="imports")
    return evaluate_photos(config) if config.photos else evaluate_paired(config)


__all__ = ["DEFAULT_MEASURES", "EvaluateConfig", "EvaluateResult", "build_columns", "evaluate", "evaluate_paired",
           "evaluate_photos", "evaluation_grid", "face_crops", "format_value", "markdown_table", "redraw_grid",
           "sampler_options"]
