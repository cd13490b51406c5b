"""Whole photos on real faces (skimage's astronaut): detection, FFHQ alignment, paste-back, restore_photo,
`restore --photos` with the bad-input battery, and `evaluate --photos`."""

from __future__ import annotations

import re
import tracemalloc

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image
from typer.testing import CliRunner

from facereward.cli import app
from facereward.data.faces import FaceDetector, alignment_affine, feather_mask, ffhq_template, paste_face, warp_face
from facereward.data.imageio import ImageError, read_photo
from facereward.photos import clean_photo, restore_photo, restore_photo_files, upscale_background
from facereward.weights import WEIGHTS_DIR, default_restorer_path

runner = CliRunner()
STEPS = 2  # DDIM steps for the toy restorer: the tests check the plumbing, not the restoration


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.ascontiguousarray(skimage.data.astronaut())


@pytest.fixture(scope="module")
def hog() -> FaceDetector:
    return FaceDetector("hog")


@pytest.fixture(scope="module")
def toy():
    from facereward.models.restorer import Restorer

    return Restorer.from_pretrained(default_restorer_path())


@pytest.fixture(scope="module")
def astronaut_face(astronaut, hog):
    faces = hog.detect(astronaut)
    assert len(faces) == 1
    return faces[0]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def similarity_lstsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama): the best any similarity can do on these points."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rot = u @ sign @ vt
    scale = np.trace(np.diag(sig) @ sign) / s.var(0).sum()
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.c_[points, np.ones(len(points))] @ matrix.T


# --------------------------------------------------------------------------- detection and alignment


def test_cnn_hog_and_haar_find_the_astronaut(astronaut, astronaut_face):
    cnn = FaceDetector("cnn").detect(astronaut)
    haar = FaceDetector("haar").detect(astronaut)
    assert len(cnn) == 1 and len(haar) == 1
    lm = astronaut_face.landmarks
    x0, y0, x1, y1 = astronaut_face.box
    assert np.all((lm[:, 0] > x0) & (lm[:, 0] < x1) & (lm[:, 1] > y0) & (lm[:, 1] < y1))
    # FFHQ order: left eye, right eye (in the image), nose tip, mouth corners left and right
    assert lm[0, 0] < lm[2, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]
    assert lm[:2, 1].max() < lm[2, 1] < lm[3:, 1].min()
    eye_distance = np.linalg.norm(lm[1] - lm[0])
    for other in (cnn[0], haar[0]):  # the same face whichever box the predictor starts from
        assert np.linalg.norm(other.landmarks - lm, axis=1).max() < 0.15 * eye_distance


def test_without_dlib_files_the_haar_fallback_still_aligns(tmp_path, astronaut, astronaut_face):
    with pytest.warns(UserWarning, match="falling back to OpenCV's Haar cascade"):
        fallback = FaceDetector("cnn", models_dir=tmp_path)  # an empty folder: no .dat files
    assert fallback.kind == "haar" and fallback.predictor is None
    (face,) = fallback.detect(astronaut)
    lm = astronaut_face.landmarks
    assert np.linalg.norm(face.landmarks - lm, axis=1).max() < 0.25 * np.linalg.norm(lm[1] - lm[0])


def test_aligned_crop_points_land_on_the_template(astronaut, hog, astronaut_face):
    lm = astronaut_face.landmarks
    matrix = alignment_affine(lm, 512)
    crop = np.round(warp_face(astronaut, matrix, 512) * 255).astype(np.uint8)
    again = hog.detect(crop)
    assert len(again) == 1
    found = again[0].landmarks
    # the crop is where the transform says: re-detected eyes and nose within 2 px of the mapped points at 512 px
    # (mouth corners: the predictor's own repeatability is about 4 px there)
    assert np.linalg.norm(found - apply(matrix, lm), axis=1)[:3].max() < 2.0
    assert np.linalg.norm(found - apply(matrix, lm), axis=1)[3:].max() < 5.0
    # at the restorer's crop size (the toy model's 64 px) the points land on the template: eyes and nose within
    # 2 px; the mouth corners within 3 px, as the astronaut's smile is wider than the mean face's
    err64 = np.linalg.norm(found / 8 - ffhq_template(64), axis=1)
    assert err64[:3].max() < 2.0 and err64[3:].max() < 3.0
    # and LMEDS (facexlib's fit) is about as close as any similarity gets
    best = np.linalg.norm(apply(similarity_lstsq(lm, ffhq_template(512)), lm) - ffhq_template(512), axis=1).mean()
    ours = np.linalg.norm(apply(matrix, lm) - ffhq_template(512), axis=1).mean()
    assert ours < 1.15 * best


