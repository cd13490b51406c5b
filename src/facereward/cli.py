"""The `facereward` command: thin wrappers over the library; every trainer option also settable from YAML."""

from __future__ import annotations

import inspect
import os
import sys
import time
from pathlib import Path

import typer

app = typer.Typer(
    help="Reward-aligned blind face restoration: degradation, toy faces, base and reward training (ReFL, LRPO), restoration, evaluation, demo.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SET_HELP = "Override any config field, e.g. --set run.seed=1 --set model.size=128 (repeatable)."
DEGRADATION_MODULE_HELP = "Module or .py file that registers degradations with register_degradation (repeatable; sets imports)."


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


# Known user errors by (module, class): checked only in modules already imported, so `--help` imports no torch.
_USER_ERRORS = (("facereward.config", "ConfigError"), ("facereward.data.imageio", "ImageError"),
                ("facereward.models.restorer", "ModelFolderError"), ("facereward.train.checkpoints", "CheckpointError"),
                ("facereward.models.checkpoint_io", "CheckpointError"))
_started = time.monotonic()


def _is_user_error(err: BaseException) -> bool:
    classes = [getattr(sys.modules[m], name) for m, name in _USER_ERRORS if m in sys.modules]
    return isinstance(err, (*classes, FileNotFoundError, NotADirectoryError, ValueError))


def run(argv: list[str] | None = None) -> int:
    """Run one command line (argv without the program name); returns the exit status.

    Known user errors become one line on stderr (FACEREWARD_DEBUG=1 shows the traceback). Under
    FACEREWARD_SMOKE=1 the command runs scaled down (facereward.smoke).
    """
    from facereward import smoke

    global _started
    _started = time.monotonic()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = smoke.scale_argv(list(sys.argv[1:] if argv is None else argv))
    if smoke.active() and argv and "--help" not in argv:
        typer.secho(f"{smoke.ENV}=1: a scaled-down smoke run (a few steps and images), not a real result", err=True,
                    fg=typer.colors.YELLOW)
    try:
        app(args=argv, prog_name="facereward", standalone_mode=True)
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except Exception as err:
        if os.environ.get("FACEREWARD_DEBUG") or not _is_user_error(err):
            raise
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        return 2
    return 0


def main() -> None:
    """The console entry point."""
    sys.exit(run())


def _elapsed() -> str:
    seconds = time.monotonic() - _started
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _done(message: str) -> None:
    """The closing line of a command: what it wrote where, and how long it took."""
    typer.echo(f"{message} ({_elapsed()})")


def _is_main_process() -> bool:
    # From the launcher's RANK, not accelerate's PartialState: creating that state before the trainer's
    # Accelerator would fix its settings (a CPU multi-process run would then not join its peers).
    return os.environ.get("RANK", "0") == "0"


def _device(name: str | None):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


SPACING_HELP = "Timestep spacing: leading (ldm DDIM, both papers), linspace (DiffBIR's spaced sampler) or trailing (default: the model's)."
FINAL_ALPHA_HELP = "Alpha-bar after the last step: one (sigma 0 there) or first (alpha-bar_0, ldm's DDIM) (default: the model's)."
COLOUR_FIX_HELP = "DiffBIR's wavelet colour fix towards the stage-1 output (default: the model's; on for imported DiffBIR)."


def _sampler(spacing: str | None, final_alpha_bar: str | None, colour_fix: bool | None):
    from facereward.models.ddim import FINAL_ALPHA_BARS, SPACINGS
    from facereward.models.restorer import SamplerOptions

    if spacing is not None and spacing not in SPACINGS:
        _fail(f"--spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    if final_alpha_bar is not None and final_alpha_bar not in FINAL_ALPHA_BARS:
        _fail(f"--final-alpha-bar must be one of {', '.join(FINAL_ALPHA_BARS)}, got {final_alpha_bar!r}")
    return SamplerOptions(spacing=spacing, final_alpha_bar=final_alpha_bar, colour_fix=colour_fix)


def _eta(text: str | None):
    if text is None:
        return None
    if text == "random":
        return "random"
    try:
        return float(text)
    except ValueError:
        _fail(f"--eta must be a number or 'random', got {text!r}")


@app.command()
def degrade(
    hq_dir: Path = typer.Argument(..., help="Folder of HQ face images."),
    out_dir: Path = typer.Argument(..., help="Writes OUT/lq, OUT/hq and OUT/manifest.json."),
    preset: str = typer.Option("diffbir", help="Degradation preset (diffbir, codeformer, gfpgan, difface, or a registered one)."),
    seed: int = typer.Option(0, help="Seed; (seed, image index) fixes each image's degradation."),
    size: int | None = typer.Option(None, help="Require this square size (a mismatch skips the file)."),
    convert: bool = typer.Option(False, help="Accept grayscale/RGBA inputs by converting them to RGB."),
    degradation_module: list[str] = typer.Option([], "--degradation-module", help=DEGRADATION_MODULE_HELP),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Write a paired synthetic test set (lq/, hq/, manifest.json), like CelebA-Test."""
    import warnings

    from facereward.data.testset import write_degraded_testset
    from facereward.data.toyfaces import is_toy_folder
    from facereward.plugins import import_plugins

    import_plugins(degradation_module, option="--degradation-module")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entries = write_degraded_testset(hq_dir, out_dir, preset=preset, seed=seed, size=size, progress=progress, convert=convert)
    for w in caught:
        typer.secho(f"warning: {w.message}", err=True, fg=typer.colors.YELLOW)
    toy = "; toy world: evaluate and candidates will use the toy judges" if is_toy_folder(out_dir) else ""
    _done(f"wrote {len(entries)} pairs to {out_dir}/lq, {out_dir}/hq and {out_dir}/manifest.json (preset {preset}, seed {seed}){toy}")


@app.command()
def toyfaces(
    out_dir: Path = typer.Argument(..., help="Output folder (train/ and test/ splits by identity)."),
    n: int = typer.Option(2000, help="Number of faces in all."),
    size: int = typer.Option(64, help="Image size in pixels (square)."),
    seed: int = typer.Option(0, help="World seed."),
    identities: int | None = typer.Option(None, help="Number of identities (default n // 10, at least 10)."),
    test_fraction: float = typer.Option(0.2, help="Fraction of identities held out for test."),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), help="Worker processes rendering in parallel (same files for any count)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Write procedural toy faces with landmarks, captions and identity ids."""
    from facereward.data.toyfaces import write_toyfaces

    manifest = write_toyfaces(out_dir, n=n, size=size, seed=seed, n_identities=identities, test_fraction=test_fraction,
                              progress=progress, workers=workers)
    _done(f"wrote {manifest['train']} train and {manifest['test']} test faces to {out_dir}/train/images and {out_dir}/test/images")


@app.command("train-base")
def train_base_cmd(
    config: Path | None = typer.Option(None, "--config", help="YAML config (fields of TrainBaseConfig)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    hq_dir: Path | None = typer.Option(None, help="Folder of HQ faces (sets data.hq_dir)."),
    toy_faces: int | None = typer.Option(None, help="Train on N procedural toy faces instead (sets data.toy_faces)."),
    output_dir: Path | None = typer.Option(None, help="Run folder (sets run.output_dir)."),
    resume: str | None = typer.Option(None, help="'latest' (the newest valid checkpoint), 'auto' (the same, or a fresh "
                                      "start if there is none) or a checkpoint folder (sets run.resume)."),
    degradation_module: list[str] = typer.Option([], "--degradation-module", help=DEGRADATION_MODULE_HELP),
) -> None:
    """Train the base restorer: stage 1 (cleaner, L1) then stage 2 (diffusion, epsilon loss).

    Without --config the defaults are a full run: 1,000 stage-1 and 5,000 stage-2 steps at batch 16
    (about 35 min for the 64 px toy model on 2 CPU cores) into runs/base; the first line printed says
    what will run. `--config scripts/toy_restorer.yaml` is the shipped toy model's recipe.
    """
    from facereward.config import load_config
    from facereward.train.base import TrainBaseConfig, train_base

    overrides = list(set_)
    if hq_dir is not None:
        overrides.append(f"data.hq_dir={hq_dir}")
    if toy_faces is not None:
        overrides.append(f"data.toy_faces={toy_faces}")
    if output_dir is not None:
        overrides.append(f"run.output_dir={output_dir}")
    if resume is not None:
        overrides.append(f"run.resume={resume}")
    overrides += _module_overrides("imports", degradation_module)
    cfg = load_config(TrainBaseConfig, config, overrides)
    _announce("train-base", cfg)
    out = train_base(cfg)
    _finish(f"saved the restorer to {out}", out.parent)


@app.command("train-frm")
def train_frm_cmd(
    config: Path | None = typer.Option(None, "--config", help="YAML config (fields of TrainFRMConfig)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    pairs: Path | None = typer.Option(None, help="Preference JSONL (sets pairs)."),
    eval_pairs: Path | None = typer.Option(None, help="Held-out preference JSONL (default: a split of --pairs by LQ input)."),
    output_dir: Path | None = typer.Option(None, help="Run folder (sets run.output_dir)."),
    resume: str | None = typer.Option(None, help="'latest' (the newest valid checkpoint), 'auto' (the same, or a fresh "
                                      "start if there is none) or a checkpoint folder (sets run.resume)."),
) -> None:
    """Train the Face Reward Model on preference pairs (Bradley-Terry with a learnable logit scale)."""
    from facereward.config import load_config
    from facereward.train.frm import TrainFRMConfig, train_frm

    overrides = list(set_)
    for key, value in (("pairs", pairs), ("eval_pairs", eval_pairs), ("run.output_dir", output_dir), ("run.resume", resume)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(TrainFRMConfig, config, overrides)
    _announce("train-frm", cfg)
    best = train_frm(cfg)
    _finish(f"saved the best FRM (by held-out accuracy) to {best} and the last to {best.parent / 'model'}", best.parent)


def _reward_overrides(reward: list[str], reward_module: list[str], key: str = "rewards.weights") -> list[str]:
    """`--reward NAME=WEIGHT` (replacing the default composite at `key`) and `--reward-module` as config overrides."""
    overrides = []
    if reward:
        overrides.append(f"{key}={{}}")
        for item in reward:
            name, sep, weight = item.partition("=")
            if not sep or not name:
                _fail(f"--reward expects NAME=WEIGHT, got {item!r}")
            overrides.append(f"{key}.{name}={weight}")
    return overrides + _module_overrides("imports", reward_module)


def _module_overrides(key: str, modules: list[str]) -> list[str]:
    """`--reward-module` / `--degradation-module` values as one `KEY=[...]` override (none if no module)."""
    return [f"{key}=[{', '.join(repr(str(m)) for m in modules)}]"] if modules else []


def _announce(kind: str, config) -> None:
    """The first line of a training command: what will run, where it goes, how to continue it."""
    from facereward.train.summary import describe_run

    if _is_main_process():
        typer.echo(describe_run(kind, config))


def _finish(message: str, run_dir: Path) -> None:
    """The closing lines of a training command: its final figures, the TensorBoard line, where and how long."""
    from facereward.train.summary import final_figures

    if _is_main_process():
        for line in final_figures(run_dir):
            typer.echo(line)
        _done(message)


@app.command("refl")
def refl_cmd(
    config: Path | None = typer.Option(None, "--config", help="YAML config (fields of ReFLConfig)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    init_from: Path | None = typer.Option(None, help="Restorer folder to fine-tune (default: the shipped toy restorer)."),
    frm: Path | None = typer.Option(None, help="Face Reward Model folder (default: the shipped toy FRM)."),
    hq_dir: Path | None = typer.Option(None, help="Folder of HQ faces (sets data.hq_dir)."),
    toy_faces: int | None = typer.Option(None, help="Train on N procedural toy faces instead (sets data.toy_faces)."),
    train_steps: int | None = typer.Option(None, help="Optimizer steps (sets train_steps)."),
    lora_rank: int | None = typer.Option(None, help="Train LoRA adapters of this rank instead of the full network."),
    output_dir: Path | None = typer.Option(None, help="Run folder (sets run.output_dir)."),
    resume: str | None = typer.Option(None, help="'latest' (the newest valid checkpoint), 'auto' (the same, or a fresh "
                                      "start if there is none) or a checkpoint folder (sets run.resume)."),
    reward: list[str] = typer.Option([], "--reward", help="NAME=WEIGHT: the reward term's composite (repeatable; replaces frm=1; "
                                     "frm is the dynamic FRM; differentiable rewards only)."),
    reward_module: list[str] = typer.Option([], "--reward-module", help="Module or .py file that registers custom measures (repeatable; sets imports)."),
    lpips_backbone: Path | None = typer.Option(None, help="LPIPS backbone weights for the structural term (sets losses.options.lpips.backbone_path)."),
    lpips_heads: Path | None = typer.Option(None, help="LPIPS linear heads for the structural term (sets losses.options.lpips.heads_path)."),
    no_reward: bool = typer.Option(False, "--no-reward", help="Ablation: drop the FRM reward term."),
    no_regulariser: bool = typer.Option(False, "--no-regulariser", help="Ablation: drop the regulariser vs the initial network."),
    no_structural: bool = typer.Option(False, "--no-structural", help="Ablation: drop the wavelet low-pass and LPIPS terms."),
    no_dynamic_frm: bool = typer.Option(False, "--no-dynamic-frm", help="Ablation: keep the FRM fixed."),
    degradation_module: list[str] = typer.Option([], "--degradation-module", help=DEGRADATION_MODULE_HELP),
) -> None:
    """DiffusionReward: Reward Feedback Learning with a dynamic Face Reward Model (docs/methods.md 1.2)."""
    from facereward.config import load_config
    from facereward.train.refl import ReFLConfig, train_refl

    overrides = list(set_) + _reward_overrides(reward, [*reward_module, *degradation_module])
    for key, value in (("init_from", init_from), ("rewards.options.frm.path", frm), ("data.hq_dir", hq_dir),
                       ("data.toy_faces", toy_faces), ("train_steps", train_steps), ("lora.rank", lora_rank),
                       ("run.output_dir", output_dir), ("run.resume", resume),
                       ("losses.options.lpips.backbone_path", lpips_backbone), ("losses.options.lpips.heads_path", lpips_heads)):
        if value is not None:
            overrides.append(f"{key}={value}")
    for flag, keys in ((no_reward, ["reward_weight"]), (no_regulariser, ["reg_weight"]),
                       (no_structural, ["losses.weights"]), (no_dynamic_frm, ["dynamic_frm.every"])):
        if flag:
            overrides += [f"{k}={{}}" if k == "losses.weights" else f"{k}=0" for k in keys]
    cfg = load_config(ReFLConfig, config, overrides)
    _announce("refl", cfg)
    model = train_refl(cfg)
    frm_note = f" and the evolved FRM to {model.parent / 'frm'}" if cfg.dynamic_frm.every > 0 else " (the FRM stayed fixed)"
    _finish(f"saved the ReFL restorer to {model}{frm_note}", model.parent)


@app.command()
def candidates(
    first: Path = typer.Argument(..., help="TESTSET OUT_DIR, or only OUT_DIR with --testset."),
    second: Path | None = typer.Argument(None, help="OUT_DIR: the candidates folder for `facereward annotate`."),
    testset_option: Path | None = typer.Option(None, "--testset", help="The paired test set (lq/ and optionally hq/), as in evaluate."),
    model: list[str] = typer.Option([], "--model", help="NAME=DIR restorer (repeatable; candidates cycle over models)."),
    k: int = typer.Option(4, help="Restorations per LQ input."),
    etas: str = typer.Option("0,0.5,1", help="Comma-separated eta values cycled over candidates."),
    steps: int = typer.Option(50, "--sample-steps", "--steps", help="DDIM steps."),
    spacing: str | None = typer.Option(None, help=SPACING_HELP),
    final_alpha_bar: str | None = typer.Option(None, help=FINAL_ALPHA_HELP),
    colour_fix: bool | None = typer.Option(None, "--colour-fix/--no-colour-fix", help=COLOUR_FIX_HELP),
    seed: int = typer.Option(0, help="Seed (candidate j of input i uses its own seed)."),
    include_lq: bool = typer.Option(False, help="Add the LQ input as a candidate."),
    include_gt: bool = typer.Option(False, help="Add the GT as a candidate (needs hq/)."),
    batch_size: int = typer.Option(8, help="Images per batch."),
    device: str | None = typer.Option(None, help="cpu or cuda."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """k restorations per LQ input (seeds, eta values, models), laid out for annotation: candidates TESTSET OUT_DIR."""
    from facereward.candidates import make_candidates
    from facereward.weights import default_restorer_path

    if testset_option is not None and second is not None:
        _fail("give the test set once: `candidates TESTSET OUT_DIR` or `candidates --testset TESTSET OUT_DIR`")
    if testset_option is None and second is None:
        _fail("candidates needs a test set and an output folder: `candidates TESTSET OUT_DIR`")
    testset, out_dir = (testset_option, first) if testset_option is not None else (first, second)

    models = _named_paths(model, "--model") or {"base": str(default_restorer_path())}
    try:
        eta_values = [float(e) for e in etas.split(",") if e.strip()]
    except ValueError:
        _fail(f"--etas must be comma-separated numbers, got {etas!r}")
    out = make_candidates(testset, out_dir, models, k=k, etas=eta_values, steps=steps, seed=seed, include_lq=include_lq,
                          include_gt=include_gt, batch_size=batch_size, progress=progress, device=device,
                          sampler=_sampler(spacing, final_alpha_bar, colour_fix))
    _done(f"wrote candidates to {out}; label them with: facereward annotate {out}")


@app.command("toy-preferences")
def toy_preferences(
    out_dir: Path = typer.Argument(..., help="Output folder (candidates, testset/ and pairs.jsonl)."),
    n_inputs: int = typer.Option(200, help="Toy faces (LQ inputs)."),
    k: int = typer.Option(3, help="Restorations per input (plus the LQ, graded degradations of the GT and the GT)."),
    split: str = typer.Option("train", help="Identities: train (FRM training data) or test (held-out pairs)."),
    model: Path | None = typer.Option(None, help="Restorer (default: the shipped toy restorer)."),
    steps: int = typer.Option(20, "--sample-steps", "--steps", help="DDIM steps."),
    noise: float = typer.Option(0.0, help="Oracle label noise (Bradley-Terry temperature); 0 is noiseless."),
    seed: int = typer.Option(0, help="Seed."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """A preference set with no person in the loop: toy candidates labelled by the hidden-quality oracle."""
    from facereward.labelling.oracle import build_toy_preferences

    pairs = build_toy_preferences(out_dir, n_inputs=n_inputs, k=k, model=model, seed=seed, steps=steps, split=split,
                                  noise=noise, progress=progress)
    _done(f"wrote {sum(1 for _ in open(pairs))} oracle-labelled pairs to {pairs}")


@app.command("auto-label")
def auto_label(
    folder: Path = typer.Argument(..., help="Candidates folder with GT (gt/)."),
    human: Path = typer.Option(..., help="Human-labelled pairs (JSONL) of this folder."),
    out: Path = typer.Option(..., help="Where to write the automatically labelled pairs (JSONL)."),
    kind: str = typer.Option("svm", help="svm (linear) or logreg."),
    min_confidence: float = typer.Option(0.6, help="Skip pairs the labeller is less sure of than this."),
    held_out_fraction: float = typer.Option(0.25, help="Part of the human pairs held out to report agreement."),
    identity: str = typer.Option("auto", help="Identity feature: auto (toy for toy sets, else dlib), toy, dlib, none."),
) -> None:
    """Train the automatic labeller on human pairs (reporting held-out agreement) and label the rest."""
    from facereward.data.preferences import load_pairs
    from facereward.data.toyfaces import is_toy_folder
    from facereward.labelling.auto import (
        AutoLabeller,
        FullReferenceFeatures,
        auto_labeller_agreement,
    )

    pairs = load_pairs(human)
    if identity == "auto":
        identity = "toy" if is_toy_folder(folder) else "dlib"
    features = FullReferenceFeatures(identity=identity)
    report = auto_labeller_agreement(pairs, kind=kind, held_out_fraction=held_out_fraction, features=features)
    typer.echo(f"agreement with held-out human pairs: {report['agreement']:.3f} ({report['n_test']} pairs; trained on {report['n_train']})")
    n = AutoLabeller(kind, features=features).fit([p for p in pairs if not p.tie]).label_unlabelled(folder, pairs, out, min_confidence)
    _done(f"wrote {n} automatically labelled pairs to {out}")


@app.command()
def annotate(
    folder: Path = typer.Argument(..., help="A candidates folder (candidates.json, lq/, gt/, candidates/) from `facereward candidates`."),
    labels: Path | None = typer.Option(None, help="Labels JSONL (default FOLDER/labels.jsonl); appended to at every label."),
    annotator: str = typer.Option("anonymous", help="Your name, stored with each label."),
    host: str = typer.Option("127.0.0.1", help="Bind address (loopback by default; anything else is reachable from the network)."),
    port: int = typer.Option(8765, help="Port (0: any free one)."),
    pairs_per_item: int | None = typer.Option(None, help="Pairs to label per LQ input (default: all k(k-1)/2)."),
    seed: int = typer.Option(0, help="Seed of the pair order and left/right placement."),
) -> None:
    """A local web page to label preference pairs with the keyboard; every label is saved at once, restarts resume."""
    from facereward.annotate import run_annotate

    run_annotate(folder, labels=labels, host=host, port=port, annotator=annotator, pairs_per_item=pairs_per_item, seed=seed)


@app.command()
def study(
    folders: list[str] = typer.Argument(..., help="Restored images, one folder per method: DIR (the method is named after "
                                                  "the folder) or NAME=DIR. Images are matched across folders by file stem."),
    lq: Path | None = typer.Option(None, help="The inputs (matched by file stem), shown beside each pair as the reference."),
    out: Path = typer.Option(Path("study.jsonl"), help="Answers JSONL: one line appended (and fsynced) at every answer; "
                                                       "restarting on the same file resumes each rater."),
    rater: str | None = typer.Option(None, help="Record this rater only (default: the page asks for a name, so several raters "
                                                "can take part, each with their own sequence)."),
    host: str = typer.Option("127.0.0.1", help="Bind address: loopback only (127.0.0.1, ::1, localhost); others are refused."),
    port: int = typer.Option(8766, help="Port (0: any free one)."),
    pairs_per_image: int | None = typer.Option(None, help="Pairs of methods per image for each rater (default: all M(M-1)/2)."),
    seed: int = typer.Option(0, help="Seed of each rater's sequence (with the rater's name): the pairs, the image order, the sides."),
) -> None:
    """A blind pairwise user study: one input restored by two methods side by side, answered with the keyboard.

    Method names never reach the page (images are served by random tokens); the pair, the image order and the
    left/right sides are drawn per rater (seeded, so a restart shows the same sequence). Keys: <- / 1 left better,
    -> / 2 right better, down / = / 3 tie (can't tell), Backspace / u undo. Analyse with `facereward study-results`.
    """
    from facereward.study import parse_method_args, run_study

    run_study(parse_method_args(folders), out=out, lq=lq, rater=rater, host=host, port=port,
              pairs_per_image=pairs_per_image, seed=seed)


@app.command("study-results")
def study_results(
    answers: Path = typer.Argument(..., help="Answers JSONL written by `facereward study`."),
    out: Path | None = typer.Option(None, help="Folder for study_results.json and study_results.md (default: the answers file's folder)."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples (of the answers, with replacement) for the Bradley-Terry intervals."),
    seed: int = typer.Option(0, help="Seed of the bootstrap."),
    bt_prior: float = typer.Option(1.0, help="Virtual tied comparisons added to every pair of methods in Bradley-Terry "
                                             "(keeps strengths finite when a method never won or never lost; 0: the plain MLE)."),
) -> None:
    """Win rates with 95% Wilson intervals, a Bradley-Terry ranking with bootstrap intervals, and rater agreement.

    Ties count as half a win. Bradley-Terry strengths by Hunter's MM algorithm, log-strengths summing to 0;
    agreement as percent agreement and Fleiss' kappa over comparisons answered by several raters (Cohen's kappa
    per pair of raters). Prints a markdown table and writes study_results.json and study_results.md.
    """
    from facereward.study import analyse, load_answers, write_results

    if bootstrap < 1:
        _fail(f"--bootstrap must be >= 1, got {bootstrap}")
    results = analyse(load_answers(answers), n_bootstrap=bootstrap, seed=seed, prior=bt_prior)
    results["answers_file"] = str(answers)
    json_path, md_path, markdown = write_results(results, out if out is not None else answers.parent, title=f"Study results: {answers.name}")
    typer.echo(markdown, nl=False)
    typer.echo(f"wrote {json_path} and {md_path} ({_elapsed()})", err=True)


@app.command("build-restorer")
def build_restorer(
    out_dir: Path = typer.Argument(..., help="Where to write the new restorer folder."),
    from_sd: Path | None = typer.Option(None, help="A local diffusers Stable Diffusion folder (e.g. SD 2.1 base): builds the latent DiffBIR-style restorer."),
    size: int = typer.Option(512, help="Face size in pixels (with --from-sd)."),
    config: Path | None = typer.Option(None, "--config", help="YAML of RestorerConfig fields (without --from-sd: a random-init restorer)."),
    set_: list[str] = typer.Option([], "--set", help="Override RestorerConfig fields, e.g. --set mode=latent."),
) -> None:
    """Create an untrained restorer folder to train with `train-base --set init_from=OUT`."""
    from facereward.config import load_config
    from facereward.models.restorer import Restorer, RestorerConfig

    cfg = load_config(RestorerConfig, config, set_)
    restorer = Restorer.from_stable_diffusion(from_sd, size=size, config=cfg) if from_sd else Restorer.build(cfg)
    restorer.save_pretrained(out_dir)
    n_train = sum(p.numel() for p in restorer.stage2_trainable().parameters())
    _done(f"wrote a {restorer.mode}-mode restorer ({restorer.config.size} px, {n_train / 1e6:.1f}M trainable stage-2 parameters) to {out_dir}")


@app.command("import-diffbir")
def import_diffbir(
    out_dir: Path = typer.Argument(..., help="Where to write the restorer folder (written only once all three files load)."),
    sd: Path = typer.Option(..., "--sd", help="Stable Diffusion 2.1: an ldm .ckpt/.safetensors (v2-1_512-ema-pruned.ckpt) or a diffusers folder."),
    controlnet: Path = typer.Option(..., "--controlnet", help="DiffBIR's IRControlNet (v1_face.pth) or a fine-tuned one of its layout (DiffusionReward's, LRPO's)."),
    swinir: Path = typer.Option(..., "--swinir", help="The stage-1 face SwinIR (face_swinir_v1.ckpt)."),
    size: int = typer.Option(512, help="Face size in pixels (a multiple of 64)."),
    head_channels: int = typer.Option(64, help="Attention head width (not recorded in the weights; 64 in SD 2.1)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """DiffBIR v1-face from its own files as a restorer folder that restore, evaluate, refl and lrpo take."""
    from facereward.models.diffbir_import import import_diffbir as run_import

    restorer = run_import(out_dir, sd, controlnet, swinir, size=size, head_channels=head_channels, progress=progress)
    n_train = sum(p.numel() for p in restorer.controlnet.parameters())
    _done(f"wrote DiffBIR v1-face ({restorer.config.size} px, {n_train / 1e6:.1f}M ControlNet parameters; linspace spacing, "
          f"eta 1, wavelet colour fix) to {out_dir}")


@app.command("import-osediff")
def import_osediff(
    out_dir: Path = typer.Argument(..., help="Where to write the one-step restorer folder (written only once both files load)."),
    sd: Path = typer.Option(..., "--sd", help="Stable Diffusion 2.1 base: a diffusers folder (needed for a prompt) or an ldm .ckpt/.safetensors (v2-1_512-ema-pruned.ckpt)."),
    osediff: Path = typer.Option(..., "--osediff", help="OSEDiff's LoRA file (osediff_face.pkl, osediff.pkl, or one of the same layout)."),
    size: int = typer.Option(512, help="Face size in pixels (a multiple of 8; OSEDiff works at 512)."),
    prompt: str = typer.Option("", help="The fixed text prompt, encoded once (default: empty; needs a diffusers --sd folder)."),
    caption: Path | None = typer.Option(None, help="A text file whose content is the prompt (instead of --prompt)."),
    head_channels: int = typer.Option(64, help="Attention head width of an ldm --sd file (not recorded in the weights; 64 in SD 2.1)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """OSEDiff (SD 2.1 + LoRA on the UNet and the VAE encoder, one step at t=999) as a one-step restorer folder that
    restore, evaluate and refl take; the LoRA is merged into plain weights."""
    from facereward.models.osediff_import import import_osediff as run_import

    restorer = run_import(out_dir, sd, osediff, size=size, prompt=prompt, caption=caption, head_channels=head_channels,
                          progress=progress)
    text = f"prompt from {caption}" if caption else (f"prompt {prompt!r}" if prompt else "empty prompt")
    n_train = sum(p.numel() for p in restorer.net.parameters())
    _done(f"wrote OSEDiff ({restorer.config.size} px, one step at t={restorer.config.timestep}, "
          f"{restorer.config.prediction_type} prediction, {text}; {n_train / 1e6:.1f}M parameters in the merged UNet "
          f"and VAE encoder) to {out_dir}")


@app.command()
def restore(
    inputs: Path = typer.Argument(..., help="An aligned face image or a folder of them (with --photos: any photos)."),
    out_dir: Path = typer.Argument(..., help="Output folder (NAME.png per input)."),
    photos: bool = typer.Option(False, "--photos", help="Whole photos: find, align, restore and paste back every face."),
    detector: str = typer.Option("cnn", help="--photos: face detector cnn (dlib CNN), hog (dlib HOG, fast) or haar (OpenCV)."),
    upscale: float = typer.Option(1.0, help="--photos: output size over input size."),
    background: str = typer.Option("bicubic", help="--photos: how the background is upscaled: bicubic, or cleaner (stage 1)."),
    only_center_face: bool = typer.Option(False, "--only-center-face", help="--photos: restore only the face nearest the centre."),
    min_face: float = typer.Option(0, help="--photos: leave faces smaller than this many pixels (box side) as they are."),
    max_faces: int | None = typer.Option(None, help="--photos: restore at most this many faces per photo (the largest)."),
    save_faces: bool = typer.Option(False, "--save-faces", help="--photos: also write OUT/faces/{lq,restored,compare}/."),
    model: Path | None = typer.Option(None, help="Restorer folder (default: the shipped toy restorer)."),
    steps: int = typer.Option(50, "--sample-steps", "--steps", help="DDIM steps (any number from 1 to the schedule's 1000)."),
    eta: str | None = typer.Option(None, help="DDIM eta: a number, or 'random' (redrawn per step) (default: the model's, 0 for the toy model)."),
    spacing: str | None = typer.Option(None, help=SPACING_HELP),
    final_alpha_bar: str | None = typer.Option(None, help=FINAL_ALPHA_HELP),
    colour_fix: bool | None = typer.Option(None, "--colour-fix/--no-colour-fix", help=COLOUR_FIX_HELP),
    seed: int = typer.Option(0, help="Seed of the initial noise (per image, independent of batching)."),
    batch_size: int = typer.Option(8, help="Images per batch."),
    convert: bool = typer.Option(False, help="Accept grayscale/RGBA inputs by converting them to RGB."),
    resize: bool = typer.Option(False, help="Resize inputs of another size to the model size."),
    save_stage1: bool = typer.Option(False, help="Also write the stage-1 (cleaner) output to OUT/stage1."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Restore aligned faces (or, with --photos, every face of whole photos); bad files are reported by name and skipped."""
    from facereward.inference import collect_inputs, restore_files
    from facereward.models.families import load_restorer
    from facereward.weights import default_restorer_path

    if steps < 1 or batch_size < 1:
        _fail("--steps and --batch-size must be >= 1")
    sampler = _sampler(spacing, final_alpha_bar, colour_fix)
    photo_options = {"--detector": detector != "cnn", "--upscale": upscale != 1.0, "--background": background != "bicubic",
                     "--only-center-face": only_center_face, "--min-face": min_face != 0, "--max-faces": max_faces is not None,
                     "--save-faces": save_faces}
    if not photos and any(photo_options.values()):
        _fail(f"{', '.join(k for k, v in photo_options.items() if v)} only apply with --photos")
    if photos:
        if convert or resize or save_stage1:
            _fail("--convert, --resize and --save-stage1 apply to aligned faces, not --photos (photos of any mode and size are accepted)")
        _restore_photos(inputs, out_dir, model, detector, upscale, background, only_center_face, min_face, max_faces,
                        save_faces, steps, _eta(eta), seed, batch_size, device, progress, sampler)
        return
    restorer = load_restorer(model or default_restorer_path()).to(_device(device))
    files = collect_inputs(inputs)
    report = restore_files(restorer, files, out_dir, steps=steps, eta=_eta(eta), seed=seed, batch_size=batch_size,
                           convert=convert, resize=resize, save_stage1=save_stage1, progress=progress, sampler=sampler)
    for path, reason in report.skipped:
        typer.secho(f"skipped {reason}", err=True, fg=typer.colors.YELLOW)
    _done(f"restored {len(report.written)} of {len(files)} images to {out_dir}" + (f"; skipped {len(report.skipped)}" if report.skipped else ""))
    if not report.written:
        raise typer.Exit(1)


def _restore_photos(inputs, out_dir, model, detector, upscale, background, only_center_face, min_face, max_faces,
                    save_faces, steps, eta, seed, batch_size, device, progress, sampler) -> None:
    from facereward.data.faces import DETECTORS, FaceDetector
    from facereward.inference import collect_inputs
    from facereward.models.families import load_restorer
    from facereward.photos import STAGES, restore_photo_files
    from facereward.weights import default_restorer_path

    if detector not in DETECTORS:
        _fail(f"--detector must be one of {', '.join(DETECTORS)}, got {detector!r}")
    if background not in ("bicubic", "cleaner"):
        _fail(f"--background must be bicubic or cleaner, got {background!r}")
    if upscale <= 0 or min_face < 0 or (max_faces is not None and max_faces < 0):
        _fail("--upscale must be > 0, --min-face and --max-faces >= 0")
    restorer = load_restorer(model or default_restorer_path()).to(_device(device))
    files = collect_inputs(inputs)
    report = restore_photo_files(restorer, files, out_dir, detector=FaceDetector(detector), steps=steps, eta=eta, seed=seed, sampler=sampler,
                                 upscale=upscale, background=background, only_center_face=only_center_face,
                                 min_face=min_face, max_faces=max_faces, batch_size=batch_size, save_faces=save_faces,
                                 progress=progress)
    for _, reason in report.failed:
        typer.secho(f"skipped {reason}", err=True, fg=typer.colors.YELLOW)
    for path in report.no_face:
        typer.echo(f"{path}: no face found; written {'upscaled ' if upscale != 1 else ''}as it is")
    for path, what in report.left:
        typer.echo(f"{path}: {what}")
    split = ", ".join(f"{k} {report.timings[k]:.1f}" for k in STAGES)
    typer.echo(f"restored {report.faces_restored} faces in {len(report.written)} of {len(files)} photos to {out_dir} "
               f"in {report.seconds:.1f} s ({split})" + (f"; {len(report.failed)} failed" if report.failed else ""))
    if report.failed:
        raise typer.Exit(1)


def _named_paths(values: list[str], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        if "=" not in v:
            _fail(f"{option} expects NAME=DIR, got {v!r}")
        name, path = v.split("=", 1)
        if name in out:
            _fail(f"{option}: the name {name!r} is given twice")
        out[name] = path
    return out


@app.command()
def evaluate(
    testset: Path | None = typer.Option(None, help="Paired test set: lq/ and (optionally) hq/ folders matched by name."),
    photos: Path | None = typer.Option(None, "--photos", help="Instead of --testset: whole photos (file or folder, no GT), scored on their faces by no-reference metrics."),
    detector: str | None = typer.Option(None, help="--photos: face detector cnn (default), hog or haar."),
    model: list[str] = typer.Option([], "--model", help="NAME=DIR: a restorer to run on lq/ (repeatable)."),
    images: list[str] = typer.Option([], "--images", help="NAME=DIR: existing outputs named like lq/ (repeatable)."),
    out_dir: Path | None = typer.Option(None, help="Where results.md/.csv/.json and grid.png go (default eval_out)."),
    stage1: bool = typer.Option(False, "--stage1", help="Also evaluate each model's stage-1 (cleaner) output."),
    lq: bool = typer.Option(True, help="Include the LQ input as a row."),
    steps: int | None = typer.Option(None, "--sample-steps", "--steps", help="DDIM steps (sets sample_steps; default 50)."),
    eta: float | None = typer.Option(None, help="DDIM eta (default: each model's, 0 for the toy model, 1 for imported DiffBIR)."),
    spacing: str | None = typer.Option(None, help=SPACING_HELP),
    final_alpha_bar: str | None = typer.Option(None, help=FINAL_ALPHA_HELP),
    colour_fix: bool | None = typer.Option(None, "--colour-fix/--no-colour-fix", help=COLOUR_FIX_HELP),
    seed: int | None = typer.Option(None, help="Sampling seed (default 0)."),
    batch_size: int | None = typer.Option(None, help="Images per batch (default 16)."),
    identity: str | None = typer.Option(None, help="Identity judge: auto, toy, dlib, arcface:PATH.onnx, none."),
    landmarks: str | None = typer.Option(None, help="Landmark judge: auto, toy, dlib, none."),
    fid: str | None = typer.Option(None, help="FID/KID features: auto (the identity judge), identity, inception:PATH, none."),
    fid_reference: Path | None = typer.Option(None, help="HQ folder to compute FID against (default: the test set's hq/)."),
    frm: Path | None = typer.Option(None, help="A Face Reward Model folder: adds its score as a column (no GT needed)."),
    clipiqa: Path | None = typer.Option(None, help="A local CLIP folder (or OpenCLIP checkpoint): adds CLIPIQA as a column (no GT needed)."),
    niqe_model: Path | None = typer.Option(None, help="A NIQE pristine model (modelparameters.mat, .npz, or `facereward fit-niqe`'s): adds NIQE (no GT needed)."),
    reward: list[str] = typer.Option([], "--reward", help="NAME=WEIGHT: adds the composite reward of these terms as a column "
                                     "(repeatable; options with --set reward.options.NAME.KEY=VALUE)."),
    metrics: str | None = typer.Option(None, help="Comma-separated names from the metric table (default: every default metric that applies)."),
    list_metrics: bool = typer.Option(False, "--list-metrics", help="Print the metric table (name, type, lower is better, needs) and exit."),
    metric_module: list[str] = typer.Option([], "--metric-module", "--reward-module", help="Module or .py file that registers custom measures (repeatable; sets imports)."),
    weights: list[str] = typer.Option([], "--weights", help="NAME=FILE: the weight file of measure NAME (its option path; "
                                      "NAME.OPTION=FILE for another option, e.g. dists.backbone_path=vgg16-397923af.pth); "
                                      "the file names are in --list-metrics (repeatable)."),
    lpips_backbone: Path | None = typer.Option(None, help="LPIPS backbone weights (torchvision vgg16/alexnet layout)."),
    lpips_heads: Path | None = typer.Option(None, help="LPIPS linear heads (lpips v0.1 vgg.pth/alex.pth layout)."),
    lpips_net: str | None = typer.Option(None, help="vgg (default) or alex."),
    crop_border: int | None = typer.Option(None, help="Pixels cropped from each border before PSNR/SSIM."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    ci: bool = typer.Option(False, "--ci", help="A 95% bootstrap interval over images for every cell (--set ci_level, bootstrap)."),
    compare: tuple[str, str] | None = typer.Option(None, "--compare", help="A B: paired bootstrap and Wilcoxon tests of "
                                                   "method A against B on every column (more pairs: --set compare=...)."),
    slice_by: list[str] = typer.Option([], "--slice-by", help="ATTR: every metric per group of an attribute, with "
                                       "intervals and the worst group (toy traits, or --attributes; repeatable)."),
    attributes: Path | None = typer.Option(None, "--attributes", help="CSV of per-image attributes: name,attr=value,..."),
    check_published: Path | None = typer.Option(None, "--check-published", help="TABLE.json: compare the run with a "
                                                "published table within its tolerances; exit 1 when it does not reproduce."),
    config: Path | None = typer.Option(None, "--config", help="YAML of EvaluateConfig fields."),
    set_: list[str] = typer.Option([], "--set", help="Override EvaluateConfig fields."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """The BFR benchmark table for several models or output folders side by side (markdown, CSV, JSON, grid), with
    intervals, paired tests, slices and a check against a published table when asked."""
    from facereward.config import load_config
    from facereward.evaluate import EvaluateConfig
    from facereward.evaluate import evaluate as run_evaluate

    overrides = list(set_) + _reward_overrides(reward, [], key="reward.weights")
    for key, value in (("options.frm.path", frm), ("options.clipiqa.path", clipiqa), ("options.niqe.model", niqe_model),
                       ("options.lpips.backbone_path", lpips_backbone), ("options.lpips.heads_path", lpips_heads),
                       ("options.lpips.net", lpips_net)):  # the same keys as the trainers' measure options
        if value is not None:
            overrides.append(f"{key}={value}")
    for name, path in _named_paths(weights, "--weights").items():
        overrides.append(f"options.{name if '.' in name else name + '.path'}={path}")
    cfg = load_config(EvaluateConfig, config, overrides)
    cfg.imports = [*cfg.imports, *metric_module]
    if list_metrics or metrics is not None:
        from facereward.measures import format_measure_table, parse_measure_names
        from facereward.plugins import import_plugins

        import_plugins(cfg.imports, option="--metric-module")  # plugin measures are known after their import
        if list_metrics:
            typer.echo(format_measure_table())
            return
        try:
            cfg.measures = parse_measure_names(metrics, "--metrics")
        except ValueError as err:
            _fail(str(err))
    given = {"testset": testset, "out_dir": out_dir, "sample_steps": steps, "eta": eta, "seed": seed, "batch_size": batch_size,
             "identity": identity, "landmarks": landmarks, "fid": fid, "fid_reference": fid_reference,
             "crop_border": crop_border, "device": device, "photos": photos,
             "photo_detector": detector, "spacing": spacing, "final_alpha_bar": final_alpha_bar, "colour_fix": colour_fix,
             "attributes": attributes, "check_published": check_published}
    _sampler(spacing, final_alpha_bar, colour_fix)  # checks the choices
    for key, value in given.items():
        if value is not None:
            setattr(cfg, key, str(value) if isinstance(value, Path) else value)
    cfg.models.update(_named_paths(model, "--model"))
    cfg.images.update(_named_paths(images, "--images"))
    cfg.include_stage1 = True if stage1 else cfg.include_stage1
    cfg.include_lq = cfg.include_lq and lq
    cfg.ci = cfg.ci or ci
    cfg.compare = [*cfg.compare, *([list(compare)] if compare else [])]
    cfg.slice_by = [*cfg.slice_by, *[a.strip() for value in slice_by for a in value.split(",") if a.strip()]]
    cfg.progress = progress
    if cfg.testset and cfg.photos:
        _fail("give --testset (paired faces) or --photos (whole photos), not both")
    if not cfg.testset and not cfg.photos:
        _fail("--testset is required (a folder with lq/ and optionally hq/), or --photos for whole photos without GT")
    result = run_evaluate(cfg)
    typer.echo("\n\n".join([result.table, *result.sections]))
    check = result.analysis.get("check")
    if check is not None:
        n_ok = sum(c["ok"] for c in check["cells"])
        typer.echo(f"\ncheck against {cfg.check_published}: {n_ok} of {len(check['cells'])} cells within tolerance, "
                   f"{len(check['provenance'])} provenance mismatches (see {result.out_dir}/results.md)")
    _done(f"\nwrote {result.out_dir}/results.md, results.csv, results.json and grid.png")
    if check is not None and not check["ok"]:
        typer.secho(f"{cfg.check_published}: the run does not reproduce the published table", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)


@app.command("fit-niqe")
def fit_niqe_cmd(
    hq_dir: Path = typer.Argument(..., help="Folder of pristine (HQ) images, e.g. your own clean faces; any size >= one block."),
    out: Path = typer.Argument(..., help="The model file to write: .safetensors (with how it was fitted) or .npz."),
    block_size: int = typer.Option(96, help="Block size in px (96: the MATLAB release's)."),
    channel: str = typer.Option("y", help="Luminance: y (YCbCr Y, as BasicSR) or gray (MATLAB rgb2gray, as the release)."),
    sharpness_threshold: float = typer.Option(0.75, help="Keep the blocks sharper than this times the image's sharpest (the release's 0.75)."),
    convert: bool = typer.Option(False, help="Accept grayscale/RGBA images by converting them to RGB."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Fit a NIQE pristine model (docs/methods.md 3) on your own pristine images; use it with evaluate --niqe-model."""
    import warnings

    from tqdm.auto import tqdm

    from facereward.data.imageio import ImageError, list_images, read_image
    from facereward.measures.niqe import fit_niqe_model, save_niqe_model

    if out.suffix.lower() not in (".safetensors", ".npz"):
        _fail(f"{out}: write the NIQE model as .safetensors or .npz")
    files = list_images(hq_dir)
    skipped: list[str] = []

    def images():
        for path in tqdm(files, desc="fit-niqe", disable=not progress, dynamic_ncols=True):
            try:
                image = read_image(path, convert=convert)
            except ImageError as err:
                skipped.append(str(err))
                continue
            if min(image.shape[:2]) < block_size:
                skipped.append(f"{path}: {image.shape[1]}x{image.shape[0]} is smaller than one {block_size} px block")
                continue
            yield image

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fit_niqe_model(images(), block_size=block_size, channel=channel, sharpness_threshold=sharpness_threshold)
    for reason in skipped:
        typer.secho(f"skipped {reason}", err=True, fg=typer.colors.YELLOW)
    for w in caught:
        typer.secho(f"warning: {w.message}", err=True, fg=typer.colors.YELLOW)
    save_niqe_model(out, model)
    _done(f"wrote {out}: NIQE pristine model from {model.meta['n_images']} images, {model.meta['n_patches']} patches "
               f"({block_size} px blocks, {channel} channel)")


@app.command("lrpo")
def lrpo_cmd(
    config: Path | None = typer.Option(None, "--config", help="YAML config (fields of LRPOConfig)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    init_from: Path | None = typer.Option(None, help="Restorer folder to fine-tune (default: the shipped toy restorer)."),
    hq_dir: Path | None = typer.Option(None, help="Folder of HQ faces (sets data.hq_dir)."),
    toy_faces: int | None = typer.Option(None, help="Train on N procedural toy faces instead (sets data.toy_faces)."),
    reward: list[str] = typer.Option([], "--reward", help="NAME=WEIGHT: the composite reward's terms (repeatable; replaces the default)."),
    frm: Path | None = typer.Option(None, help="Face Reward Model folder for the frm reward (default: the shipped toy FRM)."),
    reward_module: list[str] = typer.Option([], "--reward-module", help="Module or .py file that registers custom measures (repeatable; sets imports)."),
    lpips_backbone: Path | None = typer.Option(None, help="LPIPS backbone weights of the lpips reward (sets rewards.options.lpips.backbone_path)."),
    lpips_heads: Path | None = typer.Option(None, help="LPIPS linear heads of the lpips reward (sets rewards.options.lpips.heads_path)."),
    epochs: int | None = typer.Option(None, help="Epochs (sets epochs)."),
    lora_rank: int | None = typer.Option(None, help="Train LoRA adapters of this rank instead of the full network."),
    output_dir: Path | None = typer.Option(None, help="Run folder (sets run.output_dir)."),
    resume: str | None = typer.Option(None, help="'latest' (the newest valid checkpoint), 'auto' (the same, or a fresh "
                                      "start if there is none) or a checkpoint folder (sets run.resume)."),
    no_regulariser: bool = typer.Option(False, "--no-regulariser", help="Ablation: drop the GT-guided likelihood regulariser."),
    uniform_advantages: bool = typer.Option(False, "--uniform-advantages", help="Ablation: the same advantage at every step."),
    degradation_module: list[str] = typer.Option([], "--degradation-module", help=DEGRADATION_MODULE_HELP),
) -> None:
    """LRPO: online RL with group sampling, a composite reward and GT-guided likelihood regularisation (docs/methods.md 2)."""
    from facereward.config import load_config
    from facereward.train.lrpo import LRPOConfig, train_lrpo

    overrides = list(set_) + _reward_overrides(reward, [*reward_module, *degradation_module])
    for key, value in (("init_from", init_from), ("rewards.options.frm.path", frm), ("data.hq_dir", hq_dir),
                       ("rewards.options.lpips.backbone_path", lpips_backbone), ("rewards.options.lpips.heads_path", lpips_heads),
                       ("data.toy_faces", toy_faces), ("epochs", epochs), ("lora.rank", lora_rank),
                       ("run.output_dir", output_dir), ("run.resume", resume)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if no_regulariser:
        overrides.append("reg_weight=0")
    if uniform_advantages:
        overrides.append("adv_weighting=uniform")
    cfg = load_config(LRPOConfig, config, overrides)
    _announce("lrpo", cfg)
    model = train_lrpo(cfg)
    _finish(f"saved the LRPO restorer to {model} (reward curve: {model.parent / 'metrics.json'})", model.parent)


def _trainer_overrides(init_from: Path | None, hq_dir: Path | None, toy_faces: int | None, frm: Path | None,
                       epochs: int | None, lora_rank: int | None, output_dir: Path | None, resume: str | None) -> list[str]:
    """The --set lines of the options the online trainers (nft, dpo) share."""
    pairs = (("init_from", init_from), ("data.hq_dir", hq_dir), ("data.toy_faces", toy_faces),
             ("rewards.options.frm.path", frm), ("epochs", epochs), ("lora.rank", lora_rank),
             ("run.output_dir", output_dir), ("run.resume", resume))
    return [f"{key}={value}" for key, value in pairs if value is not None]


RESUME_HELP = ("'latest' (the newest valid checkpoint), 'auto' (the same, or a fresh start if there is none) or a checkpoint "
               "folder (sets run.resume).")


@app.command("nft")
def nft_cmd(
    config: Path | None = typer.Option(None, "--config", help="YAML config (fields of NFTConfig)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    init_from: Path | None = typer.Option(None, help="Restorer folder to fine-tune (default: the shipped toy restorer)."),
    hq_dir: Path | None = typer.Option(None, help="Folder of HQ faces (sets data.hq_dir)."),
    toy_faces: int | None = typer.Option(None, help="Train on N procedural toy faces instead (sets data.toy_faces)."),
    reward: list[str] = typer.Option([], "--reward", help="NAME=WEIGHT: the composite reward's terms (repeatable; replaces the default)."),
    frm: Path | None = typer.Option(None, help="Face Reward Model folder for the frm reward (default: the shipped toy FRM)."),
    reward_module: list[str] = typer.Option([], "--reward-module", help="Module or .py file that registers custom measures (repeatable; sets imports)."),
    epochs: int | None = typer.Option(None, help="Epochs (sets epochs)."),
    lora_rank: int | None = typer.Option(None, help="Train LoRA adapters of this rank instead of the full network."),
    output_dir: Path | None = typer.Option(None, help="Run folder (sets run.output_dir)."),
    resume: str | None = typer.Option(None, help=RESUME_HELP),
    degradation_module: list[str] = typer.Option([], "--degradation-module", help=DEGRADATION_MODULE_HELP),
) -> None:
    """DiffusionNFT: sample groups, score them, and train on the forward process against implicit positive and
    negative policies (docs/methods.md 5.1)."""
    from facereward.config import load_config
    from facereward.train.nft import NFTConfig, train_nft

    overrides = list(set_) + _reward_overrides(reward, [*reward_module, *degradation_module])
    overrides += _trainer_overrides(init_from, hq_dir, toy_faces, frm, epochs, lora_rank, output_dir, resume)
    cfg = load_config(NFTConfig, config, overrides)
    _announce("nft", cfg)
    model = train_nft(cfg)
    _finish(f"saved the NFT restorer to {model} (reward curve: {model.parent / 'metrics.json'})", model.parent)


@app.command("dpo")
def dpo_cmd(
    config: Path | None = typer.Option(None, "--config", help="YAML config (fields of DPOConfig)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    init_from: Path | None = typer.Option(None, help="Restorer folder to fine-tune (default: the shipped toy restorer)."),
    pairs: Path | None = typer.Option(None, help="Preference JSONL (annotate, auto-label, toy-preferences): offline pairs "
                                      "(sets pairs; without it, pairs come online from the model's own ranked samples)."),
    hq_dir: Path | None = typer.Option(None, help="Folder of HQ faces for online pairs (sets data.hq_dir)."),
    toy_faces: int | None = typer.Option(None, help="Online pairs on N procedural toy faces (sets data.toy_faces)."),
    reward: list[str] = typer.Option([], "--reward", help="NAME=WEIGHT: the reward that ranks online pairs (repeatable)."),
    frm: Path | None = typer.Option(None, help="Face Reward Model folder for the frm reward (default: the shipped toy FRM)."),
    reward_module: list[str] = typer.Option([], "--reward-module", help="Module or .py file that registers custom measures (repeatable; sets imports)."),
    epochs: int | None = typer.Option(None, help="Epochs (sets epochs)."),
    beta: float | None = typer.Option(None, help="The DPO beta (sets beta)."),
    lora_rank: int | None = typer.Option(None, help="Train LoRA adapters of this rank instead of the full network."),
    output_dir: Path | None = typer.Option(None, help="Run folder (sets run.output_dir)."),
    resume: str | None = typer.Option(None, help=RESUME_HELP),
    degradation_module: list[str] = typer.Option([], "--degradation-module", help=DEGRADATION_MODULE_HELP),
) -> None:
    """Diffusion-DPO: learn from preference pairs against the initial network, offline (a JSONL) or online (the
    model's own samples ranked by the reward) (docs/methods.md 5.2)."""
    from facereward.config import load_config
    from facereward.train.dpo import DPOConfig, train_dpo

    overrides = list(set_) + _reward_overrides(reward, [*reward_module, *degradation_module])
    overrides += _trainer_overrides(init_from, hq_dir, toy_faces, frm, epochs, lora_rank, output_dir, resume)
    for key, value in (("pairs", pairs), ("beta", beta)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(DPOConfig, config, overrides)
    _announce("dpo", cfg)
    model = train_dpo(cfg)
    _finish(f"saved the DPO restorer to {model} (loss curve: {model.parent / 'metrics.json'})", model.parent)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("demo_out"), help="Output folder (a rerun resumes its training runs)."),
    quick: bool = typer.Option(False, "--quick", help="A first look in a fraction of the time: 8 faces and very short runs."),
    skip_training: bool = typer.Option(False, "--skip-training", help="Only restore with the base (no ReFL, no LRPO)."),
    n: int | None = typer.Option(None, help="Held-out toy faces to restore (default 16; 8 with --quick)."),
    model: Path | None = typer.Option(None, help="Base restorer folder (default: the shipped toy restorer)."),
    frm: Path | None = typer.Option(None, help="Face Reward Model folder (default: the shipped toy FRM)."),
    steps: int | None = typer.Option(None, "--sample-steps", "--steps", help="DDIM steps of the evaluation (default 6, as the demo's training rollouts)."),
    seed: int = typer.Option(0, help="Degradation, training and sampling seed."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """The main job on the toy world: held-out faces, degraded; restored by the base; post-trained by short ReFL and
    LRPO runs; all evaluated side by side, with a grid and an HTML report."""
    from facereward.demo import run_demo

    result = run_demo(out_dir, n=n, model=model, frm=frm, steps=steps, seed=seed, device=device, progress=progress,
                      train=not skip_training, quick=quick, announce=typer.echo)
    typer.echo("\n\n".join([result.evaluation.table, *result.evaluation.sections]))
    runs = "".join(f", the {name} run in {path}" for name, path in result.runs.items())
    _done(f"\nwrote {result.report}, {out_dir / 'results.md'} (also .csv, .json), {out_dir / 'grid.png'}, the "
          f"restorations in {out_dir / 'outputs'}{runs} and the test set in {out_dir / 'toy-test'}")


@app.command()
def report(
    folders: list[Path] = typer.Argument(..., help="Training run folders (refl, lrpo, train-base, train-frm) and evaluate "
                                         "outputs, or folders holding them (as demo_out/ does)."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="The HTML file to write."),
    title: str = typer.Option("facereward report", help="The page title."),
) -> None:
    """One self-contained HTML page: metric tables, before/after grids, training curves and each run's config."""
    from facereward.report import ReportError, build_report

    try:
        path = build_report(folders, out, title=title)
    except ReportError as err:
        _fail(str(err))
    _done(f"wrote {path}")



# `facereward --help` in groups; each command's own help opens with one example line.
HELP_GROUPS: dict[str, tuple[str, str]] = {
    "toyfaces": ("Data", "facereward toyfaces --n 200 toys"),
    "degrade": ("Data", "facereward degrade --preset diffbir --seed 0 toys/test/images toy-test"),
    "candidates": ("Data", "facereward candidates --k 4 --etas 0,1 toy-test cands"),
    "annotate": ("Data", "facereward annotate cands --annotator ana --labels prefs.jsonl"),
    "auto-label": ("Data", "facereward auto-label cands --human prefs.jsonl --out auto.jsonl"),
    "toy-preferences": ("Data", "facereward toy-preferences --n-inputs 200 --k 6 prefs"),
    "train-base": ("Training", "facereward train-base --config scripts/toy_restorer.yaml --output-dir runs/base"),
    "train-frm": ("Training", "facereward train-frm --pairs prefs/pairs.jsonl --output-dir runs/frm"),
    "refl": ("Training", "facereward refl --config configs/refl_toy.yaml --train-steps 200 --resume latest"),
    "lrpo": ("Training", "facereward lrpo --config configs/lrpo_toy.yaml --epochs 20"),
    "nft": ("Training", "facereward nft --config configs/nft_toy.yaml"),
    "dpo": ("Training", "facereward dpo --config configs/dpo_toy.yaml"),
    "restore": ("Restoring and evaluating", "facereward restore --sample-steps 50 toy-test/lq restored"),
    "evaluate": ("Restoring and evaluating", "facereward evaluate --testset toy-test --model base=runs/base/model --out-dir eval"),
    "demo": ("Restoring and evaluating", "facereward demo --out-dir demo_out"),
    "report": ("Restoring and evaluating", "facereward report demo_out eval --out report.html"),
    "study": ("Restoring and evaluating", "facereward study --lq toy-test/lq --out study.jsonl base=restored/base refl=restored/refl"),
    "study-results": ("Restoring and evaluating", "facereward study-results study.jsonl --out study --bootstrap 2000"),
    "build-restorer": ("Tools", "facereward build-restorer --from-sd sd-2-1-base --size 512 runs/untrained"),
    "import-diffbir": ("Tools", "facereward import-diffbir --sd v2-1_512-ema-pruned.ckpt --controlnet v1_face.pth "
                               "--swinir face_swinir_v1.ckpt diffbir-v1-face"),
    "import-osediff": ("Tools", "facereward import-osediff --sd stable-diffusion-2-1-base --osediff osediff_face.pkl osediff-face"),
    "fit-niqe": ("Tools", "facereward fit-niqe pristine_faces/ niqe.npz"),
}


def _group_commands() -> None:
    panels = list(dict.fromkeys(panel for panel, _ in HELP_GROUPS.values()))
    name_of = lambda info: info.name or info.callback.__name__.replace("_", "-")  # noqa: E731
    app.registered_commands.sort(key=lambda info: panels.index(HELP_GROUPS[name_of(info)][0]))  # stable: panels in order
    for info in app.registered_commands:
        panel, example = HELP_GROUPS[name_of(info)]
        doc = inspect.getdoc(info.callback) or ""
        info.rich_help_panel = panel
        info.short_help = doc.split("\n\n")[0].replace("\n", " ")
        info.help = f"Example: {example}\n\n{doc}"


_group_commands()


if __name__ == "__main__":
    main()
