"""OSEDiff (Wu et al. 2024) from its own files as a one-step restorer folder (docs/methods.md 0.1).

Inputs: Stable Diffusion 2.1 base (an ldm `.ckpt`/`.safetensors` or a diffusers folder, read by `load_sd21`) and
OSEDiff's released LoRA file (`osediff.pkl`, `osediff_face.pkl`, or one of the same layout). That file is what
`OSEDiff_gen.save_model` (cswry/OSEDiff, osediff.py) writes with torch.save:

    vae_lora_encoder_modules, unet_lora_encoder_modules, unet_lora_decoder_modules, unet_lora_others_modules
        lists of module names, the LoRA targets (computed by the authors' name-grep rules on SD 2.1)
    rank_unet, rank_vae       ints, the LoRA ranks
    state_dict_unet           every UNet state-dict key (of the peft-wrapped model) containing "lora" or "conv_in":
                              `<module>.lora_A.<adapter>.weight` / `.lora_B.` of the adapters default_encoder,
                              default_decoder, default_others, and conv_in's trained base `conv_in.base_layer.weight/bias`
    state_dict_vae            the LoRA of adapter default_encoder on the VAE encoder and quant_conv

The authors' loader (`OSEDiff_test.load_ckpt`) adds peft adapters `LoraConfig(r=rank, target_modules=list)` (alpha
left at peft's default 8, so scaling = 8 / rank), copies the tensors in and activates every adapter. Here the same
update is merged by hand into plain weights, W' = W + (8 / r) B A for a Linear and the same product over the kernel for
a Conv2d (lora_A has the layer's kernel, lora_B is 1x1), with conv_in's base replaced by the file's first. The folder
is then a plain diffusers UNet and VAE that `OneStepRestorer.from_pretrained` loads.

Strict: every tensor of the file is used, every target names an existing Linear or Conv2d of SD 2.1, every LoRA
tensor has the layer's channels and the file's rank; anything else is one `CheckpointError` line naming the file and
the key. The folder is written only once everything has loaded (staged beside it and moved in place).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facereward.models.checkpoint_io import CheckpointError, load_file_safely
from facereward.models.ddim import PREDICTION_TYPES, make_scheduler
from facereward.models.diffbir_import import load_sd21
from facereward.models.onestep import OneStepConfig, OneStepNet, OneStepRestorer
from facereward.models.restorer import ModelFolderError, empty_prompt_embedding

LORA_ALPHA = 8  # peft's LoraConfig default; OSEDiff never sets lora_alpha, so scaling = 8 / rank
TIMESTEP = 999  # OSEDiff's t*: the LQ latent is x_999
LIST_KEYS = ("vae_lora_encoder_modules", "unet_lora_encoder_modules", "unet_lora_decoder_modules", "unet_lora_others_modules")
RANK_KEYS = ("rank_unet", "rank_vae")
DICT_KEYS = ("state_dict_unet", "state_dict_vae")
FILE_KEYS = LIST_KEYS + RANK_KEYS + DICT_KEYS
# (adapter name, target-list key) as OSEDiff's load_ckpt adds them
UNET_ADAPTERS = (("default_encoder", "unet_lora_encoder_modules"), ("default_decoder", "unet_lora_decoder_modules"),
                 ("default_others", "unet_lora_others_modules"))
VAE_ADAPTERS = (("default_encoder", "vae_lora_encoder_modules"),)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.(?P<adapter>[^.]+)\.weight$")
# SD 2.1 base's noise schedule and parameterisation: what an ldm file (which records neither) is taken to be
SD21_BASE_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
                      "prediction_type": "epsilon"}


def _names(keys: list[str], limit: int = 3) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else err.__class__.__name__


# ---- the OSEDiff file -------------------------------------------------------------------------------------------
def read_osediff(path: str | Path) -> dict[str, Any]:
    """The checked contents of an OSEDiff file: the eight keys of save_model, with their types (one line otherwise)."""
    path = Path(path)
    obj = load_file_safely(path, "OSEDiff file")
    layout = f"the dict of {', '.join(FILE_KEYS)} that OSEDiff's save_model writes"
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not an OSEDiff file (a {type(obj).__name__}, not {layout})")
    missing = [k for k in FILE_KEYS if k not in obj]
    if missing:
        hint = " (it looks like a plain state dict)" if obj and all(isinstance(v, torch.Tensor) for v in obj.values()) else ""
        raise CheckpointError(f"{path}: not an OSEDiff file, no {_names([repr(k) for k in missing])}{hint}; expected {layout}")
    extra = [repr(k) for k in obj if k not in FILE_KEYS]
    if extra:
        raise CheckpointError(f"{path}: entries OSEDiff's save_model does not write: {_names(extra)}")
    for key in LIST_KEYS:
        value = obj[key]
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(n, str) and n for n in value):
            raise CheckpointError(f"{path}: {key} must be a non-empty list of module names, got {_describe(value)}")
    for key in RANK_KEYS:
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{path}: {key} must be a positive int (the LoRA rank), got {_describe(value)}")
    for key in DICT_KEYS:
        value = obj[key]
        if not isinstance(value, dict) or not value:
            raise CheckpointError(f"{path}: {key} must be a non-empty dict of tensors, got {_describe(value)}")
        bad = [f"{k!r} ({_describe(v)})" for k, v in value.items()
               if not isinstance(k, str) or not isinstance(v, torch.Tensor) or not v.is_floating_point()]
        if bad:
            raise CheckpointError(f"{path}: {key} holds entries that are not named floating-point tensors: {_names(bad)}")
    return obj


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor"
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"{type(value).__name__} {value!r}"[:80]


# ---- merging the LoRA -------------------------------------------------------------------------------------------
def lora_targets(model: nn.Module, targets: list[str], path: Path, list_key: str, what: str) -> list[str]:
    """The modules a peft LoraConfig(target_modules=targets) wraps: name == target or name ends with "." + target.

    Every target must match a Linear or a Conv2d of `model` (peft wraps nothing else of SD)."""
    modules = dict(model.named_modules())
    found: dict[str, None] = {}
    for target in dict.fromkeys(targets):  # OSEDiff's VAE list repeats names; peft reads it as a set
        hits = [n for n in modules if n and (n == target or n.endswith("." + target))]
        if not hits:
            raise CheckpointError(f"{path}: {list_key} names {target!r}, a module the SD 2.1 {what} does not have")
        for name in hits:
            module = modules[name]
            if not isinstance(module, (nn.Linear, nn.Conv2d)) or (isinstance(module, nn.Conv2d) and module.groups != 1):
                raise CheckpointError(f"{path}: {list_key} names {name!r}, a {type(module).__name__} of the SD 2.1 {what}; "
                                      "OSEDiff's LoRA targets Linear and (ungrouped) Conv2d layers")
            found[name] = None
    return list(found)


def _lora_shapes(module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    w = module.weight
    if isinstance(module, nn.Linear):
        return (rank, w.shape[1]), (w.shape[0], rank)
    return (rank, w.shape[1], *w.shape[2:]), (w.shape[0], rank, 1, 1)  # peft: lora_A has the kernel, lora_B is 1x1


def merge_lora(model: nn.Module, adapters: tuple[tuple[str, str], ...], file: dict[str, Any], rank_key: str, dict_key: str,
               path: Path, what: str, base_filter: str | None = None) -> dict[str, int]:
    """Merge the file's LoRA for `adapters` into `model`'s plain weights (in place); with `base_filter`, first replace the
    base parameters whose state-dict key contains it (conv_in for the UNet) with the file's. Every tensor of
    file[dict_key] must be used. Returns {adapter: number of layers}."""
    rank, tensors = file[rank_key], file[dict_key]
    modules = dict(model.named_modules())
    wrapped: dict[str, list[str]] = {}  # module -> adapters on it
    for adapter, list_key in adapters:
        for name in lora_targets(model, list(file[list_key]), path, list_key, what):
            wrapped.setdefault(name, []).append(adapter)
    expected = {f"{name}.lora_{part}.{adapter}.weight": (name, part, adapter)
                for name, names in wrapped.items() for adapter in names for part in "AB"}
    # base parameters the authors' filter ("conv_in" in the key) saves, spelled as peft's wrapper names them
    base: dict[str, tuple[str, str]] = {}
    if base_filter is not None:
        for key in model.state_dict():
            if base_filter in key:
                name, param = key.rsplit(".", 1)
                base[f"{name}.base_layer.{param}" if name in wrapped else key] = (name, param)
    unused = [k for k in tensors if k not in expected and k not in base]
    if unused:
        key = unused[0]
        found = _LORA_KEY.match(key)
        if found and found["module"] not in modules:
            why = f"LoRA for {found['module']!r}, a module the SD 2.1 {what} does not have"
        elif found:
            why = (f"LoRA of adapter {found['adapter']!r} for {found['module']!r}, which no target list of the file "
                   f"gives that adapter ({', '.join(a for a, _ in adapters)} from {', '.join(k for _, k in adapters)})")
        else:
            why = "not a LoRA tensor of the targeted layers" + (f" nor the {base_filter} base" if base_filter else "")
        more = f" (+{len(unused) - 1} more unused)" if len(unused) > 1 else ""
        raise CheckpointError(f"{path}: {dict_key} has {key!r}, unused: {why}{more}")
    missing = [k for k in (*expected, *base) if k not in tensors]
    if missing:
        raise CheckpointError(f"{path}: {dict_key} lacks {_names([repr(k) for k in missing])}, which its target lists "
                              f"{'and the ' + base_filter + ' base ' if base_filter else ''}call for")
    for key, (name, param) in base.items():
        target = getattr(modules[name], param)
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise CheckpointError(f"{path}: {dict_key} {key!r} is {tuple(tensors[key].shape)}, the SD 2.1 {what}'s "
                                  f"{name}.{param} is {tuple(target.shape)}")
    for key, (name, part, adapter) in expected.items():  # every shape first: nothing changes unless all fit
        t, (want_a, want_b) = tensors[key], _lora_shapes(modules[name], rank)
        want, rank_axis = (want_a, 0) if part == "A" else (want_b, 1)
        if tuple(t.shape) != want:
            rank_off = t.ndim == len(want) and t.shape[rank_axis] != rank and all(
                t.shape[i] == want[i] for i in range(len(want)) if i != rank_axis)
            problem = (f"rank mismatch: rank {t.shape[rank_axis]} where {rank_key} is {rank}" if rank_off else
                       f"needs {want} for {type(modules[name]).__name__} {name} {tuple(modules[name].weight.shape)} "
                       f"at {rank_key} {rank}")
            raise CheckpointError(f"{path}: {dict_key} {key!r} is {tuple(t.shape)}, {problem}")
    with torch.no_grad():
        for key, (name, param) in base.items():
            target = getattr(modules[name], param)
            target.data = tensors[key].detach().to(dtype=target.dtype).clone()
        for name, names in wrapped.items():  # one layer at a time: peak memory one float64 copy of the largest layer
            weight = modules[name].weight
            merged = weight.detach().double()
            for adapter in names:  # every adapter active, as set_adapter([...]) leaves them: their updates add
                a, b = tensors[f"{name}.lora_A.{adapter}.weight"], tensors[f"{name}.lora_B.{adapter}.weight"]
                merged += (b.flatten(1).double() @ a.flatten(1).double()).reshape(weight.shape) * (LORA_ALPHA / rank)
            weight.data = merged.to(weight.dtype)
    return {adapter: sum(adapter in names for names in wrapped.values()) for adapter, _ in adapters}


# ---- the schedule and the prompt ---------------------------------------------------------------------------------
def sd_schedule(sd: Path) -> dict[str, Any]:
    """The noise schedule and prediction type OSEDiff reads from SD's scheduler/ (DDPMScheduler.from_pretrained); an ldm
    file records neither, so it is taken to be SD 2.1 base's (scaled-linear 0.00085-0.012, epsilon)."""
    if not sd.is_dir():
        return dict(SD21_BASE_SCHEDULE)
    from diffusers import DDPMScheduler

    if not (sd / "scheduler").is_dir():
        raise ModelFolderError(f"{sd}: a Stable Diffusion folder without scheduler/ (OSEDiff reads its noise schedule and "
                               "prediction type there)")
    try:
        config = DDPMScheduler.from_pretrained(sd / "scheduler", local_files_only=True).config
    except (OSError, ValueError, TypeError) as err:
        raise ModelFolderError(f"{sd / 'scheduler'}: unreadable scheduler config ({_first_line(err)})") from None
    if config.get("trained_betas") is not None:
        raise ModelFolderError(f"{sd / 'scheduler'}: a schedule of trained betas; facereward supports named beta schedules")
    if config.get("clip_sample") or config.get("thresholding"):
        raise ModelFolderError(f"{sd / 'scheduler'}: clip_sample or thresholding is on (DDPMScheduler's default where the "
                               "config does not say), so OSEDiff's DDPM step would clip x0, which the one-step restorer "
                               "does not; SD 2.1 base's scheduler has clip_sample false")
    schedule = {k: config[k] for k in SD21_BASE_SCHEDULE}
    if schedule["prediction_type"] not in PREDICTION_TYPES:
        raise ModelFolderError(f"{sd / 'scheduler'}: predicts {schedule['prediction_type']!r}; facereward supports "
                               f"{', '.join(PREDICTION_TYPES)}")
    if schedule["num_train_timesteps"] != 1000:
        raise ModelFolderError(f"{sd / 'scheduler'}: {schedule['num_train_timesteps']} training timesteps; OSEDiff's t* = 999 "
                               "is on SD's 1000")
    return schedule


