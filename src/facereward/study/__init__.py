"""A blind pairwise user study between restoration methods (`facereward study`) and its statistics (`study-results`)."""

from .results import (
    Answer,
    StudyResultsError,
    analyse,
    bradley_terry,
    cohen_kappa,
    fleiss_kappa,
    load_answers,
    percent_agreement,
    wilson_interval,
    write_results,
)
from .server import StudyError, StudySession, make_server, parse_method_args, run_study

__all__ = [
    "Answer",
    "StudyError",
    "StudyResultsError",
    "StudySession",
    "analyse",
    "bradley_terry",
    "cohen_kappa",
    "fleiss_kappa",
    "load_answers",
    "make_server",
    "parse_method_args",
    "percent_agreement",
    "run_study",
    "wilson_interval",
    "write_results",
]
