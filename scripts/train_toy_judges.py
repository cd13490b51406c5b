#!/usr/bin/env python
"""Retrain the two toy judges (identity embedder, landmark regressor) from scratch.

Renders `--faces` train-identity faces of the demo world ToyFaceWorld(seed=0, n_identities=200,
test_fraction=0.2) at 64 px once, in memory, plus two seeded "diffbir" degradations of each at
random strength (U(0, 0.5) and a mild U(0, 0.3)); trains both judges on them; measures them on
held-out (test-split) identities; writes `toy-id.*`, `toy-lmk.*` and `metrics.json` to `--out`.
Deterministic in `--seed`; single-threaded by default (defaults took 277 s on a busy 2-core CPU).

    python scripts/train_toy_judges.py [--out DIR] [--steps N] [--seed S] [--faces N]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from facereward import smoke
from facereward.data.degradation import degrade
from facereward.data.toyfaces import ToyFace, ToyFaceWorld
from facereward.measures.toy_judges import (
    IBUG_FLIP,
    ToyIdentityEmbedder,
    ToyLandmarkRegressor,
    best_threshold,
    roc_auc,
    save_toy_judge,
    verification_accuracy,
    verification_pairs,
)

WORLD = {"seed": 0, "n_identities": 200, "test_fraction": 0.2}
SIZE = 64
EVAL_SEEDS = {"threshold": 1001, "report": 1002}  # world.sample seeds of the two held-out face sets
IDS_STRENGTHS = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9)


def log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)


def to_tensor(images: list[np.ndarray] | np.ndarray) -> Tensor:
    """HWC float images -> BCHW float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2), dtype=np.float32))


def render(world: ToyFaceWorld, n: int, split: str, seed: int) -> list[ToyFace]:
    return world.sample(n, SIZE, split, seed)