def prompt_text(prompt: str = "", caption: str | Path | None = None) -> str:
    """The prompt: `prompt`, or the content of the text file `caption` (stripped)."""
    if caption is None:
        return prompt
    if prompt:
        raise ValueError("--prompt and --caption are exclusive (the caption file's content is the prompt)")
    caption = Path(caption)
    try:
        return caption.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{caption}: unreadable caption file ({_first_line(err)})") from None


def _sd_error(err: Exception) -> Exception:
    """load_sd21's one-line errors, naming OSEDiff where they name DiffBIR (both stand on SD 2.1 base)."""
    return type(err)(str(err).replace("DiffBIR v1 needs", "OSEDiff needs"))


def _size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def import_osediff(out_dir: str | Path, sd: str | Path, osediff: str | Path, size: int = 512, prompt: str = "",
                   caption: str | Path | None = None, head_channels: int = 64, progress: bool = True) -> OneStepRestorer:
    """Merge OSEDiff's LoRA into SD 2.1 and write the one-step restorer folder `out_dir` (only once everything has loaded).

    `prompt` (or the content of the file `caption`) is encoded once as the fixed text condition (empty by default; a
    non-empty one needs a diffusers SD folder, whose tokenizer/ and text_encoder/ encode it)."""
    from tqdm.auto import tqdm

    out_dir, sd, osediff = Path(out_dir), Path(sd), Path(osediff)
    if size < 8 or size % 8:
        raise ValueError(f"--size must be a positive multiple of 8 (the VAE's downsampling), got {size}")
    for option, path in (("--sd", sd), ("--osediff", osediff)):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file ({option}; weights load from a local path only)")
    if sd.is_dir():
        missing = [n for n in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (sd / n).is_dir()]
        if missing:
            raise ModelFolderError(f"{sd}: not a diffusers Stable Diffusion folder, missing {', '.join(missing)}")
    text = prompt_text(prompt, caption)
    if text and not sd.is_dir():
        raise ValueError(f"{sd}: a prompt needs a diffusers Stable Diffusion folder (its tokenizer/ and text_encoder/ encode "
                         "it); an ldm checkpoint has no tokenizer: pass the SD 2.1 base folder, or no prompt")
    bar = tqdm(total=4, desc="import-osediff", disable=not progress, unit="part")
    try:
        bar.set_postfix_str("OSEDiff file")
        file = read_osediff(osediff)
        bar.update()
        bar.set_postfix_str("Stable Diffusion 2.1")
        schedule = sd_schedule(sd)
        try:
            unet, vae, empty, _ = load_sd21(sd, size, head_channels)
        except (CheckpointError, ModelFolderError) as err:
            raise _sd_error(err) from None
        bar.update()
        bar.set_postfix_str("merging the LoRA")
        merged_unet = merge_lora(unet, UNET_ADAPTERS, file, "rank_unet", "state_dict_unet", osediff, "UNet", base_filter="conv_in")
        merged_vae = merge_lora(vae, VAE_ADAPTERS, file, "rank_vae", "state_dict_vae", osediff, "VAE")
        prompt_embeds = empty if not text else empty_prompt_embedding(sd, text)
        bar.update()
        config = OneStepConfig(mode="latent", size=size, timestep=TIMESTEP, beta_schedule=schedule["beta_schedule"],
                               beta_start=float(schedule["beta_start"]), beta_end=float(schedule["beta_end"]),
                               prediction_type=schedule["prediction_type"], latent_sample=True, colour_fix=False)
        scheduler = make_scheduler(config.beta_schedule, config.beta_start, config.beta_end, schedule["num_train_timesteps"],
                                   prediction_type=config.prediction_type)
        restorer = OneStepRestorer(config, scheduler, OneStepNet(unet, vae), vae, prompt_embeds).eval()
        bar.set_postfix_str(f"writing {out_dir}")
        source = {"imported": "OSEDiff", "sd": sd.name, "sd_bytes": _size_of(sd), "osediff": osediff.name,
                  "osediff_bytes": _size_of(osediff), "rank_unet": file["rank_unet"], "rank_vae": file["rank_vae"],
                  "lora_alpha": LORA_ALPHA, "lora_layers_unet": merged_unet, "lora_layers_vae": merged_vae, "prompt": text,
                  **({"caption": Path(caption).name} if caption is not None else {})}
        restorer.save_pretrained(out_dir, source=source)
        bar.update()
    finally:
        bar.close()
    return restorer


__all__ = ["LORA_ALPHA", "import_osediff", "lora_targets", "merge_lora", "prompt_text", "read_osediff", "sd_schedule"]
