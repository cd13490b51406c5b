"""Preference annotation: a local web page where people label pairs of candidate restorations."""

from .server import AnnotationError, AnnotationSession, make_server, run_annotate, serve

__all__ = ["AnnotationError", "AnnotationSession", "make_server", "run_annotate", "serve"]
