#!/usr/bin/env bash
# A prepared check of `facereward lrpo` under DeepSpeed ZeRO-2 (with and without CPU optimizer offload), on 1 and 2
# processes, against a plain single-process run and DDP, plus a ZeRO-2 resume. Tiny latent restorer (32 px), 2 epochs.
#   bash scripts/check_deepspeed.sh   # ~5-6 min of runs on an idle 2-core box once the venv exists; a new venv
#                                     # adds ~5 min (pip ~2, the cpu_adam JIT build ~3)
# Prints a table: epoch-1/epoch-2 rewards, optimizer steps, and the L2 distance of each run's trained controlnet
# weights to run (a)'s and to the initial weights. Exit status 1 if any run or check failed (the table still prints).
#
# Nothing is written into the repository: the venv and all outputs live outside it, and facereward is used from
# src/ through PYTHONPATH (no editable install, no egg-info). Settings (environment variables):
#   FACEREWARD_DS_VENV=DIR   scratch venv (default /tmp/facereward-deepspeed; reused when it exists)
#   FACEREWARD_DS_WORK=DIR   run folders and logs (default: a new /tmp/facereward-dscheck.XXXXXX)
#   PYTHON=python3.11        interpreter for a new venv (must match the lock: requirements/lock-py3.X.txt)
#   TORCH_SPEC=...           the torch to install first, instead of the lock's CPU pin (torch==2.13.0+cpu, from
#                            PIP_FIND_LINKS). pip never changes torch afterwards (it is pinned by a constraints file).
#   DEEPSPEED_SPEC=...       default deepspeed==0.19.8 (the version this check was written against)
#   RUN_TIMEOUT=SECONDS      per run (default 420)
#   NPROC=2                  processes of the multi-process runs
# On a CUDA machine: the lock's torch is the CPU build, which would be wrong there. Either
#   TORCH_SPEC='torch==2.13.0' bash scripts/check_deepspeed.sh      (PyPI's CUDA build of the locked version), or
#   FACEREWARD_DS_SYSTEM_SITE=1 bash scripts/check_deepspeed.sh     (a new venv that sees the machine's own torch);
# a venv whose torch already reports torch.cuda.is_available() is kept as it is. On CUDA the DDP run uses
# configs/accelerate/ddp.yaml (needs NPROC GPUs) and the DeepSpeed runs use the GPUs; on CPU they use gloo.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${FACEREWARD_DS_VENV:-/tmp/facereward-deepspeed}
PYTHON=${PYTHON:-python3.11}
DEEPSPEED_SPEC=${DEEPSPEED_SPEC:-deepspeed==0.19.8}
RUN_TIMEOUT=${RUN_TIMEOUT:-420}
NPROC=${NPROC:-2}
case "$VENV" in "$REPO"|"$REPO"/*) echo "check_deepspeed: FACEREWARD_DS_VENV must be outside the repo" >&2; exit 1;; esac
WORK=${FACEREWARD_DS_WORK:-$(mktemp -d /tmp/facereward-dscheck.XXXXXX)}
mkdir -p "$WORK"
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }'; }
TIMES=()

# ---- 1. the scratch venv: the lock, torch first and never upgraded, deepspeed ----------------------------------
t0=$(now)
if [ ! -x "$VENV/bin/python" ]; then
  if [ "${FACEREWARD_DS_SYSTEM_SITE:-0}" = 1 ]; then "$PYTHON" -m venv --system-site-packages "$VENV"; else "$PYTHON" -m venv "$VENV"; fi
fi
py=$VENV/bin/python
pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
lock=$REPO/requirements/lock-py$pyver.txt
[ -f "$lock" ] || { echo "check_deepspeed: no lock $lock for Python $pyver (set PYTHON=python3.11)" >&2; exit 1; }
pinned() { sed -n "s/^$1==\([^ ;]*\).*/\1/p" "$lock"; }
pip_install() { "$py" -m pip install -q "$@" 2>&1 | { grep -v "is ignored" || true; }; }
stamp="$(sha256sum "$lock" | cut -c1-16) ${TORCH_SPEC:-lock} $DEEPSPEED_SPEC"
if [ "$(cat "$VENV/.facereward-ds" 2>/dev/null)" != "$stamp" ]; then
  [ "$("$py" -m pip --version | cut -d' ' -f2)" = "$(pinned pip)" ] || pip_install "pip==$(pinned pip)"
  if [ "$("$py" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)" = True ] && [ -z "${TORCH_SPEC:-}" ]; then
    echo "check_deepspeed: keeping the venv's CUDA torch $("$py" -c 'import torch; print(torch.__version__)')"
  elif [ -n "${TORCH_SPEC:-}" ]; then
    pip_install "$TORCH_SPEC"  # with its dependencies (a CUDA build needs its nvidia-* packages)
  elif [ "$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null)" != "$(pinned torch)" ]; then
    pip_install --no-deps "torch==$(pinned torch)" || {
      echo "check_deepspeed: the lock pins torch==$(pinned torch): set PIP_FIND_LINKS to a folder with that wheel," \
           "or TORCH_SPEC" >&2; exit 1; }
  fi
  # from here on torch is held where it is: a constraints file for every later install, the lock without its torch line
  torch_pin() { "$py" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))'; }  # no import: deps may be missing
  torch_pin > "$VENV/torch-constraint.txt"
  grep -v '^torch==' "$lock" > "$VENV/lock-without-torch.txt"
  pip_install -c "$VENV/torch-constraint.txt" -r "$VENV/lock-without-torch.txt"
  # deepspeed is an sdist whose setup.py imports torch: no build isolation, no deps (its small deps listed here)
  pip_install -c "$VENV/torch-constraint.txt" hjson ninja py-cpuinfo msgpack einops psutil pydantic packaging tqdm numpy
  pip_install -c "$VENV/torch-constraint.txt" --no-deps --no-build-isolation "$DEEPSPEED_SPEC"
  [ "$(torch_pin)" = "$(cat "$VENV/torch-constraint.txt")" ] || {
    echo "check_deepspeed: torch changed during the install" >&2; exit 1; }
  echo "$stamp" > "$VENV/.facereward-ds"
