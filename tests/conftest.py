"""Shared pytest setup: never reach the network; tiny model configs for fast CPU tests."""

from __future__ import annotations

import contextlib
import threading

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
# run.speed: auto caches its timings per machine; tests keep theirs to the session (and out of ~/.cache)
os.environ["FACEREWARD_CACHE_DIR"] = __import__("tempfile").mkdtemp(prefix="facereward-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models: intra-op threads only add overhead, and thrash when the two cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def pixel_config():
    """A pixel-mode RestorerConfig small enough for CPU unit tests."""
    from facereward.models.restorer import PixelUNetConfig, RestorerConfig

    return RestorerConfig(
        mode="pixel",
        size=32,
        pixel=PixelUNetConfig(block_out_channels=[16, 32], attention_levels=[False, True], norm_num_groups=8),
        cleaner_kwargs={"channels": 8, "num_blocks": 1, "downscale": 2},
    )


@pytest.fixture
def latent_config():
    """A latent-mode RestorerConfig (the tiny latent defaults, a small cleaner) at 32 px."""
    from facereward.models.restorer import RestorerConfig

    return RestorerConfig(mode="latent", size=32, cleaner_kwargs={"channels": 8, "num_blocks": 1, "downscale": 2})


@pytest.fixture
def pixel_restorer(pixel_config):
    import torch

    from facereward.models.restorer import Restorer

    torch.manual_seed(0)
    return Restorer.build(pixel_config)


@pytest.fixture
def latent_restorer(latent_config):
    import torch

    from facereward.models.restorer import Restorer

    torch.manual_seed(0)
    return Restorer.build(latent_config)


@pytest.fixture(scope="session")
def make_clip_tokenizer(tmp_path_factory):
    """`make(vocab, merges=(), model_max_length=77)` -> a CLIPTokenizer built from vocab.json and merges.txt files.

    The file constructor is the one transformers 4 (vocab_file, merges_file) and 5 share; 5's `vocab=` dicts are not in 4.
    """
    from transformers import CLIPTokenizer

    def make(vocab: dict[str, int], merges=(), model_max_length: int = 77):
        folder = tmp_path_factory.mktemp("clip-tokenizer")
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)

    return make


# the demo's recipes cut to a few seconds on a 32 px model
TINY_DEMO_REFL = {"train_steps": 2, "batch_size": 2, "sample_steps": 2, "data": {"toy_faces": 8},
                  "dynamic_frm": {"every": 1}, "held_out": {"every": 1, "toy_faces": 2, "sample_steps": 2}}
TINY_DEMO_LRPO = {"epochs": 2, "group_size": 2, "inputs_per_batch": 2, "sample_steps": 3, "reg_steps": 1, "micro_batch": 2,
                  "train_batch_size": 2, "data": {"toy_faces": 4}, "held_out": {"every": 1, "toy_faces": 2, "sample_steps": 2}}


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A whole demo (ReFL, LRPO, evaluation, report) on a tiny 32 px restorer and a tiny FRM: (result, out_dir)."""
    import torch

    from facereward.demo import run_demo
    from facereward.models.frm import FaceRewardModel, FRMConfig
    from facereward.models.restorer import PixelUNetConfig, Restorer, RestorerConfig

    root = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    config = RestorerConfig(mode="pixel", size=32, cleaner_kwargs={"channels": 8, "num_blocks": 1, "downscale": 2},
                            pixel=PixelUNetConfig(block_out_channels=[16, 32], attention_levels=[False, True], norm_num_groups=8))
    Restorer.build(config).save_pretrained(root / "model")
    FaceRewardModel(FRMConfig(backbone="cnn", input_size=32, cnn_widths=[8, 16], cnn_depth=1)).save_pretrained(root / "frm")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_demo(root / "out", n=3, model=root / "model", frm=root / "frm", steps=2, progress=False,
                          refl=TINY_DEMO_REFL, lrpo=TINY_DEMO_LRPO)
    finally:
        torch.set_num_threads(n)
    return result, root / "out"


# ---- a real headless Chromium (Debian's chromium + chromium-driver; scripts/test.sh installs them as root)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROME_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1000",
]


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"needs Debian's {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def no_manager(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("selenium-manager must not run (it downloads drivers)")

    monkeypatch.setattr(SeleniumManager, "binary_paths", no_manager)
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chrome-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # driver.get_log("browser"): the console
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def pixel_dir(tmp_path, pixel_restorer):
    """The tiny pixel restorer saved as a restorer folder (what the trainers' init_from takes)."""
    pixel_restorer.save_pretrained(tmp_path / "pixel")
    return tmp_path / "pixel"


@contextlib.contextmanager
def serve_in_thread(server: Any) -> Iterator[Any]:
    """A local page's server (annotate, study) serving in a daemon thread for the block; shut down after."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
