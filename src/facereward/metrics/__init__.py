"""Deprecated (one release): metrics are the measures of `facereward.measures`."""
