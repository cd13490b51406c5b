#!/usr/bin/env bash
# The GPU benchmarks of issue 15 (item 6), prepared to run once on one GPU (an H200), offline, in under 8 minutes.
#
#   bash benchmarks/gpu.sh                       # PYTHON (default .venv/bin/python, else python3) must have CUDA torch
#   PYTHON=python3 OUT=/some/dir bash benchmarks/gpu.sh    # everything printed also goes to $OUT/gpu_bench.txt
#   GPU_BENCH_DRY=1 bash benchmarks/gpu.sh       # print the commands it would run; run nothing
#   GPU_BENCH_PARTS="compile" bash benchmarks/gpu.sh       # only some parts: lrpo refl memory speed compile
#
# All on a real-size latent model with random weights (speed_options.build("latent-real"): SD 2.1 base UNet +
# DiffBIR's ControlNet, 512 px faces, 64x64x4 latents): LRPO epoch and ReFL step against their bare compute in fp32,
# bf16 autocast and bf16 + torch.compile (peak allocated memory each); peak GPU memory of LRPO (G = 4, 8; T = 10)
# and ReFL (T = 10, 50) in fresh processes; speed_options.py's four layouts, run.speed's picks and compiled calls.
# Each part runs under `timeout` and within one overall deadline (GPU_BENCH_BUDGET_S, default 465 s), so the
# whole script ends within 8 minutes; results print as they come, and a part cut short keeps what it printed.
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1

DRY=${GPU_BENCH_DRY:-0}
BUDGET=${GPU_BENCH_BUDGET_S:-465}
PARTS=" ${GPU_BENCH_PARTS:-lrpo refl memory speed compile} "
THREADS=${GPU_BENCH_THREADS:-$(nproc 2>/dev/null || echo 16)}
[ "$THREADS" -gt 16 ] && THREADS=16
if [ -z "${PYTHON:-}" ]; then
    PYTHON=.venv/bin/python
    [ -x "$PYTHON" ] || PYTHON=python3
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"  # facereward without an install
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_bench.txt") 2>&1
    TEE_PID=$!
    trap 'exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null' EXIT  # let tee write its last lines before the script ends
fi

if [ "$DRY" = 1 ]; then
    echo "== gpu.sh (dry run: commands only), python $PYTHON, $THREADS CPU threads, budget ${BUDGET}s"
    echo "\$ nvidia-smi -L"
    echo "\$ $PYTHON -c '<torch / CUDA versions; exit 2 without CUDA; exit 3 if a package is missing>'"
else
    echo "== gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ), python $PYTHON, $THREADS CPU threads, budget ${BUDGET}s"
    timeout 20 nvidia-smi -L 2>&1 || echo "nvidia-smi -L: failed"
    timeout 90 "$PYTHON" - <<'EOF'
import sys
try:
    import torch
except ImportError as err:
    print(f"gpu.sh: {sys.executable} has no torch ({err}); set PYTHON to a python with CUDA torch")
    sys.exit(2)
print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}")
if not torch.cuda.is_available():
    print(f"gpu.sh: torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False): nothing to run")
    sys.exit(2)
p = torch.cuda.get_device_properties(0)
print(f"{torch.cuda.device_count()} device(s); 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
      f"bf16 {torch.cuda.is_bf16_supported()}; TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
      f"TF32 cuDNN {torch.backends.cudnn.allow_tf32}, cudnn.benchmark {torch.backends.cudnn.benchmark}")
missing = []
for name in ("diffusers", "accelerate", "peft", "safetensors", "tensorboard", "scipy", "yaml", "facereward"):
    try:
        module = __import__(name)
        print(f"  {name} {getattr(module, '__version__', '')}", end="")
    except ImportError as err:
        missing.append(f"{name} ({err})")
print()
if missing:
    print("gpu.sh: missing: " + "; ".join(missing) + " (nothing can be installed offline: carry wheels)")
    sys.exit(3)
EOF
    rc=$?
    [ "$rc" = 124 ] && echo "gpu.sh: the version check hung for 90s"
    [ "$rc" = 0 ] || exit "$rc"
fi

