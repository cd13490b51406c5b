"""Import the user's plugin modules (rewards, metrics, degradations): one mechanism for every registry."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path


def import_plugins(imports: Sequence[str], option: str) -> None:
    """Import each module name or .py file once, so its `register_*` calls run; errors name `option`.

    A file is imported under a name derived from its resolved path, so two files called `my.py` in
    different folders are both imported, and importing the same file again is a no-op.
    """
    for spec in imports:
        spec = str(spec)
        if spec.endswith(".py"):
            path = Path(spec)
            if not path.is_file():
                raise FileNotFoundError(f"{option}: no such file {path}")
            digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
            module_name = f"facereward_plugin_{path.stem}_{digest}"
            if module_name in sys.modules:
                continue
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            try:
                loader_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
        else:
            try:
                importlib.import_module(spec)
            except ModuleNotFoundError as err:
                raise ValueError(f"{option}: cannot import {spec!r} ({err})") from None
