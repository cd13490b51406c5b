"""The built-in rows of the measures table (docs/methods.md 3 for the metrics, 2.2 for the reward forms).

Each builder takes the `MeasureEnv` and the measure's options and returns a scorer `fn(images, gt, captions) -> (B,)`
(a `SetMeasure` for FID/KID), or None when what it needs was not given. Metric forms follow the papers' conventions
(BasicSR's 8-bit PSNR/SSIM in float64, no-grad judges); reward forms are differentiable where they can be
(unquantised PSNR/SSIM on clamped images, the identity judge with gradients) and higher is better.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facereward.measures.judges import MeasureEnv
from facereward.measures.maniqa import WEIGHT_FILES as MANIQA_FILES
from facereward.measures.musiq import WEIGHT_FILES as MUSIQ_FILES
from facereward.measures.table import SetMeasure, register_measure
from facereward.measures.topiq import WEIGHT_FILES as TOPIQ_FILES


def _named(fn, column: str, **attrs):
    fn.column = column
    for k, v in attrs.items():
        setattr(fn, k, v)
    return fn


class _ModelScorer(nn.Module):
    """A scorer around a torch model (so moving the measure moves the model): `call(model, x, gt, captions)`."""

    def __init__(self, model: nn.Module, call, column: str):
        super().__init__()
        self.model, self.call, self.column = model, call, column

    def forward(self, x: Tensor, gt: Tensor | None = None, captions=None) -> Tensor:
        return self.call(self.model, x, gt, captions)


def _psnr(y_channel: bool):
    def build(env: MeasureEnv, crop_border: int = 0, y_channel: bool = y_channel, quantize: bool = True,
              max_db: float | None = None):
        from facereward.measures.fullref import psnr

        def fn(x, gt, _):
            value = psnr(x, gt, crop_border=crop_border, y_channel=y_channel, quantize=quantize)
            return value.clamp(max=max_db) if max_db is not None else value
        return _named(fn, "PSNR-Y" if y_channel else "PSNR")
    return build


def _ssim(y_channel: bool):
    def build(env: MeasureEnv, crop_border: int = 0, y_channel: bool = y_channel, quantize: bool = True):
        from facereward.measures.fullref import ssim

        return _named(lambda x, gt, _: ssim(x, gt, crop_border=crop_border, y_channel=y_channel, quantize=quantize),
                      "SSIM-Y" if y_channel else "SSIM")
    return build


def _lpips(env: MeasureEnv, net: str = "vgg", backbone_path: str | None = None, heads_path: str | None = None):
    if bool(backbone_path) != bool(heads_path):
        raise ValueError("measure 'lpips' needs both backbone_path and heads_path (LPIPS weight files)")
    if not backbone_path:
        return None
    from facereward.measures.lpips import LPIPS

    env.used["lpips"] = f"lpips-{net}"
    return _ModelScorer(LPIPS(net, backbone_path, heads_path).to(env.device), lambda m, x, gt, _: m(x, gt.to(x.dtype)),
                        f"lpips-{net}")


def _ids(column: str):
    def build(env: MeasureEnv, judge: str | None = None, differentiable: bool = False):
        """No-grad: the judge's embeddings, float64 cosine (IDS) or angle (Deg), as evaluation tables compute them.
        `differentiable` (the reward form): one batched call of a torch judge with gradients, float32 cosine."""
        from facereward.measures.identity import identity_degrees, identity_similarity

        embedder = env.identity(judge)
        if embedder is None:
            return None
        env.used["identity"] = embedder.name
        if differentiable:
            if column != "IDS":
                raise ValueError("measure 'deg': option differentiable is not supported")
            return _IDSWithGrad(embedder, f"{column} ({embedder.name})")
        score = identity_similarity if column == "IDS" else identity_degrees

        def fn(x, gt, _):
            return score(env.memo(("identity", embedder.name), x, embedder.embed),
                         env.memo(("identity", embedder.name), gt, embedder.embed))
        return _named(fn, f"{column} ({embedder.name})", differentiable=False)
    return build


class _IDSWithGrad(nn.Module):
    """IDS as a reward: one batched embedding of (x, gt), float32 cosine; gradients reach x through a torch judge."""

    def __init__(self, embedder, column: str):
        super().__init__()
        self.torch_judge = isinstance(embedder, nn.Module)
        if self.torch_judge:
            embedder.requires_grad_(False)
            embedder.eval()
            self.module = embedder  # moved with the measure
        self.embedder, self.column, self.differentiable = embedder, column, self.torch_judge

    def forward(self, x: Tensor, gt: Tensor, _=None) -> Tensor:
        both = torch.cat([x, gt.to(x.dtype)])
        if self.torch_judge:
            emb = F.normalize(self.embedder(both).float(), dim=-1)
        else:
            emb = self.embedder.embed(both).float().to(x.device)
        n = x.shape[0]
        return (emb[:n] * emb[n:]).sum(dim=-1)


def _lmd(env: MeasureEnv, judge: str | None = None):
    from facereward.measures.landmarks import landmark_distance

    detector = env.landmarks(judge)
    if detector is None:
        return None
    env.used["landmarks"] = detector.name
    return _named(lambda x, gt, _: landmark_distance(detector.detect(x), env.memo(("landmarks", detector.name), gt, detector.detect)),
                  f"LMD ({detector.name})")


def _toy_quality(env: MeasureEnv, weights: dict[str, float] | None = None):
    if not env.toy:
        return None  # the toy oracle means nothing on real faces
    from facereward.measures.toy_quality import toy_quality

    env.used["toy-quality"] = "toy oracle (toy-id, toy-lmk)"
    return _named(lambda x, gt, _: toy_quality(x, gt, weights=weights).to(torch.float32), "oracle (toy)")


def _detail(env: MeasureEnv):
    from facereward.measures.toy_quality import detail_score

    return _named(lambda x, gt, _: detail_score(x, gt), "detail")


def _frm(env: MeasureEnv, path: str | None = None, scale: float = 1.0, resize: str | None = None):
    if not path:
        return None
    from facereward.models.frm import FaceRewardModel

    model = FaceRewardModel.from_pretrained(path, resize=resize)
    model.freeze_for_reward()
    env.used["frm"] = str(path)
    scale = float(scale)
    return _ModelScorer(model, lambda m, x, gt, captions: m.score(x, captions) * scale, f"FRM ({Path(path).name})")


def _clipiqa(env: MeasureEnv, path: str | None = None, tokenizer_path: str | None = None, prompts="pyiqa",
             scale: float | None = None, resize: str = "native"):
    if not path:
        return None
    from facereward.measures.clipiqa import CLIPIQA

    model = CLIPIQA.from_pretrained(path, tokenizer_path, prompts=prompts, scale=scale, resize=resize, option="options.clipiqa.path",
                                    tokenizer_hint="set options.clipiqa.tokenizer_path to a local folder with the CLIP tokenizer files")
    env.used["clipiqa"] = str(path)
    return _ModelScorer(model, lambda m, x, gt, _: m(x), f"CLIPIQA ({Path(path).name})")


def _niqe(env: MeasureEnv, model: str | None = None, **options):
    if not model:
        return None
    from facereward.measures.niqe import NIQE

    try:
        niqe = NIQE(model, **options)
    except TypeError as err:
        raise ValueError(f"measure 'niqe': bad options {sorted(options)} ({err})") from None
    env.used["niqe"] = str(model)
    return _named(lambda x, gt, _: niqe(x), f"NIQE ({Path(model).stem})")


def _wavelet(env: MeasureEnv, levels: int = 3, normalise: bool = False, wavelet: str = "dtcwt"):
    if wavelet not in ("haar", "dtcwt"):
        raise ValueError(f"measure 'wavelet': wavelet must be 'haar' or 'dtcwt', got {wavelet!r}")
    from facereward.measures.wavelet import lowpass_l1

    levels, normalise = int(levels), bool(normalise)
    return _named(lambda x, gt, _: lowpass_l1(x, gt, levels=levels, normalise=normalise, wavelet=wavelet),
                  f"DWT-L1 ({wavelet})")


def _wavelet_reward(distance: Tensor, c: float = 15.0) -> Tensor:
    if c <= 0:
        raise ValueError(f"measure 'wavelet': c must be > 0, got {c}")
    return torch.exp(-float(c) * distance.float())  # docs/methods.md 2.2


def _mse(env: MeasureEnv, range: str = "unit"):  # noqa: A002 (the option's name)
    """Per-image mean squared error over channels and pixels, float64. `range`: "unit", the images as given (on
    [0, 1]); "signed", both mapped to [-1, 1] first (2 x - 1), i.e. 4x the unit MSE, as the LRPO server's l2 term."""
    if range not in ("unit", "signed"):
        raise ValueError(f"measure 'mse': range must be 'unit' or 'signed', got {range!r}")
    signed = range == "signed"

    def fn(x, gt, _):
        if x.shape != gt.shape:
            raise ValueError(f"measure 'mse': shape mismatch, images {tuple(x.shape)} vs gt {tuple(gt.shape)}")
        x, gt = x.to(torch.float64), gt.to(device=x.device, dtype=torch.float64)
        if signed:
            x, gt = 2 * x - 1, 2 * gt - 1
        return (x - gt).pow(2).flatten(1).mean(dim=1)
    return _named(fn, "MSE (signed)" if signed else "MSE")


