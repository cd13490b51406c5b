"""facereward.measures.weightfile: the shared weight-file reader and strict layout check, on tiny fabricated files."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from facereward.measures.weightfile import check_layout, file_label, read_state_dict

SD = {"a.weight": torch.ones(2, 3), "a.bias": torch.zeros(2, dtype=torch.float16)}
LAYOUT = {"a.weight": (2, 3), "a.bias": (2,)}


class _Opaque:
    pass


def _save(path, obj):
    torch.save(obj, path)
    return path


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


def _same(got, want):
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_pth_and_safetensors_read_the_same(tmp_path):
    p = _save(tmp_path / "w.pth", SD)
    s = tmp_path / "w.safetensors"
    save_file(SD, str(s))
    for path in (p, str(p), s):
        got = read_state_dict(path, "X")
        _same(got, SD)
        assert got["a.bias"].dtype == torch.float16  # the reader converts nothing


def test_params_wrapper_and_module_prefix(tmp_path):
    wrapped = _save(tmp_path / "wrapped.pth", {"params": {f"module.{k}": v for k, v in SD.items()}, "iter": 3})
    _same(read_state_dict(wrapped, "X", unwrap=("params",), strip_prefix="module."), SD)
    # only what the caller asks for: no unwrapping, no stripping
    with pytest.raises(ValueError, match=r"^X weight file .*wrapped\.pth does not hold a flat \{name: tensor\} state "
                                         r"dict \(entry 'params' is dict\)$") as e:  # fmt: skip
        read_state_dict(wrapped, "X")
    _one_line(e)
    prefixed = _save(tmp_path / "prefixed.pth", {f"module.{k}": v for k, v in SD.items()})
    assert set(read_state_dict(prefixed, "X")) == {"module.a.weight", "module.a.bias"}
    # stripped key by key, as pyiqa's clean_state_dict: a partly prefixed file reads too, a collision does not
    mixed = _save(tmp_path / "mixed.pth", {"module.a.weight": SD["a.weight"], "a.bias": SD["a.bias"]})
    _same(read_state_dict(mixed, "X", strip_prefix="module."), SD)
    clash = _save(tmp_path / "clash.pth", {"module.a.bias": SD["a.bias"], "a.bias": SD["a.bias"]})
    with pytest.raises(ValueError, match=r"clash\.pth: two keys become 'a\.bias' once the prefix 'module\.' is"):
        read_state_dict(clash, "X", strip_prefix="module.")
    # a "params" entry that is not a dict is not a wrapper: the file is read as it is
    flat = _save(tmp_path / "flat.pth", {**SD, "params": torch.zeros(1)})
    assert set(read_state_dict(flat, "X", unwrap=("params",))) == {"a.weight", "a.bias", "params"}


def test_pickled_object_refused_naming_the_global(tmp_path):
    p = _save(tmp_path / "unsafe.pth", {"a.weight": _Opaque()})
    with pytest.raises(ValueError) as e:
        read_state_dict(p, "MUSIQ (koniq10k)", pickled_hint="re-save it as a state dict")
    assert _one_line(e) == (
        f"MUSIQ (koniq10k) weight file {p} is not a plain tensor state dict: it holds pickled Python objects "
        f"({__name__}._Opaque), refused by torch.load(weights_only=True); re-save it as a state dict"
    )
    q = tmp_path / "module.pt"
    with open(q, "wb") as f:
        pickle.dump({"net": torch.nn.Linear(2, 2)}, f, protocol=2)
    with pytest.raises(ValueError, match=r"\(torch\.nn\.modules\.linear\.Linear\), refused by torch\.load\(weights_only="
                                         r"True\)$"):  # fmt: skip
        read_state_dict(q, "X")


def test_unreadable_non_dict_and_missing_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=rf"^X heads file {junk} could not be read \(UnpicklingError: Unsupported operand"):
        read_state_dict(junk, "X", "heads")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pth could not be read \(EOFError"):
        read_state_dict(empty, "X")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(ValueError, match=r"bad\.safetensors is not a readable safetensors file \(SafetensorError") as e:
        read_state_dict(bad_st, "X")
    _one_line(e)
    for name, obj, got in [("list.pth", [torch.zeros(1)], "got list"), ("tensor.pth", torch.zeros(3), "got Tensor"),
                           ("nested.pth", {"a": {"b": torch.zeros(1)}}, "entry 'a' is dict"),
                           ("intkey.pth", {0: torch.zeros(1)}, "entry 0 is Tensor")]:
        p = _save(tmp_path / name, obj)
        with pytest.raises(ValueError, match=rf"{name} does not hold a flat \{{name: tensor\}} state dict "
                                             rf"\(bare or under 'params'; {got}\)$"):  # fmt: skip
            read_state_dict(p, "X", unwrap=("params",))
    gone = tmp_path / "gone.pth"
    with pytest.raises(FileNotFoundError, match=rf"^X weights file not found: {gone} \(expected released\.pth\)$"):
        read_state_dict(gone, "X", "weights", expected="released.pth")
    with pytest.raises(FileNotFoundError, match=rf"^X weight file not found: {tmp_path}$"):  # a folder is not a file
        read_state_dict(tmp_path, "X")
    with pytest.raises(ValueError, match=r"^X: no weight file given \(expected released\.pth\)$"):
        read_state_dict(None, "X", expected="released.pth")
    assert file_label("X", "heads", str(junk)) == f"X heads file {junk}"


def test_check_layout_accepts_and_converts():
    got = check_layout(SD, LAYOUT, "W")
    assert list(got) == list(LAYOUT) and all(t.dtype == torch.float32 for t in got.values())
    assert torch.equal(got["a.bias"], torch.zeros(2))


@pytest.mark.parametrize(
    "sd, match",
    [
        ({"a.weight": SD["a.weight"]}, r"^W: key 'a\.bias' missing \(expected in the toy layout\)$"),
        ({**SD, "a.bias": torch.zeros(3)}, r"^W: key 'a\.bias' has shape \(3,\), expected \(2,\) in the toy layout$"),
        ({**SD, "b": torch.zeros(1), "c": torch.zeros(1)},
         r"^W: unexpected key 'b' \(2 unexpected in all; not in the toy layout\)$"),
        ({**SD, "a.weight": torch.ones(2, 3, dtype=torch.long)},
         r"^W: key 'a\.weight' has dtype torch\.int64, expected a float tensor$"),
        ({**SD, "a.weight": torch.ones(2, 3, dtype=torch.complex64)}, r"has dtype torch\.complex64, expected a float"),
    ],
    ids=["missing", "shape", "unexpected", "integer", "complex"],
)
def test_check_layout_refusals(sd, match):
    with pytest.raises(ValueError, match=match) as e:
        check_layout(sd, LAYOUT, "W", layout_name="the toy layout")
    _one_line(e)


def test_check_layout_optional_integer_keys_and_hint():
    layout = {**LAYOUT, "bn.num_batches_tracked": (), "index": (2, 2)}
    opts = dict(integer_keys=("bn.num_batches_tracked", "index"), optional=("bn.num_batches_tracked",))
    idx = torch.zeros(2, 2, dtype=torch.int32)
    got = check_layout({**SD, "index": idx}, layout, "W", **opts)  # the optional counter may be absent
    assert "bn.num_batches_tracked" not in got and got["index"] is idx  # integer tensors come back unchanged
    got = check_layout({**SD, "index": idx, "bn.num_batches_tracked": torch.tensor(7)}, layout, "W", **opts)
    assert int(got["bn.num_batches_tracked"]) == 7
    with pytest.raises(ValueError, match=r"^W: key 'index' missing$"):  # integer but not optional
        check_layout(SD, layout, "W", **opts)
    for bad in (torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"^W: key 'index' has dtype torch\.(float32|bool), expected an integer"):
            check_layout({**SD, "index": bad}, layout, "W", **opts)
    with pytest.raises(ValueError, match=r"^W: key 'bn\.num_batches_tracked' has shape \(1,\), expected \(\)$"):
        check_layout({**SD, "index": idx, "bn.num_batches_tracked": torch.tensor([7])}, layout, "W", **opts)

    seen = []

    def hint(key, sd):
        seen.append((key, key in sd))
        return "an ava file?" if key == "a.bias" else ""

    with pytest.raises(ValueError, match=r"^W: key 'a\.bias' missing \(expected in L; an ava file\?\)$"):
        check_layout({"a.weight": SD["a.weight"]}, LAYOUT, "W", layout_name="L", hint=hint)
    with pytest.raises(ValueError, match=r"^W: unexpected key 'z' \(1 unexpected in all; not in L\)$"):
        check_layout({**SD, "z": torch.zeros(1)}, LAYOUT, "W", layout_name="L", hint=hint)
    assert seen == [("a.bias", False), ("z", True)]
