"""Shared pytest setup: never reach the network; tiny model configs for fast CPU tests."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

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