@pytest.mark.parametrize("size", [512, 64])
def test_pasting_back_an_unchanged_crop_reproduces_the_photo(astronaut, astronaut_face, size):
    matrix = alignment_affine(astronaut_face.landmarks, size)
    crop = warp_face(astronaut, matrix, size)
    canvas = astronaut.copy()
    region = paste_face(canvas, crop, matrix)
    assert region is not None
    x0, y0, x1, y1 = (int(round(v)) for v in astronaut_face.box)
    mask = feather_mask(astronaut.shape[:2], cv2.invertAffineTransform(matrix), size)
    assert np.array_equal(canvas[mask == 0], astronaut[mask == 0])  # identical outside the mask
    assert (mask[y0:y1, x0:x1] > 0.99).mean() > 0.9  # the face box is (nearly) all face
    if size == 512:
        assert psnr(canvas[y0:y1, x0:x1], astronaut[y0:y1, x0:x1]) > 40
    else:  # a 64 px crop of a 90 px face loses detail, and only that
        assert psnr(canvas[y0:y1, x0:x1], astronaut[y0:y1, x0:x1]) > 25  # 27.9 dB


def test_paste_back_onto_an_upscaled_background_is_in_place(astronaut, astronaut_face):
    matrix = alignment_affine(astronaut_face.landmarks, 512)
    crop = warp_face(astronaut, matrix, 512)
    background = upscale_background(astronaut, 2.0)
    canvas = background.copy()
    paste_face(canvas, crop, matrix, upscale=2.0)
    x0, y0, x1, y1 = (int(round(2 * v)) for v in astronaut_face.box)
    assert psnr(canvas[y0:y1, x0:x1], background[y0:y1, x0:x1]) > 35  # a half-pixel shift would give ~28 dB


# --------------------------------------------------------------------------- restore_photo


def test_restore_photo_on_the_astronaut(astronaut, hog, toy):
    out, faces = restore_photo(toy, astronaut, hog, steps=STEPS)
    assert out.shape == astronaut.shape and out.dtype == np.uint8
    assert len(faces) == 1 and faces[0].status == "restored"
    face = faces[0]
    assert face.crop.shape == face.restored.shape == (64, 64, 3) and face.affine.shape == (2, 3)
    mask = feather_mask(astronaut.shape[:2], cv2.invertAffineTransform(face.affine), 64)
    assert np.array_equal(out[mask == 0], astronaut[mask == 0])
    x0, y0, x1, y1 = (int(round(v)) for v in face.box)
    assert np.abs(out[y0:y1, x0:x1].astype(int) - astronaut[y0:y1, x0:x1]).mean() > 1  # the face was replaced

    # the same faces, given: float in, float out; 2x bicubic; alpha kept; the stage-1 cleaner as background
    as_float, _ = restore_photo(toy, astronaut.astype(np.float32) / 255, steps=STEPS, faces=[_detected(face)])
    assert as_float.dtype == np.float32 and np.abs(as_float * 255 - out).max() < 1.5
    alpha = np.tile(np.linspace(0, 255, 512).astype(np.uint8), (512, 1))
    big, _ = restore_photo(toy, np.dstack([astronaut, alpha]), steps=STEPS, upscale=2, faces=[_detected(face)])
    assert big.shape == (1024, 1024, 4)
    assert np.abs(big[..., 3].astype(int) - cv2.resize(alpha, (1024, 1024), interpolation=cv2.INTER_LINEAR)).max() == 0
    cleaned, _ = restore_photo(toy, astronaut, steps=STEPS, background="cleaner", faces=[_detected(face)])
    assert cleaned.shape == astronaut.shape and not np.array_equal(cleaned[mask == 0], astronaut[mask == 0])


def _detected(face):
    from facereward.data.faces import DetectedFace

    return DetectedFace(box=face.box, score=face.score, landmarks=face.landmarks)