# part NAME CAP_S COMMAND...: run COMMAND for at most CAP_S seconds and never past the overall deadline
part() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - SECONDS - 10))
    local limit=$((cap < left ? cap : left))
    echo
    echo "== $name (limit ${limit}s; at ${SECONDS}s of ${BUDGET}s)"
    echo "\$ $*"
    [ "$DRY" = 1 ] && return 0
    if [ "$limit" -lt 25 ]; then
        echo "-- $name: skipped, ${left}s left of the ${BUDGET}s budget"
        return 0
    fi
    local start=$SECONDS
    timeout -k 5 "$limit" "$@"
    local rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "-- $name: stopped at its ${limit}s limit (the lines above are all it finished)"
    elif [ "$rc" != 0 ]; then
        echo "-- $name: failed, exit $rc"
    fi
    echo "-- $name: $((SECONDS - start))s"
}
want() { [[ "$PARTS" == *" $1 "* ]]; }

P=$PYTHON
LRPO="$P benchmarks/lrpo_epoch.py --model latent-real --device cuda --steps 10 --group-size 3 --inputs-per-batch 2 --batches 1 --micro-batch 6 --threads $THREADS"
REFL="$P benchmarks/refl_step.py --model latent-real --device cuda --batch-size 1 --steps 10 --memory-steps 10 50 --threads $THREADS"

echo
echo "Model: random weights in SD 2.1 base shapes (UNet 866M, VAE 84M) + DiffBIR's ControlNet (363M, trained in full),"
echo "512 px faces, 64x64x4 latents; a small stand-in cleaner; LRPO's rewards wavelet + SSIM, ReFL's FRM the 64 px toy."
echo "Reductions from the originals, so each precision's run takes about a minute:"
echo "  LRPO: one sampling batch of 2 inputs x G=3 = 6 samples an epoch, one micro-batch and minibatch of 6 (the"
echo "    original's per GPU), T=10 (9 trained steps, 9 optimizer steps); configs/lrpo_original.yaml: G=9, 12 sampling"
echo "    batches (72 samples per GPU an epoch), T=50 (49 trained): 12x fewer samples, 5x fewer calls per sample."
echo "  ReFL: batch 1 per GPU as the original (configs/refl_original.yaml: batch_size 1, 4 accumulated), one step"
echo "    (no optimizer) at T=10 (original 50: the no-grad rollout 5x shorter, the grad step the same); graph memory at T=10, 50."

# 1. eager fp32 and bf16 first (the core numbers), then memory and the layouts, the compiled runs last
want lrpo && part "LRPO epoch / bare, fp32" 75 $LRPO --precision fp32 --repeats 2
want lrpo && part "LRPO epoch / bare, bf16 autocast" 55 $LRPO --precision bf16 --repeats 2
want refl && part "ReFL step / bare, fp32" 50 $REFL --precision fp32 --repeats 2
want refl && part "ReFL step / bare, bf16 autocast" 40 $REFL --precision bf16 --repeats 2
# 2. peak allocated GPU memory, a fresh process per setting (checkpoint writes skipped), fp32 as the originals
want memory && part "Peak GPU memory (fp32)" 110 $P benchmarks/memory.py --device cuda --model latent-real --precision fp32 \
    --groups 4 8 --lrpo-steps 10 --refl-steps 10 50 --batches 1 --micro-batch 6 --refl-batch 1 --timeout 60
# 3. the four layouts per call, run.speed's picks, compiled calls (speed_options prints the eager part first)
want speed && part "speed_options: layouts, picks, compiled calls" 80 $P benchmarks/speed_options.py --models latent-real \
    --device cuda --batch 6 --compile --threads "$THREADS"
# 1 (continued). bf16 + torch.compile; the warm-up line includes the compile
want compile && part "LRPO epoch / bare, bf16 + compile" 100 $LRPO --precision bf16 --compile --repeats 2
want compile && part "ReFL step / bare, bf16 + compile" 80 $REFL --precision bf16 --compile --repeats 2
# 4.
echo
echo "== trl side by side (benchmarks/vs_trl_ddpo.py, item 2): skipped: trl cannot be installed offline on this machine"
echo
echo "== gpu.sh done at ${SECONDS}s"