def _mse_reward(mse: Tensor, c: float = 15.0) -> Tensor:
    if c <= 0:
        raise ValueError(f"measure 'mse': c must be > 0, got {c}")
    return torch.exp(-float(c) * mse).float()  # the LRPO server's l2: exp(-15 MSE) on [-1, 1] images


def _ms_ssim(env: MeasureEnv):
    from facereward.measures.msssim import ms_ssim

    return _named(lambda x, gt, _: ms_ssim(x, gt), "MS-SSIM")


def _fid(env: MeasureEnv, features: str | None = None):
    from facereward.measures.fid import fid_from_features, fid_from_features_fast

    extractor = env.features(features)
    if extractor is None:
        return None
    env.used["fid_features"] = extractor.name
    warned = []

    def compute(feats: np.ndarray, reference: np.ndarray) -> float:
        if not warned and min(len(feats), len(reference)) <= reference.shape[1]:
            warnings.warn(f"FID from {len(feats)} vs {len(reference)} images of {reference.shape[1]}-d features "
                          f"({extractor.name}): the covariances are singular, so FID is biased and only comparable at equal N",
                          stacklevel=2)
        warned.append(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the small-N warning is given once above
            return float(fid_from_features(feats, reference))
    def resample(feats: np.ndarray, reference: np.ndarray) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(fid_from_features_fast(feats, reference))
    return SetMeasure("fid", f"FID ({extractor.name})", extractor, compute, resample=resample)


def _kid(env: MeasureEnv, features: str | None = None, subsets: int = 100, subset_size: int = 1000, seed: int = 0):
    from facereward.measures.fid import kid_from_features

    extractor = env.features(features)
    if extractor is None:
        return None
    env.used["fid_features"] = extractor.name
    return SetMeasure("kid", f"KID ({extractor.name})", extractor,
                      lambda f, ref: float(kid_from_features(f, ref, subsets=subsets, subset_size=subset_size, seed=seed)[0]))


def _musiq(variant: str, column: str):
    def build(env: MeasureEnv, path: str | None = None, longer_side_lengths: tuple[int, ...] = (224, 384),
              max_seq_len_from_original_res: int | None = -1):
        if not path:
            return None
        from facereward.measures.musiq import MUSIQ, MUSIQConfig

        config = MUSIQConfig(longer_side_lengths=tuple(int(v) for v in longer_side_lengths),
                             max_seq_len_from_original_res=max_seq_len_from_original_res)
        scorer = _ModelScorer(MUSIQ.from_pretrained(path, variant, config), lambda m, x, gt, _: m(x), column)
        scorer.provenance = {"variant": variant, "input": "RGB [0, 1] -> [-1, 1]", "scales": f"longer sides "
                             f"{list(config.longer_side_lengths)} (bicubic) + the original", "patch": 32}
        return scorer
    return build


def _maniqa(variant: str, column: str):
    def build(env: MeasureEnv, path: str | None = None, test_sample: int = 20, scale: float | None = None):
        if not path:
            return None
        from facereward.measures.maniqa import MANIQA, VARIANT_SCALE

        scorer = _ModelScorer(MANIQA(path, variant, test_sample=int(test_sample), scale=scale), lambda m, x, gt, _: m(x), column)
        scorer.provenance = {"variant": variant, "input": "RGB [0, 1] -> [-1, 1]", "crops": f"{test_sample} uniform 224 px "
                             "(sides <= 224 px upscaled bilinearly first)", "scale": VARIANT_SCALE[variant] if scale is None else scale}
        return scorer
    return build


def _topiq(variant: str, column: str):
    def build(env: MeasureEnv, path: str | None = None, test_img_size: int | str | None = "pyiqa"):
        if not path:
            return None
        from facereward.measures.topiq import TEST_IMG_SIZES, TOPIQNR

        scorer = _ModelScorer(TOPIQNR(path, variant, test_img_size=test_img_size), lambda m, x, gt, _: m(x), column)
        size = TEST_IMG_SIZES[variant] if test_img_size == "pyiqa" else test_img_size
        scorer.provenance = {"variant": variant, "input": "RGB [0, 1], ImageNet mean/std",
                             "resize": f"shorter side {size} (bilinear, antialias)" if size else "none"}
        return scorer
    return build


def _dists(env: MeasureEnv, path: str | None = None, backbone_path: str | None = None):
    if not path and not backbone_path:
        return None
    if not (path and backbone_path):
        raise ValueError("measure 'dists' needs both path (DISTS_weights-f5e65c96.pth) and backbone_path (vgg16-397923af.pth)")
    from facereward.measures.dists import DISTS

    scorer = _ModelScorer(DISTS(path, backbone_path).to(env.device), lambda m, x, gt, _: m(x, gt.to(x.dtype)), "DISTS")
    scorer.provenance = {"input": "RGB [0, 1], ImageNet mean/std for the VGG (the raw image as tap 0)", "resize": "none"}
    return scorer


def _weights(name: str, files: dict[str, str], variant: str) -> str:
    return f"option path ({files[variant]}; evaluate --weights {name}=FILE)"


_IDENTITY = "an identity judge (judge: auto, toy, dlib or arcface:FILE.onnx; evaluate --identity)"
_FEATURES = "features (auto, identity or inception:FILE; evaluate --fid) and a reference set (hq/ or --fid-reference DIR)"
_float = lambda score: score.float()  # noqa: E731 (rewards are float32)
_UNQUANTISED = {"quantize": False, "clamp": True}

for name, build, kind, lower, diff, needs, description, extra in (
    ("psnr", _psnr(False), "FR", False, True, "", "PSNR in dB, RGB, BasicSR (crop_border, y_channel, quantize, max_db)",
     {"reward": _float, "reward_defaults": {**_UNQUANTISED, "max_db": 60.0}}),
    ("ssim", _ssim(False), "FR", False, True, "", "SSIM, RGB, BasicSR (crop_border, y_channel, quantize)",
     {"reward": _float, "reward_defaults": dict(_UNQUANTISED)}),
    ("psnr-y", _psnr(True), "FR", False, True, "", "PSNR on the Y channel, BasicSR",
     {"reward": _float, "reward_defaults": {**_UNQUANTISED, "max_db": 60.0}}),
    ("ssim-y", _ssim(True), "FR", False, True, "", "SSIM on the Y channel, BasicSR",
     {"reward": _float, "reward_defaults": dict(_UNQUANTISED)}),
    ("lpips", _lpips, "FR", True, True, "options backbone_path and heads_path (LPIPS weight files; net vgg or alex)",
     "LPIPS distance; as a reward 1 - LPIPS", {"reward": lambda d: 1.0 - d.float()}),
    ("ids", _ids("IDS"), "FR", False, True, _IDENTITY, "identity cosine similarity to the GT (judge)",
     {"reward_defaults": {"differentiable": True}}),
    ("deg", _ids("Deg"), "FR", True, False, _IDENTITY, "identity angle to the GT in degrees (judge)", {}),
    ("lmd", _lmd, "FR", True, False, "a landmark judge (judge: auto, toy or dlib; evaluate --landmarks)",
     "mean landmark distance to the GT in px", {}),
    ("toy-quality", _toy_quality, "FR", False, False, "toy-world faces",
     "the toy world's hidden quality (measures.toy_quality): its stand-in for a person", {}),
    ("detail", _detail, "FR", False, False, "", "min(r, 1/r), r the Laplacian energy of the luma over the GT's", {}),
    ("frm", _frm, "NR", False, True, "option path (a Face Reward Model folder; --frm)",
     "Face Reward Model score (x scale); resize: the folder's (None), antialias, bilinear or hpsv2", {}),
    ("clipiqa", _clipiqa, "NR", False, True, "option path (a local CLIP folder or OpenCLIP checkpoint; --clipiqa)",
     "CLIPIQA in [0, 1]", {}),
    ("niqe", _niqe, "NR", True, False, "option model (the MATLAB release's modelparameters.mat, or `facereward fit-niqe`; --niqe-model)",
     "NIQE (MATLAB release)", {}),
    ("wavelet", _wavelet, "FR", True, True, "", "DWT_L1: low-pass L1 of a wavelet transform (dtcwt or haar, levels); "
     "as a reward exp(-c DWT_L1), c = 15", {"reward": _wavelet_reward, "reward_params": ("c",)}),
    ("mse", _mse, "FR", True, True, "", "mean squared error (range: unit, images on [0, 1], or signed, on [-1, 1]); "
     "as a reward exp(-c MSE), c = 15, range signed (the LRPO server's l2)",
     {"reward": _mse_reward, "reward_params": ("c",), "reward_defaults": {"range": "signed"}}),
    ("ms-ssim", _ms_ssim, "FR", False, True, "", "multi-scale SSIM as pyiqa's ms_ssim (Y of YIQ, 8-bit levels, 5 scales); "
     "sides >= 161 px", {"reward": _float, "reward_defaults": {"clamp": True}}),
    ("fid", _fid, "set", True, False, _FEATURES, "Frechet distance of the features to the reference set's", {}),
    ("kid", _kid, "set", True, False, _FEATURES, "kernel inception distance (unbiased MMD^2, polynomial kernel)", {}),
):
    register_measure(name, build, kind=kind, lower_better=lower, differentiable=diff, needs=needs, description=description,
                     overwrite=True, **extra)

# the no-reference and perceptual measures BFR papers report, on the released weight files pyiqa loads (docs/evaluate.md)
for variant, label in (("koniq10k", "KonIQ"), ("spaq", "SPAQ"), ("paq2piq", "PaQ-2-PiQ"), ("ava", "AVA")):
    name = "musiq-koniq" if variant == "koniq10k" else f"musiq-{variant}"
    register_measure(name, _musiq(variant, f"MUSIQ ({label})"), kind="NR", lower_better=False, differentiable=True,
                     needs=_weights(name, MUSIQ_FILES, variant), overwrite=True,
                     description=f"MUSIQ trained on {label} ({'1-10' if variant == 'ava' else 'about 0-100'}), pyiqa's "
                     f"{'musiq' if variant == 'koniq10k' else name}")
for variant, label in (("koniq", "KonIQ"), ("pipal", "PIPAL")):
    name = f"maniqa-{variant}"
    register_measure(name, _maniqa(variant, f"MANIQA ({label})"), kind="NR", lower_better=False, differentiable=True,
                     needs=_weights(name, MANIQA_FILES, variant), overwrite=True,
                     description=f"MANIQA trained on {label} (about 0-1), pyiqa's {'maniqa' if variant == 'koniq' else name}")
for variant, name, label in (("koniq", "topiq-nr", "TOPIQ-NR (KonIQ)"), ("face", "topiq-nr-face", "TOPIQ-NR (face)")):
    register_measure(name, _topiq(variant, label), kind="NR", lower_better=False, differentiable=True,
                     needs=_weights(name, TOPIQ_FILES, variant), overwrite=True,
                     description=f"TOPIQ no-reference, {'KonIQ' if variant == 'koniq' else 'face quality (CGFIQA-40k), 512 px'} "
                     f"(about 0-1), pyiqa's {name.replace('topiq-nr', 'topiq_nr')}")
register_measure("dists", _dists, kind="FR", lower_better=True, differentiable=True, overwrite=True,
                 needs="options path (DISTS_weights-f5e65c96.pth) and backbone_path (torchvision vgg16-397923af.pth)",
                 description="DISTS structure and texture distance (0-1); as a reward 1 - DISTS",
                 reward=lambda d: 1.0 - d.float())

__all__: list[str] = []
