"""Deprecated (one release): `facereward.measures` is the table; `register_metric` registers an old-style factory there."""

from facereward.measures import format_measure_table as format_metric_table
from facereward.measures import get_measure as get_metric
from facereward.measures import list_measures as list_metrics
from facereward.measures import register_metric
from facereward.measures import unregister_measure as unregister_metric

__all__ = ["format_metric_table", "get_metric", "list_metrics", "register_metric", "unregister_metric"]
