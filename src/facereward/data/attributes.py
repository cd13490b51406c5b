"""Per-image attributes for sliced evaluation: an attributes CSV, or the traits the toy world knows of its faces.

An attributes CSV has one line per image: its name (file stem or file name) then `attr=value` fields,

    # name,attr=value,...
    0001.png,skin=dark,glasses=yes,pose=left
    0002,skin=light,glasses=no

Blank lines and lines starting with '#' are skipped. A toy test set (`write_toy_testset`) needs no file: its
toyworld.json records the world and the sample, from which every face's traits are recomputed (`toy_attributes`).
"""

from __future__ import annotations

from pathlib import Path

from .toyfaces import TOY_MARKER, ToyFaceWorld, identity_traits, image_spec, read_toy_marker

TOY_ATTRIBUTES = ("skin", "skin_tone", "glasses", "hair", "hair_style", "pose", "expression")
SKIN_GROUPS = {"pale": "light", "fair": "light", "light": "light", "olive": "medium", "tan": "medium", "brown": "dark",
               "dark": "dark"}  # the toy world's seven skin tones in three groups (`skin`; `skin_tone` is the tone)
POSE_YAW = 0.12  # |yaw| (radians) beyond which a toy face counts as turned left or right


def read_attributes_csv(path: str | Path) -> dict[str, dict[str, str]]:
    """{image stem: {attr: value}} from an attributes CSV; a bad line is a one-line ValueError naming FILE:LINE."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such attributes file")
    table: dict[str, dict[str, str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, *fields = [f.strip() for f in line.split(",")]
        stem = Path(name).stem
        if not stem:
            raise ValueError(f"{path}:{number}: the line starts with an empty image name")
        if stem in table:
            raise ValueError(f"{path}:{number}: image {stem!r} is listed twice")
        values: dict[str, str] = {}
        for f in fields:
            if not f:
                continue
            key, sep, value = f.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise ValueError(f"{path}:{number}: expected attr=value, got {f!r}")
            values[key.strip()] = value.strip()
        table[stem] = values
    if not table:
        raise ValueError(f"{path}: no attribute lines")
    return table


def _pose(yaw: float) -> str:
    return "left" if yaw < -POSE_YAW else ("right" if yaw > POSE_YAW else "frontal")


def toy_attributes(testset: str | Path) -> dict[str, dict[str, str]]:
    """{image stem: traits} of a toy test set (`write_toy_testset`'s, or a toyfaces folder degraded by `degrade`): skin
    (light/medium/dark) and skin_tone, glasses (yes/no), hair colour and style, pose (left/frontal/right by yaw) and
    expression, recomputed from its toyworld.json (world seed, sample seed)."""
    testset = Path(testset)
    info = read_toy_marker(testset)
    if info is None:
        raise ValueError(f"{testset}: not a toy test set (no {TOY_MARKER}); give an attributes CSV")
    world = ToyFaceWorld(int(info["world_seed"]), int(info["n_identities"]), float(info.get("test_fraction", 0.2)))
    split = info.get("split") or "test"
    if "identities" in info and "sample_seed" in info:  # write_toy_testset: faces 0000, 0001, ... in sample order
        identities = [int(i) for i in info["identities"]]
        keys = world.sample_keys(len(identities), split, int(info["sample_seed"]))
        if [k[0] for k in keys] != identities:
            raise ValueError(f"{testset}/{TOY_MARKER}: its identities do not match the toy world it names")
        names = [f"{i:04d}" for i in range(len(keys))]
    elif "count" in info and "sample_seed" in info:  # a toyfaces images folder, or a test set degraded from one
        keys = world.sample_keys(int(info["count"]), split, int(info["sample_seed"]))
        names = [f"{k:0{int(info['name_width'])}d}" for k in range(len(keys))]
    else:
        raise ValueError(f"{testset}/{TOY_MARKER}: it does not record its sample (made by an older facereward); make the "
                         "faces again with `facereward toyfaces`, or give an attributes CSV")
    table = {}
    for name, (identity, index) in zip(names, keys):
        traits, spec = identity_traits(world.seed, identity), image_spec(world.seed, identity, index)
        table[name] = {"skin": SKIN_GROUPS[traits.skin_name], "skin_tone": traits.skin_name,
                       "glasses": "yes" if traits.glasses else "no", "hair": traits.hair_name,
                       "hair_style": traits.hair_style, "pose": _pose(spec.yaw), "expression": spec.expression}
    return table


__all__ = ["POSE_YAW", "SKIN_GROUPS", "TOY_ATTRIBUTES", "read_attributes_csv", "toy_attributes"]