def test_clean_photo_in_tiles_matches_one_tile(astronaut, toy):
    image = np.ascontiguousarray(astronaut[40:184, 150:278])  # 144 x 128: three 96 px tiles each way
    whole = clean_photo(toy, image, tile=1024)
    assert np.array_equal(clean_photo(toy, image, tile=96, overlap=32), whole)  # the toy cleaner sees < 32 px
    odd = np.ascontiguousarray(astronaut[40:190, 150:281])  # sizes the cleaner's stride does not divide: padded
    assert clean_photo(toy, odd, tile=96, overlap=32).shape == odd.shape


def group_photo(placements, shape=(600, 900)):
    """The astronaut's face pasted at (cx, cy, scale, degrees) on a smooth background, and each placement's 2x3 map."""
    face = skimage.data.astronaut().astype(np.float32)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    photo = np.stack([90 + 60 * xx / w, 120 + 40 * yy / h, 150 - 50 * xx / w], -1).astype(np.float32)
    cx0, cy0 = 223, 125  # the astronaut's face centre
    yy, xx = np.mgrid[0:512, 0:512]
    disc = np.clip((95 - np.hypot(xx - cx0, yy - cy0)) / 20, 0, 1).astype(np.float32)
    maps = []
    for cx, cy, scale, angle in placements:
        m = cv2.getRotationMatrix2D((cx0, cy0), angle, scale)
        m[:, 2] += (cx - cx0, cy - cy0)
        warped = cv2.warpAffine(face, m, (w, h), flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        alpha = cv2.warpAffine(disc, m, (w, h))[..., None]
        photo = alpha * warped + (1 - alpha) * photo
        maps.append(m)
    return np.clip(np.round(photo), 0, 255).astype(np.uint8), maps


# four faces of 50-120 px at -15..20 degrees, and one of about 35 px that --min-face 45 leaves
GROUP = [(200, 200, 1.3, 0), (520, 180, 1.0, 20), (760, 260, 0.8, -15), (400, 460, 0.6, 10), (700, 500, 0.35, 0)]


@pytest.fixture(scope="module")
def group():
    return group_photo(GROUP)


def test_group_photo_every_face_above_min_face_is_restored(group, hog, toy, astronaut_face):
    photo, maps = group
    out, faces = restore_photo(toy, photo, hog, steps=STEPS, min_face=45)
    assert len(faces) == len(GROUP)
    restored = [f for f in faces if f.status == "restored"]
    left = [f for f in faces if f.status != "restored"]
    assert len(restored) == 4 and len(left) == 1 and "smaller than --min-face 45" in left[0].status
    # each placed face is found where it was put (eyes within 10% of its eye distance)
    for m, scale in zip(maps, [p[2] for p in GROUP]):
        want = apply(m, astronaut_face.landmarks)
        tolerance = 0.1 * np.linalg.norm(want[1] - want[0])
        assert min(np.linalg.norm(f.landmarks[:2] - want[:2], axis=1).max() for f in faces) < tolerance
    small = left[0]
    sx0, sy0, sx1, sy1 = (int(v) for v in small.box)
    assert np.array_equal(out[sy0:sy1, sx0:sx1], photo[sy0:sy1, sx0:sx1])  # left as it is
    for f in restored:
        x0, y0, x1, y1 = (int(round(v)) for v in f.box)
        assert np.abs(out[y0:y1, x0:x1].astype(int) - photo[y0:y1, x0:x1]).mean() > 1

    detections = [_detected(f) for f in faces]
    _, two = restore_photo(toy, photo, steps=STEPS, max_faces=2, faces=detections)
    assert [f.status for f in two][:2] == ["restored", "restored"]
    assert all(f.status == "over --max-faces 2" for f in two[2:4])
    _, centre = restore_photo(toy, photo, steps=STEPS, only_center_face=True, faces=detections)
    chosen = [f for f in centre if f.status == "restored"]
    assert len(chosen) == 1 and abs((chosen[0].box[0] + chosen[0].box[2]) / 2 - 520) < 30  # (520, 180) is nearest (450, 300)


def test_huge_photo_is_detected_on_a_small_copy_without_a_full_size_float_copy(hog, toy, astronaut):
    huge = np.full((8000, 8000, 3), 120, dtype=np.uint8)
    face = cv2.resize(astronaut[20:240, 110:330], (1320, 1320), interpolation=cv2.INTER_CUBIC)
    huge[3000:4320, 5000:6320] = face
    tracemalloc.start()
    out, faces = restore_photo(toy, huge, hog, steps=STEPS)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.shape == huge.shape and [f.status for f in faces] == ["restored"]
    assert 5000 < faces[0].box[0] < 5600 and 3000 < faces[0].box[1] < 3600
    assert peak < 1.6 * huge.nbytes  # the output canvas plus crops; a float32 copy alone would be 4x


# --------------------------------------------------------------------------- files and the command line


def test_read_photo_modes_and_orientation(tmp_path, astronaut):
    rgb = astronaut[::4, ::4].copy()  # 128 x 128
    Image.fromarray(rgb[..., 0], mode="L").save(tmp_path / "gray.png")
    assert np.array_equal(read_photo(tmp_path / "gray.png").rgb, np.repeat(rgb[..., :1], 3, axis=2))
    cv2.imwrite(str(tmp_path / "gray16.png"), np.full((8, 8), 40000, np.uint16))
    assert read_photo(tmp_path / "gray16.png").rgb[0, 0].tolist() == [156, 156, 156]  # scaled, not clipped at 255
    rgb16 = rgb.astype(np.uint16) * 257
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])
    assert np.array_equal(read_photo(tmp_path / "rgb16.png").rgb, rgb)
    alpha = np.tile(np.arange(128, dtype=np.uint8) * 2, (128, 1))
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(tmp_path / "rgba.png")
    photo = read_photo(tmp_path / "rgba.png")
    assert np.array_equal(photo.rgb, rgb) and np.array_equal(photo.alpha, alpha)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    assert np.abs(read_photo(tmp_path / "palette.png").rgb.astype(int) - rgb).mean() < 12
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert read_photo(tmp_path / "cmyk.jpg").rgb.shape == rgb.shape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": stored turned a quarter anticlockwise
    Image.fromarray(np.ascontiguousarray(np.rot90(rgb))).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    photo = read_photo(tmp_path / "turned.jpg")
    assert photo.exif_rotated and np.abs(photo.rgb.astype(int) - rgb).mean() < 6
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "random.png").write_bytes(np.random.default_rng(0).bytes(4000))
    Image.fromarray(rgb).save(tmp_path / "whole.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:1500])
    for name in ("zero.png", "random.png", "cut.jpg"):
        with pytest.raises(ImageError, match=re.escape(str(tmp_path / name))) as err:
            read_photo(tmp_path / name)
        assert "\n" not in str(err.value)


def _battery(folder, astronaut) -> dict[str, tuple[int, int]]:
    """The bad-input battery: three bad files and nine good ones; returns the good ones' (width, height)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    (folder / "zero.png").write_bytes(b"")
    Image.fromarray(astronaut).save(folder / "whole.jpg")
    (folder / "truncated.jpg").write_bytes((folder / "whole.jpg").read_bytes()[:5000])
    (folder / "whole.jpg").unlink()
    (folder / "random.png").write_bytes(rng.bytes(20000))
    exif = Image.Exif()
    exif[0x0112] = 8  # stored a quarter turn clockwise: only EXIF makes the face upright
    Image.fromarray(np.ascontiguousarray(np.rot90(astronaut, -1))).save(folder / "astronaut.jpg", exif=exif, quality=95)
    Image.fromarray(astronaut[..., 1], mode="L").save(folder / "gray.png")
    alpha = np.full((512, 512), 255, np.uint8)
    alpha[:, :100] = 0
    Image.fromarray(np.dstack([astronaut, alpha]), mode="RGBA").save(folder / "rgba.png")
    cv2.imwrite(str(folder / "deep16.png"), (astronaut.astype(np.uint16) * 257)[..., ::-1])
    Image.fromarray(astronaut).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    huge = np.full((8000, 8000, 3), 200, np.uint8)
    huge[3000:4320, 5000:6320] = cv2.resize(astronaut[20:240, 110:330], (1320, 1320), interpolation=cv2.INTER_CUBIC)
    Image.fromarray(huge).save(folder / "huge.png", compress_level=1)
    Image.fromarray(rng.integers(0, 255, (3, 3, 3), dtype=np.uint8)).save(folder / "tiny.png")
    Image.fromarray(np.ascontiguousarray(skimage.data.coffee())).save(folder / "noface.jpg")
    return {"astronaut": (512, 512), "gray": (512, 512), "rgba": (512, 512), "deep16": (512, 512), "palette": (512, 512),
            "huge": (8000, 8000), "tiny": (3, 3), "noface": (600, 400)}


def test_restore_photos_cli_bad_input_battery(tmp_path, astronaut):
    good = _battery(tmp_path / "in", astronaut)
    out = tmp_path / "out"
    result = runner.invoke(app, ["restore", "--photos", str(tmp_path / "in"), str(out), "--detector", "hog",
                                 "--steps", str(STEPS), "--no-progress"])
    assert result.exit_code == 1, result.output  # something failed
    lines = result.output.splitlines()
    for bad in ("zero.png", "truncated.jpg", "random.png"):
        named = [line for line in lines if bad in line]
        assert len(named) == 1 and named[0].startswith("skipped "), result.output
    assert any("noface.jpg: no face found" in line for line in lines)
    assert any("tiny.png: no face found" in line for line in lines)
    closing = lines[-1]
    assert f"of {len(good) + 3} photos to {out} in " in closing and "3 failed" in closing
    restored = int(re.search(r"restored (\d+) faces in (\d+) of", closing).group(1))
    assert restored == 6  # astronaut (upright by EXIF), gray, rgba, 16-bit, palette, huge
    for stem, size in good.items():
        with Image.open(out / f"{stem}.png") as im:
            assert im.size == size, stem
            if stem == "rgba":
                assert im.mode == "RGBA" and np.array_equal(np.asarray(im)[..., 3], np.asarray(Image.open(tmp_path / "in" / "rgba.png"))[..., 3])
    assert not (out / "zero.png").exists()  # (exit status 0 when nothing fails: the group test below)


def test_restore_photos_cli_group_min_face_and_save_faces(tmp_path, group):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(group[0]).save(folder / "group.png")
    out = tmp_path / "out"
    result = runner.invoke(app, ["restore", "--photos", str(folder), str(out), "--detector", "hog", "--min-face", "45",
                                 "--save-faces", "--steps", str(STEPS), "--no-progress", "--upscale", "2"])
    assert result.exit_code == 0, result.output
    assert "group.png: face at" in result.output and "smaller than --min-face 45" in result.output
    assert "restored 4 faces in 1 of 1 photos" in result.output
    assert Image.open(out / "group.png").size == (1800, 1200)
    for kind in ("lq", "restored", "compare"):
        assert len(list((out / "faces" / kind).glob("group_*.png"))) == 4
    import json

    manifest = json.loads((out / "photos.json").read_text())
    assert [f["status"] == "restored" for f in manifest["group.png"]["faces"]].count(True) == 4


def test_photo_options_need_photos(tmp_path):
    result = runner.invoke(app, ["restore", str(tmp_path), str(tmp_path / "o"), "--min-face", "30"])
    assert result.exit_code == 2 and "--min-face only apply with --photos" in result.output


def test_restore_photo_files_report(tmp_path, astronaut, hog, toy):
    Image.fromarray(astronaut).save(tmp_path / "a.png")
    report = restore_photo_files(toy, [tmp_path / "a.png"], tmp_path / "o", detector=hog, steps=STEPS, progress=False)
    assert report.written == [tmp_path / "o" / "a.png"] and report.faces_restored == 1 and not report.failed
    assert set(report.timings) == {"detect", "align", "restore", "background", "paste"} and report.seconds > 0


def test_evaluate_photos_scores_faces_with_no_reference_metrics(tmp_path, astronaut):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(astronaut).save(folder / "astronaut.png")
    Image.fromarray(np.ascontiguousarray(skimage.data.coffee())).save(folder / "coffee.png")
    result = runner.invoke(app, ["evaluate", "--photos", str(folder), "--detector", "hog", "--model",
                                 f"toy={default_restorer_path()}", "--frm", str(WEIGHTS_DIR / "toy-frm"), "--steps", str(STEPS),
                                 "--out-dir", str(tmp_path / "eval"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "| LQ |" in result.output and "| toy |" in result.output and "FRM (toy-frm)" in result.output
    import json

    payload = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(payload["rows"]) == {"LQ", "toy"}
    assert len(payload["per_image"]["toy"]["FRM (toy-frm)"]) == 1  # one face in two photos
    assert "2 photos, 1 faces, 1 with no face (coffee.png)" in payload["judges"]["photos"]
    assert (tmp_path / "eval" / "outputs" / "toy" / "astronaut.png").is_file() and (tmp_path / "eval" / "grid.png").is_file()
    both = runner.invoke(app, ["evaluate", "--photos", str(folder), "--testset", str(folder)])
    assert both.exit_code == 2
