"""Read a measure's local weight file and check it against a key layout: the one reader of the measure modules.

:func:`read_state_dict` turns a local file into a flat ``{name: tensor}`` dict without running pickled code:

* a missing file: ``FileNotFoundError`` naming it;
* ``.safetensors``: ``safetensors.torch.load_file``; any other suffix (``.pth``, ``.pt``, ``.bin``):
  ``torch.load(path, map_location="cpu", weights_only=True)``. A pickle holding Python objects other than tensors
  (a whole ``nn.Module``, a custom class) is refused, naming the first offending global;
* optional wrappers (``unwrap``, e.g. pyiqa's ``{"params": state_dict}``): the first name whose entry is itself a dict
  is taken, other top-level entries ignored; a prefix (``strip_prefix``, e.g. ``"module."`` of DataParallel) is
  removed from every key that has it, as pyiqa's ``clean_state_dict`` does (two keys that then coincide are an error);
* the result must be a flat dict of string keys to tensors.

:func:`check_layout` is the strict key check: every layout key present with exactly its shape and a float dtype (an
integer dtype for ``integer_keys``), no other key (``optional`` ones may be absent); float tensors come back as
float32.

Every failure is one line naming the file (``"MUSIQ (koniq10k) weight file PATH: key 'x' missing ..."``).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["check_layout", "file_label", "read_state_dict"]

_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def file_label(who: str, what: str, path: str | Path) -> str:
    """The subject of every message about the file: ``"{who} {what} file {path}"``."""
    return f"{who} {what} file {Path(path)}"


def _first_line(text: str, default: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), default)


def _torch_load(path: Path, where: str, pickled_hint: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL.search(str(e))
        if found is None:  # damaged, or not a pickle at all
            detail = _first_line(str(e).split("WeightsUnpickler error:")[-1], "unreadable pickle")
            raise ValueError(f"{where} could not be read (UnpicklingError: {detail})") from None
        raise ValueError(
            f"{where} is not a plain tensor state dict: it holds pickled Python objects ({found.group(1)}), refused by "
            f"torch.load(weights_only=True){'; ' + pickled_hint if pickled_hint else ''}"
        ) from None
    except Exception as e:  # a truncated or foreign file fails in many ways; each is one line
        raise ValueError(f"{where} could not be read ({type(e).__name__}: {_first_line(str(e), 'no detail')})") from None


def read_state_dict(
    path: str | Path | None,
    who: str,
    what: str = "weight",
    *,
    expected: str = "",
    unwrap: tuple[str, ...] = (),
    strip_prefix: str | None = None,
    pickled_hint: str = "",
) -> dict[str, Tensor]:
    """The ``{name: tensor}`` dict held by the local file ``path`` (see the module docstring for the rules).

    ``who`` / ``what`` label the messages (``file_label``); ``expected`` (a released file name) is added to the
    not-found message; ``pickled_hint`` to the message refusing pickled objects.
    """
    if path is None:
        raise ValueError(f"{who}: no {what} file given{f' (expected {expected})' if expected else ''}")
    path = Path(path)
    where = file_label(who, what, path)
    if not path.is_file():
        raise FileNotFoundError(f"{who} {what} file not found: {path}{f' (expected {expected})' if expected else ''}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError, OSError, ...
            detail = _first_line(str(e), "no detail")
            raise ValueError(f"{where} is not a readable safetensors file ({type(e).__name__}: {detail})") from None
    else:
        obj = _torch_load(path, where, pickled_hint)
    if isinstance(obj, Mapping):
        wrapper = next((k for k in unwrap if isinstance(obj.get(k), Mapping)), None)
        if wrapper is not None:
            obj = obj[wrapper]
    bad = None
    if not isinstance(obj, Mapping):
        bad = f"got {type(obj).__name__}"
    else:
        for k, v in obj.items():
            if not isinstance(k, str) or not isinstance(v, Tensor):
                bad = f"entry {k!r} is {type(v).__name__}"
                break
    if bad is not None:
        under = f"bare or under {' / '.join(map(repr, unwrap))}; " if unwrap else ""
        raise ValueError(f"{where} does not hold a flat {{name: tensor}} state dict ({under}{bad})")
    if not strip_prefix:
        return dict(obj)
    out: dict[str, Tensor] = {}
    for k, v in obj.items():
        name = k.removeprefix(strip_prefix)
        if name in out:
            raise ValueError(f"{where}: two keys become '{name}' once the prefix '{strip_prefix}' is stripped")
        out[name] = v
    return out


def check_layout(
    sd: Mapping[str, Tensor],
    layout: Mapping[str, tuple[int, ...]],
    where: str,
    *,
    layout_name: str = "",
    integer_keys: Collection[str] = (),
    optional: Collection[str] = (),
    hint: Callable[[str, Mapping[str, Tensor]], str] | None = None,
) -> dict[str, Tensor]:
    """Strictly check ``sd`` against ``layout`` (key -> shape); the checked tensors, float ones as float32.

    Every layout key must be present (those in ``optional`` may be absent) with exactly its shape and a floating
    dtype, or an integer one for ``integer_keys`` (returned unchanged); any key outside ``layout`` is an error.
    Each failure is one ``ValueError`` line starting with ``where`` and naming the key; ``layout_name`` (e.g.
    ``"pyiqa's MANIQA layout"``) says what was expected, ``hint(key, sd)`` may add a hint to a missing
    (``key not in sd``) or unexpected (``key in sd``) key's message.
    """

    def note(key: str, *parts: str) -> str:  # " (part; part; hint)" for a missing or unexpected key
        said = [p for p in (*parts, hint(key, sd) if hint is not None else "") if p]
        return f" ({'; '.join(said)})" if said else ""

    integer_keys, optional = set(integer_keys), set(optional)
    expected = f"expected in {layout_name}" if layout_name else ""
    out: dict[str, Tensor] = {}
    for key, shape in layout.items():
        if key not in sd:
            if key in optional:
                continue
            raise ValueError(f"{where}: key '{key}' missing{note(key, expected)}")
        t = sd[key]
        if tuple(t.shape) != tuple(shape):
            within = f" in {layout_name}" if layout_name else ""
            raise ValueError(f"{where}: key '{key}' has shape {tuple(t.shape)}, expected {tuple(shape)}{within}")
        if key in integer_keys:
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"{where}: key '{key}' has dtype {t.dtype}, expected an integer tensor")
            out[key] = t
        elif not t.is_floating_point():
            raise ValueError(f"{where}: key '{key}' has dtype {t.dtype}, expected a float tensor")
        else:
            out[key] = t.to(torch.float32)
    extra = [k for k in sd if k not in layout]
    if extra:
        outside = f"not in {layout_name}" if layout_name else ""
        raise ValueError(f"{where}: unexpected key '{extra[0]}'{note(extra[0], f'{len(extra)} unexpected in all', outside)}")
    return out
