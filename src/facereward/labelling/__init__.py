"""Preference labelling (docs/methods.md 1.1): the toy oracle (labels with no person) and the automatic labeller."""

from facereward.labelling.auto import (
    AutoLabeller,
    FullReferenceFeatures,
    auto_labeller_agreement,
)
from facereward.labelling.oracle import (
    build_toy_preferences,
    label_candidates,
    oracle_label,
)

__all__ = [
    "AutoLabeller",
    "FullReferenceFeatures",
    "auto_labeller_agreement",
    "build_toy_preferences",
    "label_candidates",
    "oracle_label",
]
