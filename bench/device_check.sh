#!/usr/bin/env bash
# The GPU proof in one command, on the lent GPU machine (the `device` tool), from the repository root, with
# .device/ carried (`make device-bundle` fills it here: nothing can be fetched there):
#   bash bench/device_check.sh                    # setup checks whisper world, in that order
#   bash bench/device_check.sh setup whisper      # the parts named
# Parts (each under its own time limit, so one that hangs leaves the others their time):
#   setup    this package, DeepSpeed (built there, against the machine's CUDA torch) and what they need,
#            installed from .device/ into $SITE (a folder on PYTHONPATH: the machine's python3 stays as it is)
#   checks   bench/gpu_check.py: NCCL gathers bit for bit, fused/capturable resume, partial offload,
#            offload in the background, pinned buffers (PASS/FAIL each)
#   whisper  bench/gpu.py --repeats 1: a Whisper-large-shaped model, ZeRO-3 bf16, model+optimizer save
#   world    bench/blocking.py on 2, 3 and 4 CPU ranks (one core each there): blocking against world size
#   big      bench/blocking.py at 512M parameters in fp32 training, ZeRO-2 and ZeRO-3, 2 CPU ranks (table 8's
#            rows that need ~32 GB of host memory); not in the default parts: a command of its own
# SMOKE=1 runs every part on a CPU machine, tiny (--cpu-smoke), to check the script and the bundle there.
# Everything printed also lands in $OUT (the device tool brings back summary.txt and one log per part).
# Exit status 1 if any part failed or was not run. The parts share BUDGET seconds (default 580: the device
# tool runs one command for at most 600); each gets at most its own limit (setup 300, checks 300, whisper
# 300, world 400, big 570) or what is left. Estimated: setup 1-2 min, each other part 3-5: run them as two
# commands, `setup checks whisper`, then `setup world` (setup is skipped on a machine still warm from the
# first); `setup big` a third, if device time is left.
set -uo pipefail
self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$self")/.."
out=${OUT:-/tmp/wenet_hooks_device}
site=${SITE:-/tmp/wenet_hooks_site}
bundle=${BUNDLE:-.device}
python=${PYTHON:-python3}
smoke=()
[[ -n ${SMOKE:-} ]] && smoke=(--cpu-smoke)
mkdir -p "$out"
parts=("$@")
[[ ${#parts[@]} -gt 0 ]] || parts=(setup checks whisper world)
started=$(date +%s)
budget=${BUDGET:-580}  # seconds for every part together: the device tool gives one command 600
status=0
say() { echo "[device_check +$(($(date +%s) - started))s] $*" | tee -a "$out/summary.txt"; }

# What a part with its own limit of $1 seconds gets now.
part_limit() {
  local left=$((budget - ($(date +%s) - started) - 10))
  echo $((left < $1 ? left : $1))
}

# One part: its command under `timeout` (its own limit, or what is left of $BUDGET), its output to the
# terminal and $OUT/<part>.log, its outcome said.
part() {
  local name=$1 limit=$2
  shift 2
  limit=$(part_limit "$limit")
  if ((limit < 60)); then
    status=1
    say "$name: NOT RUN: ${limit}s left of BUDGET=${budget}s"
    return 1
  fi
  say "$name: starting (at most ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  if [[ $rc -eq 0 ]]; then
    say "$name: ok"
  else
    status=1
    say "$name: FAILED (exit $rc$([[ $rc -eq 124 ]] && echo ", over ${limit}s"))"
    find "${TORCH_EXTENSIONS_DIR:-/nonexistent}" -name lock -delete 2>/dev/null
  fi
  grep -E '^\|' "$out/$name.log" >>"$out/summary.txt" || true
  return "$rc"
}

# Run through this script (`timeout` runs programs, not shell functions).
case ${1:-} in
  _install)
    [[ -d $bundle/wheels && -d $bundle/sdist ]] ||
      { echo "no $bundle/wheels or $bundle/sdist: run \`make device-bundle\` here and carry $bundle"; exit 2; }
    [[ -f $site/.ready ]] && { echo "already installed in $site"; exit 0; }
    rm -rf "$site"
    pip=("$python" -m pip install -q --disable-pip-version-check --no-index --no-deps --upgrade --target "$site")
    "${pip[@]}" --no-compile "$bundle"/wheels/*.whl || exit 1
    # DeepSpeed imports torch while it builds; its ops are compiled when first used (DS_BUILD_OPS=0).
    PYTHONPATH=$site DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation "$bundle"/sdist/deepspeed-*.tar.gz || exit 1
    PYTHONPATH=$site "${pip[@]}" --no-build-isolation . || exit 1
    rm -rf build
    touch "$site/.ready"
    exit 0 ;;
  _versions)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    echo "cores: $(nproc), memory: $(free -g | awk '/Mem:/ {print $2}') GiB, free on /tmp: $(df -h /tmp | awk 'NR==2 {print $4}')"
    cd /tmp && exec "$python" -c "import sys, torch, deepspeed, wenet_hooks
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| gpu', torch.cuda.is_available(), '| deepspeed', deepspeed.__version__,
      '| wenet_hooks', wenet_hooks.__version__, 'from', wenet_hooks.__file__)" ;;
esac

say "parts: ${parts[*]}; results in $out"
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# DeepSpeed's ops, compiled at their first use, in a folder of this run's: a part stopped while compiling
# leaves a lock there that would stall the next part's load of that op (removed after each failed part).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/wenet_hooks_torch_extensions}
for name in "${parts[@]}"; do
  case $name in
    setup)
      part setup 300 bash "$self" _install && part versions 120 bash "$self" _versions || break ;;
    checks)
      # its own limit a little under the part's, so that it prints what it did before it is stopped
      part checks 300 env -u DS_ACCELERATOR -u OMP_NUM_THREADS "$python" bench/gpu_check.py --no-bench \
        --timeout "$(($(part_limit 300) - 40))" "${smoke[@]}" ;;
    whisper)
      part whisper 300 env -u DS_ACCELERATOR -u OMP_NUM_THREADS "$python" bench/gpu.py --repeats 1 "${smoke[@]}" ;;
    world)
      part world 400 "$python" bench/blocking.py --params "$([[ -n ${SMOKE:-} ]] && echo 5e6 || echo 53e6)" \
        --stages 2 --ranks 2 3 4 ;;
    big)
      part big 570 "$python" bench/blocking.py --params "$([[ -n ${SMOKE:-} ]] && echo 5e6 || echo 512e6)" \
        --stages 2 3 ;;
    *)
      say "unknown part '$name' (setup, checks, whisper, world, big)"; status=2 ;;
  esac
done
say "done: exit $status"
exit $status
