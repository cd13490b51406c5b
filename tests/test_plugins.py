"""Plugin modules: one importer for rewards, metrics and degradations; a user's degradation reaches every command."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from facereward.cli import app
from facereward.data.degradation import _REGISTRY, list_degradations
from facereward.data.training_data import DataConfig, build_dataset
from facereward.plugins import import_plugins

PLUGIN = """
from facereward.data.degradation import DegradationPreset, register_degradation
register_degradation("{name}", DegradationPreset(name="{name}", blur_sigma=(0.1, 0.2), downsample=(1, 1.5),
                                                 noise_sigma=(0, 1), jpeg_quality=(95, 100)), overwrite=True)
"""


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "my_degradations.py"
    path.write_text(PLUGIN.format(name="test-mild"))
    yield path
    _REGISTRY.unregister("test-mild")


def test_import_plugins_imports_a_file_once_and_same_named_files_apart(tmp_path):
    for sub, name in (("a", "test-a"), ("b", "test-b")):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "degs.py").write_text(PLUGIN.format(name=name) + "COUNT = globals().get('COUNT', 0) + 1\n")
    try:
        import_plugins([str(tmp_path / "a" / "degs.py"), str(tmp_path / "b" / "degs.py")], option="x")
        import_plugins([str(tmp_path / "a" / "degs.py")], option="x")  # again: a no-op
        assert {"test-a", "test-b"} <= set(list_degradations())
        modules = [m for n, m in sys.modules.items() if n.startswith("facereward_plugin_degs_")]
        assert len(modules) == 2 and all(m.COUNT == 1 for m in modules)
    finally:
        _REGISTRY.unregister("test-a")
        _REGISTRY.unregister("test-b")
    with pytest.raises(FileNotFoundError, match="--degradation-module: no such file"):
        import_plugins([str(tmp_path / "missing.py")], option="--degradation-module")
    with pytest.raises(ValueError, match="data.imports: cannot import 'no_such_module_xyz'"):
        import_plugins(["no_such_module_xyz"], option="data.imports")


def test_a_broken_plugin_is_not_left_half_imported(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    for _ in range(2):  # the second import runs the file again instead of finding a half-made module
        with pytest.raises(RuntimeError, match="boom"):
            import_plugins([str(bad)], option="x")


def test_imports_register_the_preset_for_training(plugin):
    with pytest.raises(ValueError, match=r"data.preset: unknown degradation 'test-mild' \(known: .*diffbir.*--degradation-module"):
        build_dataset(DataConfig(toy_faces=2, size=32, preset="test-mild"))
    import_plugins([str(plugin)], option="imports")  # what every trainer does with its config's `imports` first
    dataset = build_dataset(DataConfig(toy_faces=2, size=32, preset="test-mild"))
    assert dataset[0]["lq"].shape == (3, 32, 32)


def test_data_imports_names_its_new_key():
    from facereward.config import ConfigError, load_config
    from facereward.train.base import TrainBaseConfig

    with pytest.raises(ConfigError, match=r"data.imports was renamed: use imports \(at the top level"):
        load_config(TrainBaseConfig, None, ["data.imports=[x.py]"])


def test_degrade_command_takes_a_degradation_module(tmp_path, plugin):
    hq = tmp_path / "hq_in"
    hq.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(hq / "a.png")
    result = CliRunner().invoke(app, ["degrade", "--preset", "test-mild", "--degradation-module", str(plugin), "--no-progress",
                                      str(hq), str(tmp_path / "set")])
    assert result.exit_code == 0, result.output
    assert '"preset": "test-mild"' in (tmp_path / "set" / "manifest.json").read_text()
