"""`facereward train-frm`: the Face Reward Model on preference pairs (docs/methods.md 1.1).

Loss: Bradley-Terry, -log sigmoid(tau (s(x_w) - s(x_l))) with a learnable logit scale tau; ties use
target 1/2. Held-out pairwise accuracy (s(x_w) > s(x_l)) every `eval_every` steps; the best model by
held-out accuracy is kept at OUTPUT/best, the last at OUTPUT/model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from facereward.data.imageio import read_image
from facereward.data.preferences import PreferencePair, load_pairs, split_pairs
from facereward.models.frm import FaceRewardModel, FRMConfig, bradley_terry_loss
from facereward.train.accelerator import RunConfig, engine_of, make_accelerator
from facereward.train.checkpoints import (
    checkpoint_run,
    restore_run,
    resume_run,
    write_run_config,
)
from facereward.train.data_stream import BatchStream, data_position, resumable_loader
from facereward.train.progress import ProgressLog


@dataclass
class TrainFRMConfig:
    SMOKE: ClassVar[dict[str, float]] = {"train_steps": 2, "batch_size": 4, "eval_every": 2, "run.save_every": 2}  # facereward.smoke
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/frm", save_every=500, log_every=20))
    pairs: str = ""  # preference JSONL (pairs and/or rankings)
    eval_pairs: str | None = None  # a separate held-out JSONL; without it a split of `pairs` grouped by LQ input
    held_out_fraction: float = 0.1
    model: FRMConfig = field(default_factory=FRMConfig)
    init_from: str | None = None  # an FRM folder to start from (e.g. a converted DiffusionReward checkpoint)
    image_size: int | None = None  # resize every image to this on load (pairs of mixed sizes); None: as stored
    train_steps: int = 2000  # optimizer steps
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    eval_every: int = 100
    use_captions: bool = True
    random_flip: bool = True


class PairImages(Dataset):
    """(chosen, rejected) image tensors of preference pairs, with caption and tie flag."""

    def __init__(self, pairs: list[PreferencePair], image_size: int | None = None, random_flip: bool = False, seed: int = 0):
        self.pairs, self.image_size, self.random_flip, self.seed = pairs, image_size, random_flip, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, path: Path) -> np.ndarray:
        image = read_image(path)
        if self.image_size and image.shape[:2] != (self.image_size, self.image_size):
            image = cv2.resize(image, (self.image_size, self.image_size), interpolation=cv2.INTER_AREA)
        return image

    def __getitem__(self, i: int) -> dict[str, Any]:
        pair = self.pairs[i]
        w, l_ = self._load(pair.chosen), self._load(pair.rejected)
        if w.shape != l_.shape:
            raise ValueError(f"{pair.chosen}: size {w.shape[1]}x{w.shape[0]} differs from {pair.rejected.name}; set image_size")
        if self.random_flip and np.random.default_rng([self.seed, self.epoch, i]).random() < 0.5:
            w, l_ = w[:, ::-1], l_[:, ::-1]
        to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
        return {"chosen": to_t(w), "rejected": to_t(l_), "caption": pair.caption or "", "tie": bool(pair.tie)}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "chosen": torch.stack([it["chosen"] for it in items]),
        "rejected": torch.stack([it["rejected"] for it in items]),
        "caption": [it["caption"] for it in items],
        "tie": torch.tensor([it["tie"] for it in items]),
    }


@torch.no_grad()
def pairwise_accuracy(frm: FaceRewardModel, loader: DataLoader, use_captions: bool = True, device: torch.device | str = "cpu") -> dict[str, float]:
    """Held-out accuracy: the fraction of non-tie pairs with s(chosen) > s(rejected); also the mean margin."""
    frm.eval()
    correct, total, margins = 0, 0, []
    for batch in loader:
        captions = batch["caption"] if use_captions else None
        s_w = frm.score(batch["chosen"].to(device), captions)
        s_l = frm.score(batch["rejected"].to(device), captions)
        keep = ~batch["tie"].to(device)
        correct += int(((s_w > s_l) & keep).sum())
        total += int(keep.sum())
        margins.append((s_w - s_l)[keep].float().cpu())
    margin = float(torch.cat(margins).mean()) if margins and total else float("nan")
    return {"accuracy": correct / total if total else float("nan"), "margin": margin, "pairs": float(total)}


def _split(config: TrainFRMConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    pairs = load_pairs(config.pairs)
    if config.eval_pairs:
        return pairs, load_pairs(config.eval_pairs)
    train, held_out = split_pairs(pairs, config.held_out_fraction, seed=config.run.seed)
    return train, held_out


def train_frm(config: TrainFRMConfig) -> Path:
    """Train (or resume) the FRM; writes OUTPUT/model, OUTPUT/best and OUTPUT/metrics.json; returns OUTPUT/best."""
    if not config.pairs:
        raise ValueError("train-frm: give the preference pairs (--pairs FILE.jsonl)")
    run = config.run
    accelerator = make_accelerator(run, "train-frm")
    write_run_config(config, run, accelerator)
    train_pairs, eval_pairs = _split(config)
    if not train_pairs or not eval_pairs:
        raise ValueError(f"{config.pairs}: need both training and held-out pairs (got {len(train_pairs)} and {len(eval_pairs)})")
    frm = FaceRewardModel.from_pretrained(config.init_from) if config.init_from else FaceRewardModel(config.model)
    frm.to(accelerator.device)
    params = [p for p in frm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if engine_of(accelerator):
        raise ValueError(f"train-frm runs on one process or DDP, not {engine_of(accelerator)} (use configs/accelerate/ddp.yaml)")
    state = resume_run(accelerator, run) or {}
    step, best, history = state.get("step", 0), state.get("best_accuracy", -1.0), list(state.get("history", []))
    train_set = PairImages(train_pairs, config.image_size, config.random_flip, run.seed)
    loader = resumable_loader(train_set, config.batch_size, run.seed, collate_fn=_collate, drop_last=len(train_set) > config.batch_size)
    eval_loader = DataLoader(PairImages(eval_pairs, config.image_size), batch_size=config.batch_size, collate_fn=_collate)
    wrapped, optimizer, loader = accelerator.prepare(frm, optimizer, loader)
    batches = BatchStream(loader, accelerator, data_position(state))
    log = ProgressLog(accelerator, config.train_steps, step, "train-frm", run.log_every, run.progress, history=state.get("train_log"))
    out = Path(run.output_dir)
    restore_run(accelerator, state, {"frm": wrapped}, {"frm": optimizer})  # last, after every setup that draws random numbers
    while step < config.train_steps:
        wrapped.train()
        _, batch = next(batches)
        captions = batch["caption"] if config.use_captions else None
        with accelerator.accumulate(wrapped), accelerator.autocast():
            # one forward through the (DDP-)wrapped model so gradients are synchronised across processes
            s = wrapped(torch.cat([batch["chosen"], batch["rejected"]]), captions * 2 if captions else None)
            s_w, s_l = s.chunk(2)
            loss = bradley_terry_loss(s_w, s_l, frm.logit_scale, tie=batch["tie"])
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.grad_clip > 0:
                accelerator.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        step += 1
        scalars: dict[str, Any] = {"frm/loss": loss, "frm/train_acc": (s_w > s_l).float().mean(), "frm/tau": frm.tau}
        if step % config.eval_every == 0 or step == config.train_steps:
            metrics = pairwise_accuracy(frm, eval_loader, config.use_captions, accelerator.device)
            scalars.update({"frm/held_out_acc": metrics["accuracy"], "frm/held_out_margin": metrics["margin"]})
            history.append({"step": step, **metrics})
            if accelerator.is_main_process and metrics["accuracy"] > best:
                best = metrics["accuracy"]
                frm.save_pretrained(out / "best")
        log.step(step, scalars)
        if step % run.save_every == 0 or step == config.train_steps:
            checkpoint_run(accelerator, run, step, {"frm": wrapped}, {"frm": optimizer},
                           {"data": batches.position(), "best_accuracy": best, "history": history, "train_log": log.history})
    log.close()
    if accelerator.is_main_process:
        frm.save_pretrained(out / "model")
        summary = {"best_held_out_accuracy": best, "train_pairs": len(train_pairs), "held_out_pairs": len(eval_pairs), "history": history,
                   "train_log": log.history}
        (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    return out / "best"