fi
export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 FACEREWARD_DEBUG=1 TOKENIZERS_PARALLELISM=false
# DeepSpeed's JIT-built ops (cpu_adam: ~2-3 min on 2 cores) per venv: a shared ~/.cache/torch_extensions is rebuilt
# whenever another venv (another torch include path) used it last. Built here, so no run pays for it.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}
if [ ! -f "$VENV/.facereward-ds-ops" ]; then
  t1=$(now)
  # cpu_adam for the offloaded optimizer; on CPU also the shared-memory comm op DeepSpeed builds at start-up
  if "$py" -c '
from deepspeed.accelerator import get_accelerator
acc = get_accelerator()
acc.create_op_builder("CPUAdamBuilder").load()
if acc.device_name() == "cpu":
    acc.create_op_builder("ShareMemCommBuilder").load()' > "$VENV/ops-build.log" 2>&1; then
    touch "$VENV/.facereward-ds-ops"; echo "built DeepSpeed's cpu_adam in $(since "$t1") s"
  else
    echo "warning: cpu_adam did not build ($VENV/ops-build.log); the offload runs will try again" >&2
  fi
fi
"$py" -c "import facereward, accelerate, deepspeed, transformers, torch; assert facereward.__file__.startswith('$REPO/src')"
CUDA=$("$py" -c 'import torch; print(int(torch.cuda.is_available()))')
NGPU=$("$py" -c 'import torch; print(torch.cuda.device_count())')
echo "venv $VENV ready in $(since "$t0") s: $("$py" -c 'import torch, accelerate, deepspeed; print(f"torch {torch.__version__}, accelerate {accelerate.__version__}, deepspeed {deepspeed.__version__}")' 2>/dev/null | tail -1), cuda=$CUDA"
TIMES+=("venv $(since "$t0")s")
echo "work folder: $WORK"

# ---- 2. the tiny latent restorer and the run config -------------------------------------------------------------
"$py" - "$WORK/restorer" <<'EOF'
import sys, torch
from facereward.models.restorer import Restorer, RestorerConfig
torch.manual_seed(0)  # tests/conftest.py latent_config / latent_restorer
Restorer.build(RestorerConfig(mode="latent", size=32, cleaner_kwargs={"channels": 8, "num_blocks": 1, "downscale": 2})
               ).save_pretrained(sys.argv[1])
