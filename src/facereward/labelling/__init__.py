"""Preference labelling (METHODS.md 1.1): the toy oracle (no person needed) and the automatic labeller."""

from facereward.labelling.oracle import (
    build_toy_preferences,
    label_candidates,
    oracle_label,
    toy_quality,
    write_toy_paired_set,
)

__all__ = ["build_toy_preferences", "label_candidates", "oracle_label", "toy_quality", "write_toy_paired_set"]