def degraded(images: np.ndarray, seed: int, strengths: np.ndarray) -> np.ndarray:
    """Seeded "diffbir" degradation of each image at its own strength."""
    return np.stack([degrade(img, "diffbir", seed, i, strength=float(s))[0] for i, (img, s) in enumerate(zip(images, strengths))])


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def augment(
    sources: list[Tensor], probs: list[float], idx: Tensor, gen: torch.Generator, shift: int,
    lmk: Tensor | None = None, flip: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """A batch: each sample from a random source (clean / degraded), shifted by up to `shift` px,
    optionally flipped, with a mild per-channel colour gain; landmarks (pixel xy) follow."""
    b = len(idx)
    choice = torch.multinomial(torch.tensor(probs), b, replacement=True, generator=gen)
    x = torch.stack([sources[int(c)][int(i)] for c, i in zip(choice, idx)])
    pts = None if lmk is None else lmk[idx].clone()
    if flip:
        fl = torch.rand(b, generator=gen) < 0.5
        x[fl] = x[fl].flip(-1)
        if pts is not None:
            perm = torch.tensor(IBUG_FLIP)
            flipped = pts[fl][:, perm]
            flipped[..., 0] = SIZE - 1 - flipped[..., 0]
            pts[fl] = flipped
    if shift:
        pad = F.pad(x, (shift,) * 4, mode="replicate")
        off = torch.randint(0, 2 * shift + 1, (b, 2), generator=gen)
        x = torch.stack([pad[k, :, oy : oy + SIZE, ox : ox + SIZE] for k, (ox, oy) in enumerate(off.tolist())])
        if pts is not None:
            pts = pts + (shift - off).to(pts.dtype)[:, None, :]
    gain = 1.0 + 0.08 * (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1)
    bias = 0.04 * (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1)
    return (x * gain + bias).clamp(0, 1), pts


def train_identity(data: dict, args: argparse.Namespace, t0: float) -> ToyIdentityEmbedder:
    """CosFace (s=30, m=0.25) on the train identities with degradation augmentation."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 11)
    model = ToyIdentityEmbedder()
    labels = data["labels"]
    n_cls = int(labels.max()) + 1
    weight = torch.nn.Parameter(F.normalize(torch.randn(n_cls, model.dim), dim=-1))
    params = list(model.parameters()) + [weight]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=5e-4)
    s, m = 30.0, 0.25
    sources = [data["clean"], data["strong"], data["mild"]]
    model.train()
    n = len(labels)
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * cosine_schedule(step, args.steps, args.steps // 20)
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        x, _ = augment(sources, [0.4, 0.35, 0.25], idx, gen, shift=2)
        emb = model(x)
        cos = emb @ F.normalize(weight, dim=-1).t()
        y = labels[idx]
        logits = s * (cos - m * F.one_hot(y, n_cls))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            acc = (cos.argmax(1) == y).float().mean().item()
            log(f"id  step {step:4d}/{args.steps}  loss {loss.item():.3f}  train-acc {acc:.2f}", t0)
    return model.eval()


def train_landmarks(data: dict, args: argparse.Namespace, t0: float) -> ToyLandmarkRegressor:
    """L1 in pixels on normalised soft-argmax coordinates, with shift/flip/mild-degradation augmentation."""
    torch.manual_seed(args.seed + 1)
    gen = torch.Generator().manual_seed(args.seed + 12)
    model = ToyLandmarkRegressor()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sources = [data["clean"], data["mild"], data["strong"]]
    lmk = data["landmarks"]
    model.train()
    n = len(lmk)
    for step in range(args.lmk_steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * cosine_schedule(step, args.lmk_steps, args.lmk_steps // 20)
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        x, pts = augment(sources, [0.45, 0.4, 0.15], idx, gen, shift=3, lmk=lmk, flip=True)
        pred = model(x) * SIZE - 0.5
        loss = (pred - pts).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.lmk_steps - 1:
            err = (pred - pts).norm(dim=-1).mean().item()
            log(f"lmk step {step:4d}/{args.lmk_steps}  L1 {loss.item():.3f}  err {err:.2f} px", t0)
    return model.eval()


def batched(fn, x: Tensor, bs: int = 200) -> Tensor:
    return torch.cat([fn(x[i : i + bs]) for i in range(0, len(x), bs)])


def evaluate(id_model: ToyIdentityEmbedder, lmk_model: ToyLandmarkRegressor, world: ToyFaceWorld, args, t0: float) -> dict:
    """Verification on held-out identities (threshold from one face set, accuracy/AUC on another),
    landmark error on clean and strength-0.3 held-out faces, and mean IDS vs degradation strength."""
    sets = {}
    for key, seed in EVAL_SEEDS.items():
        faces = render(world, args.eval_faces, "test", seed)
        sets[key] = {
            "x": to_tensor([f.image for f in faces]),
            "ids": np.array([f.identity for f in faces]),
            "lmk": torch.from_numpy(np.stack([f.landmarks for f in faces])),
            "np": np.stack([f.image for f in faces]),
        }
    log(f"rendered 2 x {args.eval_faces} held-out faces", t0)

    def pair_scores(emb: Tensor, ids: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        pairs, same = verification_pairs(ids, args.pairs, seed)
        e = emb.double()
        return (e[pairs[:, 0]] * e[pairs[:, 1]]).sum(-1).numpy(), same

    thr_set, rep = sets["threshold"], sets["report"]
    s_thr, same_thr = pair_scores(batched(id_model.embed, thr_set["x"]), thr_set["ids"], EVAL_SEEDS["threshold"])
    threshold = best_threshold(s_thr, same_thr)
    emb_clean = batched(id_model.embed, rep["x"])
    s_rep, same_rep = pair_scores(emb_clean, rep["ids"], EVAL_SEEDS["report"])

    # Degraded copies of the report set (same seed/index per face as strength varies).
    deg = {st: rep["np"] if st == 0 else degraded(rep["np"], 77, np.full(len(rep["np"]), st)) for st in IDS_STRENGTHS}
    ids_curve, ver_deg = {}, {}
    for st, imgs in deg.items():
        e = batched(id_model.embed, to_tensor(imgs))
        ids_curve[f"{st:g}"] = float((e.double() * emb_clean.double()).sum(-1).mean())
        if st in (0.3, 0.6):
            # verification with one side degraded: pair (clean i, degraded j)
            pairs, same = verification_pairs(rep["ids"], args.pairs, EVAL_SEEDS["report"])
            sc = (emb_clean[pairs[:, 0]].double() * e[pairs[:, 1]].double()).sum(-1).numpy()
            ver_deg[f"{st:g}"] = {"accuracy": verification_accuracy(sc, same, threshold), "roc_auc": roc_auc(sc, same)}
    log("identity evaluated", t0)

    def lmk_err(imgs: np.ndarray) -> float:
        pred = batched(lmk_model.detect, to_tensor(imgs))
        return float((pred.double() - rep["lmk"].double()).norm(dim=-1).mean())

    lmk_curve = {f"{st:g}": lmk_err(imgs) for st, imgs in deg.items()}
    log("landmarks evaluated", t0)
    return {
        "world": WORLD,
        "size": SIZE,
        "identity": {
            "name": id_model.name,
            "held_out_identities": len(world.identities("test")),
            "pairs": {"same": args.pairs, "different": args.pairs},
            "threshold": threshold,
            "threshold_from": f"best accuracy on pairs of {args.eval_faces} test-split faces, world.sample(seed={EVAL_SEEDS['threshold']})",
            "threshold_set_accuracy": verification_accuracy(s_thr, same_thr, threshold),
            "accuracy": verification_accuracy(s_rep, same_rep, threshold),
            "roc_auc": roc_auc(s_rep, same_rep),
            "reported_on": f"pairs of {args.eval_faces} test-split faces, world.sample(seed={EVAL_SEEDS['report']})",
            "mean_cos_same": float(s_rep[same_rep].mean()),
            "mean_cos_different": float(s_rep[~same_rep].mean()),
            "clean_vs_degraded": ver_deg,
            "ids_to_clean_vs_strength": ids_curve,
        },
        "landmarks": {
            "name": lmk_model.name,
            "faces": args.eval_faces,
            "mean_error_px_clean": lmk_curve["0"],
            "mean_error_px_strength_0.3": lmk_curve["0.3"],
            "error_px_vs_strength": lmk_curve,
            "reported_on": f"test-split faces, world.sample(seed={EVAL_SEEDS['report']}); degradation 'diffbir' seed 77",
        },
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (the shipped judges: src/facereward/weights/toy-judges)")
    p.add_argument("--steps", type=int, default=600, help="identity-embedder steps")
    p.add_argument("--lmk-steps", type=int, default=None, help="landmark-regressor steps (default: --steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faces", type=int, default=2400, help="train-identity faces rendered for training")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-faces", type=int, default=400, help="faces per held-out evaluation set")
    p.add_argument("--pairs", type=int, default=1000, help="same (and as many different) pairs for verification")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=None, help="optional .npz under /tmp to reuse the rendered training data")
    p.add_argument("--quick", action="store_true", help="a smoke run: 4 steps on 128 faces, 160 held-out faces (also under FACEREWARD_SMOKE=1)")
    args = p.parse_args(argv)
    if args.quick or smoke.active():
        args.steps, args.lmk_steps, args.faces, args.eval_faces, args.pairs, args.batch = 4, 4, 128, 160, 16, 16
    args.lmk_steps = args.steps if args.lmk_steps is None else args.lmk_steps
    if args.cache is not None and not str(args.cache.resolve()).startswith("/tmp/"):
        p.error("--cache must be under /tmp")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    world = ToyFaceWorld(**WORLD)

    if args.cache is not None and args.cache.is_file():
        z = np.load(args.cache)
        clean, landmarks, identities = z["clean"], z["landmarks"], z["identities"]
        strong, mild = z["strong"], z["mild"]
        log(f"loaded {len(clean)} faces from {args.cache}", t0)
    else:
        faces = render(world, args.faces, "train", args.seed)
        clean = np.stack([f.image for f in faces])
        landmarks = np.stack([f.landmarks for f in faces]).astype(np.float32)
        identities = np.array([f.identity for f in faces])
        log(f"rendered {len(faces)} train faces of {len(world.identities('train'))} identities", t0)
        rng = np.random.default_rng([args.seed, 303])
        strong = degraded(clean, args.seed + 1, rng.uniform(0.0, 0.5, len(clean)))
        mild = degraded(clean, args.seed + 2, rng.uniform(0.0, 0.3, len(clean)))
        log("degraded copies made", t0)
        if args.cache is not None:
            np.savez(args.cache, clean=clean, landmarks=landmarks, identities=identities, strong=strong, mild=mild)
    label_of = {ident: k for k, ident in enumerate(world.identities("train"))}
    data = {
        "clean": to_tensor(clean),
        "strong": to_tensor(strong),
        "mild": to_tensor(mild),
        "landmarks": torch.from_numpy(landmarks),
        "labels": torch.tensor([label_of[int(i)] for i in identities]),
    }

    t_id = time.time()
    id_model = train_identity(data, args, t0)
    t_id = time.time() - t_id
    t_lmk = time.time()
    lmk_model = train_landmarks(data, args, t0)
    t_lmk = time.time() - t_lmk

    metrics = evaluate(id_model, lmk_model, world, args, t0)
    id_model.threshold = metrics["identity"]["threshold"]
    metrics["training"] = {
        "seed": args.seed,
        "faces": args.faces,
        "identity_steps": args.steps,
        "landmark_steps": args.lmk_steps,
        "batch": args.batch,
        "lr": args.lr,
        "threads": args.threads,
        "identity_train_s": round(t_id, 1),
        "landmark_train_s": round(t_lmk, 1),
        "total_s": round(time.time() - t0, 1),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_toy_judge(id_model, args.out)
    save_toy_judge(lmk_model, args.out)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    ident, lm = metrics["identity"], metrics["landmarks"]
    log(
        f"held-out verification acc {ident['accuracy']:.3f} (AUC {ident['roc_auc']:.3f}, thr {ident['threshold']:.3f}); "
        f"landmark error {lm['mean_error_px_clean']:.2f} px clean, {lm['mean_error_px_strength_0.3']:.2f} px at 0.3; "
        f"wrote {args.out}",
        t0,
    )


if __name__ == "__main__":
    main()