EOF
cat > "$WORK/lrpo.yaml" <<EOF
run: {output_dir: $WORK/out-unset, save_every: 100, log_every: 1, progress: false, mixed_precision: "no"}
init_from: $WORK/restorer
data: {toy_faces: 6, size: 32, toy_identities: 10}
rewards: {weights: {wavelet: 0.5, ssim: 0.5}}
group_size: 4
inputs_per_batch: 2
batches_per_epoch: 1
epochs: 2
steps: 4
micro_batch: 2
train_batch_size: 0
reg_steps: 2
lr: 1.0e-4
held_out: {every: 0}
EOF
DS=$REPO/configs/accelerate/deepspeed_zero2_offload.yaml  # its mixed_precision says bf16: run.mixed_precision wins
DS_NOOFF=$WORK/deepspeed_zero2.yaml
sed 's/^\(  offload_optimizer_device:\).*/\1 none/' "$DS" > "$DS_NOOFF"
grep -q 'offload_optimizer_device: none' "$DS_NOOFF"
if [ "$CUDA" = 1 ]; then DDP=$REPO/configs/accelerate/ddp.yaml; else DDP=$REPO/configs/accelerate/cpu_2proc.yaml; fi
LAUNCH=("$VENV/bin/accelerate" launch)

# ---- 3. the runs --------------------------------------------------------------------------------------------------
FAILED=()
RUNS=()
# run NAME [launcher args...] -- [extra facereward args...]: OUTPUT is $WORK/out-NAME, log $WORK/NAME.log
run() {
  local name=$1; shift
  local launch=() extra=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do launch+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  extra=("$@")
  local cmd
  if [ ${#launch[@]} -eq 0 ]; then cmd=("$py" -m facereward)
  else cmd=("${LAUNCH[@]}" "${launch[@]}" --module facereward); fi
  cmd+=(lrpo --config "$WORK/lrpo.yaml" --set "run.output_dir=$WORK/out-$name" "${extra[@]}")
  local t=$(now) rc=0
  echo "--- $name: ${cmd[*]}"
  (cd "$WORK" && timeout "$RUN_TIMEOUT" "${cmd[@]}") > "$WORK/$name.log" 2>&1 || rc=$?
  TIMES+=("$name $(since "$t")s")
  if [ $rc -ne 0 ]; then
    echo "    FAILED (exit $rc, $(since "$t") s); last lines of $WORK/$name.log:"
    # the first failing process's own traceback, not torchrun's summary after it
    local rank
    rank=$(grep -o '^\[rank[0-9]*\]: Traceback' "$WORK/$name.log" | head -1 | cut -d: -f1 || true)
    if [ -n "$rank" ]; then grep -F "$rank: " "$WORK/$name.log" | tail -n 15
    else grep -v '^\s*$' "$WORK/$name.log" | tail -n 15; fi | sed 's/^/    | /'
    echo "    innermost facereward frame: $(grep -E '^(\[rank[0-9]+\]: )?  File ".*/facereward/' "$WORK/$name.log" | tail -1 |
      sed 's/^\[rank[0-9]*\]: *//')"
    FAILED+=("$name")
  else
    echo "    ok ($(since "$t") s)"
    RUNS+=("$name")
  fi
  return 0
}

run a
run z2_offload --config_file "$DS" --num_processes 1 -- --set run.save_every=1  # also the resume test's first half
S=
run z2$S --config_file "$DS_NOOFF" --num_processes 1
run z2_offload_bf16$S --config_file "$DS" --num_processes 1 -- --set run.mixed_precision=bf16
if [ "$CUDA" = 1 ] && [ "$NGPU" -lt "$NPROC" ]; then
  echo "--- skipping the $NPROC-process runs: $NGPU GPU(s)"
else
  run z2_offload_${NPROC}proc$S --config_file "$DS" --num_processes "$NPROC"
  run z2_${NPROC}proc$S --config_file "$DS_NOOFF" --num_processes "$NPROC"
  run ddp_${NPROC}proc --config_file "$DDP" --num_processes "$NPROC"
fi
# resume under ZeRO-2: a copy of z2_offload's folder (saved every epoch, 2 epochs) continued to 3 epochs, against
# the same run made in one go
RESUME_OK=skipped
first=$WORK/out-z2_offload$S
if [ -f "$first/checkpoints/latest" ]; then
  cp -a "$first" "$WORK/out-z2_offload${S}_resumed"
  run z2_offload${S}_resumed --config_file "$DS" --num_processes 1 -- --resume latest --set epochs=3
  run z2_offload${S}_3epochs --config_file "$DS" --num_processes 1 -- --set epochs=3
  RESUME_OK=$("$py" - "$first" "$WORK/out-z2_offload${S}_resumed" "$WORK/out-z2_offload${S}_3epochs" <<'EOF'
import json, sys
from pathlib import Path
def epochs(folder):
    try:
        return json.loads((Path(folder) / "metrics.json").read_text())["epochs"]
    except FileNotFoundError:
        return None
before, after, whole = (epochs(f) for f in sys.argv[1:])
if after is None:
    print("FAIL (the resumed run wrote no metrics.json)"); sys.exit()
ok = [e["epoch"] for e in after] == [1, 2, 3] and after[:2] == before[:2]
line = f"epochs {[e['epoch'] for e in after]}, epoch-3 reward {after[-1]['reward']:.7g}"
if whole is not None:
    d = abs(after[-1]["reward"] - whole[-1]["reward"])
    line += f", in one go {whole[-1]['reward']:.7g} (difference {d:.2g})"
    ok = ok and d <= 1e-5 * abs(whole[-1]["reward"]) + 1e-7
print(("ok" if ok else "FAIL") + f" ({line})")
EOF
)
fi

# ---- 4. the table -----------------------------------------------------------------------------------------------
TABLE_RC=0
"$py" - "$WORK" "${RUNS[@]}" <<'EOF' || TABLE_RC=$?
import json, math, sys
from pathlib import Path
import torch
from safetensors.torch import load_file

work, runs = Path(sys.argv[1]), sys.argv[2:]

def weights(model: Path) -> dict:
    return {f"{f.relative_to(model)}/{k}": v.double() for f in sorted((model / "controlnet").rglob("*.safetensors"))
            for k, v in load_file(f).items()}

def dist(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in a))

