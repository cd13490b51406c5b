"""Identity (IDS, Deg) and landmark (LMD) metrics: dlib models on a real face, a fabricated ArcFace ONNX."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from facereward.data.degradation import degrade
from facereward.data.imageio import image_to_tensor
from facereward.measures.identity import (
    ArcFaceOnnxEmbedder,
    DlibIdentityEmbedder,
    IdentityEmbedder,
    get_identity_embedder,
    identity_degrees,
    identity_scores,
    identity_similarity,
    list_identity_embedders,
)
from facereward.measures.landmarks import (
    DlibLandmarkDetector,
    LandmarkDetector,
    get_landmark_detector,
    landmark_distance,
    landmark_scores,
)

# The astronaut's face: a 200x200 crop of skimage.data.astronaut(), about 4.5 eye distances wide
# (FFHQ-aligned crops are about 4). Eye centres read off the image by eye, in crop pixels (x, y).
CROP_ROWS, CROP_COLS = slice(30, 230), slice(122, 322)
RIGHT_EYE_XY = (81.0, 71.0)  # the subject's right eye, on the image's left (iBUG points 36-41)
LEFT_EYE_XY = (124.0, 74.0)  # iBUG points 42-47


@pytest.fixture(scope="module")
def astronaut_face() -> np.ndarray:
    from skimage.data import astronaut

    return astronaut()[CROP_ROWS, CROP_COLS].astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def dlib_embedder() -> DlibIdentityEmbedder:
    return DlibIdentityEmbedder()


@pytest.fixture(scope="module")
def dlib_detector() -> DlibLandmarkDetector:
    return DlibLandmarkDetector()


# --------------------------------------------------------------------------- formulas


def test_ids_and_deg_hand_computed() -> None:
    a = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 0.0]])
    b = torch.tensor([[0.5, math.sqrt(3) / 2, 0.0], [-5.0, 0.0, 0.0], [0.0, 0.0, 0.1], [2.0, 2.0, 0.0]])
    # 60 degrees apart, opposite, orthogonal, same direction at another length
    assert torch.allclose(identity_similarity(a, b), torch.tensor([0.5, -1.0, 0.0, 1.0], dtype=torch.float64), atol=1e-7)
    assert torch.allclose(identity_degrees(a, b), torch.tensor([60.0, 180.0, 90.0, 0.0], dtype=torch.float64), atol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        identity_similarity(a, b[:2])


def test_lmd_hand_computed() -> None:
    ref = torch.rand(2, 68, 2) * 100
    shift = torch.zeros(2, 68, 2)
    shift[0] += torch.tensor([3.0, 4.0])  # every landmark 5 px off
    shift[1, :34] += torch.tensor([0.0, 2.0])  # half of them 2 px off -> mean 1
    assert torch.allclose(landmark_distance(ref + shift, ref), torch.tensor([5.0, 1.0], dtype=torch.float64), atol=1e-4)
    with pytest.raises(ValueError, match="same shape"):
        landmark_distance(ref, ref[:, :5])


# --------------------------------------------------------------------------- dlib on a real face


def test_dlib_identical_images_give_ids_1_deg_0(dlib_embedder, astronaut_face) -> None:
    x = image_to_tensor(astronaut_face)
    scores = identity_scores(dlib_embedder, x, x.clone())
    assert abs(scores["ids"].item() - 1.0) < 1e-5
    assert abs(scores["deg"].item()) < 1e-5
    emb = dlib_embedder.embed(x)
    assert emb.shape == (1, 128) and dlib_embedder.dim == 128
    assert torch.allclose(emb.norm(dim=1), torch.ones(1), atol=1e-5)
    assert isinstance(dlib_embedder, IdentityEmbedder) and dlib_embedder.name == "dlib-resnet128"


def test_dlib_finds_the_astronaut_and_her_eyes(dlib_detector, astronaut_face) -> None:
    pts = dlib_detector.detect(image_to_tensor(astronaut_face))
    assert pts.shape == (1, 68, 2) and pts.dtype == torch.float32
    assert dlib_detector.last_detected == [True]
    assert isinstance(dlib_detector, LandmarkDetector)
    for idx, (ex, ey) in ((slice(36, 42), RIGHT_EYE_XY), (slice(42, 48), LEFT_EYE_XY)):
        cx, cy = pts[0, idx].mean(dim=0).tolist()
        assert abs(cx - ex) < 10 and abs(cy - ey) < 10, (cx, cy, ex, ey)


def test_identity_and_lmd_grow_with_degradation(dlib_embedder, dlib_detector, astronaut_face) -> None:
    """dlib Deg and LMD to the clean crop grow with the diffbir strength (seed 0, index 0).

    Measured (200x200 crop): strength 0.0 / 0.25 / 0.5 / 0.8 ->
    1-IDS 0.0002 / 0.062 / 0.130 / 0.164, Deg 1.1 / 20.3 / 29.5 / 33.2, LMD 0.29 / 1.86 / 3.21 / 6.94 px.
    The face is detected up to 0.25 and falls back to the inset whole-image box from 0.3 on.
    (Seed 1 and a 256 px resize of the crop keep the same order at these levels.)
    """
    strengths = [0.0, 0.25, 0.5, 0.8]
    hq = image_to_tensor(astronaut_face)
    lq = torch.cat([image_to_tensor(degrade(astronaut_face, "diffbir", seed=0, index=0, strength=s)[0]) for s in strengths])
    ref = hq.expand_as(lq)
    ident = identity_scores(dlib_embedder, lq, ref)
    assert dlib_embedder.last_detected[:2] == [True, True] and all(dlib_embedder.last_detected[4:])
    lmd = landmark_scores(dlib_detector, lq, ref)["lmd"]
    for dist in (1.0 - ident["ids"], ident["deg"], lmd):
        assert torch.all(dist[1:] >= dist[:-1]), dist
        assert dist[-1] > dist[0], dist
    assert ident["deg"][0] < 5.0 and ident["deg"][-1] > 20.0
    assert lmd[0] < 1.0 and lmd[-1] > 3.0


def test_dlib_fallback_without_a_face(dlib_embedder, dlib_detector) -> None:
    blank = torch.full((2, 3, 64, 64), 0.5)
    emb = dlib_embedder.embed(blank)
    assert dlib_embedder.last_detected == [False, False]
    assert torch.isfinite(emb).all() and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    pts = dlib_detector.detect(blank)
    assert dlib_detector.last_detected == [False, False]
    assert pts.shape == (2, 68, 2) and (pts >= 0).all() and (pts <= 63).all()


def test_dlib_missing_model_files_name_the_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="shape_predictor_5_face_landmarks.dat"):
        DlibIdentityEmbedder(models_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        DlibLandmarkDetector(models_dir=tmp_path)


# --------------------------------------------------------------------------- ArcFace ONNX (fabricated)

_W = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
_BIAS = np.linspace(-1.0, 1.0, 8, dtype=np.float32)


def _tiny_arcface(path, input_shape=(None, 3, 112, 112)) -> None:
    """input.1 -> GlobalAveragePool -> Flatten -> MatMul(3x8) -> Add(bias) -> (N, 8)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("GlobalAveragePool", ["input.1"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["683"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [input_shape[0], 8])],
        [numpy_helper.from_array(_W, "W"), numpy_helper.from_array(_BIAS, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _hand_arcface(images: torch.Tensor) -> np.ndarray:
    import cv2

    out = []
    for img in images:
        u8 = np.round(img.permute(1, 2, 0).clamp(0, 1).numpy() * 255.0).astype(np.uint8)  # RGB, HWC
        if u8.shape[:2] != (112, 112):
            u8 = cv2.resize(u8, (112, 112), interpolation=cv2.INTER_LINEAR)
        x = (u8.astype(np.float32) - 127.5) / 127.5
        v = x.mean(axis=(0, 1)) @ _W + _BIAS
        out.append(v / np.linalg.norm(v))
    return np.stack(out)


def test_arcface_onnx_preprocessing_and_output(tmp_path) -> None:
    path = tmp_path / "tiny_r50.onnx"
    _tiny_arcface(path)
    emb = ArcFaceOnnxEmbedder(path)
    assert emb.name == "arcface:tiny_r50" and emb.dim == 8 and emb.dynamic_batch
    assert isinstance(emb, IdentityEmbedder)
    gen = torch.Generator().manual_seed(0)
    # channels with distinct levels, so an RGB/BGR swap or a wrong scale changes the answer
    images = torch.rand(3, 3, 112, 112, generator=gen) * torch.tensor([0.9, 0.5, 0.1]).view(1, 3, 1, 1)
    out = emb.embed(images)
    assert out.shape == (3, 8) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-6)
    np.testing.assert_allclose(out.numpy(), _hand_arcface(images), atol=1e-5)
    # non-112 input is resized (bilinear, on uint8) like cv2.dnn.blobFromImages
    big = torch.rand(2, 3, 150, 130, generator=gen)
    np.testing.assert_allclose(emb.embed(big).numpy(), _hand_arcface(big), atol=1e-5)
    # a fixed batch of one runs image by image and gives the same numbers
    fixed = tmp_path / "fixed.onnx"
    _tiny_arcface(fixed, (1, 3, 112, 112))
    emb1 = get_identity_embedder("arcface", path=fixed)
    assert not emb1.dynamic_batch
    np.testing.assert_allclose(emb1.embed(images).numpy(), out.numpy(), atol=1e-6)


def test_arcface_onnx_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.onnx"):
        ArcFaceOnnxEmbedder(tmp_path / "nowhere.onnx")
    wrong = tmp_path / "wrong.onnx"
    _tiny_arcface(wrong, (None, 3, 64, 64))
    with pytest.raises(ValueError, match=r"3 x 112 x 112"):
        ArcFaceOnnxEmbedder(wrong)
    with pytest.raises(ValueError, match="needs path"):
        get_identity_embedder("arcface")


# --------------------------------------------------------------------------- registries


def test_unknown_names_list_the_known_ones() -> None:
    assert {"dlib", "arcface"} <= set(list_identity_embedders())
    with pytest.raises(ValueError, match=r"unknown identity embedder 'nope'.*arcface.*dlib"):
        get_identity_embedder("nope")
    with pytest.raises(ValueError, match=r"unknown landmark detector 'nope'.*dlib"):
        get_landmark_detector("nope")