w0 = weights(work / "restorer")
norm0 = math.sqrt(sum(float(v.pow(2).sum()) for v in w0.values()))
ref = json.loads((work / "out-a" / "metrics.json").read_text())["epochs"] if "a" in runs else None
wa = weights(work / "out-a" / "model") if "a" in runs else None
print(f"\n{'run':<24} {'reward ep1':>12} {'reward ep2':>12} {'opt steps':>9} {'|w-w_a|/|w0|':>13} {'|w-w0|/|w0|':>12}"
      f" {'ratio':>7}  check")
bad = 0
for name in runs:
    ep = json.loads((work / f"out-{name}" / "metrics.json").read_text())["epochs"]
    w = weights(work / f"out-{name}" / "model")
    steps = "/".join(f"{e.get('ppo/optimizer_steps', float('nan')):g}" for e in ep)
    moved = dist(w, w0) / norm0
    to_a = dist(w, wa) / norm0 if wa is not None and w.keys() == wa.keys() else float("nan")
    ratio = to_a / moved if moved > 0 else float("nan")
    notes = []
    if ref is not None and name != "a" and not name.endswith(("_resumed", "_3epochs")):
        fp32 = "bf16" not in name
        d1 = abs(ep[0]["reward"] - ref[0]["reward"])
        if d1 > (1e-6 * abs(ref[0]["reward"]) + 1e-7 if fp32 else 1e-2 * abs(ref[0]["reward"]) + 1e-4):
            notes.append(f"ep1 differs by {d1:.2g}")
        if not moved > 0:
            notes.append("weights did not move")
        if fp32 and not ratio < 0.01:
            notes.append("weights far from (a)")
        if [e.get("ppo/optimizer_steps") for e in ep] != [e.get("ppo/optimizer_steps") for e in ref[:len(ep)]]:
            notes.append("optimizer steps differ")
    bad += bool(notes)
    print(f"{name:<24} {ep[0]['reward']:>12.7g} {ep[1]['reward']:>12.7g} {steps:>9} {to_a:>13.3e} {moved:>12.3e}"
          f" {ratio:>7.3f}  {'; '.join(notes) or 'ok'}")
print("(ratio = |w-w_a| / |w-w0|; fp32 runs should have ratio < 0.01 and epoch-1 rewards equal to (a)'s to ~1e-6;"
      " _resumed and _3epochs ran 3 epochs)")
sys.exit(1 if bad else 0)
EOF
echo
echo "resume under ZeRO-2: $RESUME_OK"
echo "timings: ${TIMES[*]}"
[ ${#FAILED[@]} -eq 0 ] || echo "FAILED runs: ${FAILED[*]} (logs: $WORK/NAME.log)"
[ ${#FAILED[@]} -eq 0 ] && [ "$TABLE_RC" = 0 ] && [[ "$RESUME_OK" == ok* ]]
