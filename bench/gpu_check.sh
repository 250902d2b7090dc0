#!/usr/bin/env bash
# The first-GPU check (bench/gpu_check.py): fractional packing of 4 trials on one GPU, latency
# with CUDA synchronisation, the feature cache and the nearest-neighbour search on the GPU
# against the CPU. Under 10 minutes on one GPU; figures to OUT_DIR as gpu_check.json and
# gpu_check.txt, with nvidia-smi's view of the machine beside them. Exit 0: every check passed.
#
#   bash bench/gpu_check.sh [--dry-run] [--plan] [--out OUT_DIR]
#
# --dry-run runs the same steps on the CPU with tiny sizes (what CI checks of it); --plan prints
# the checks. OUT_DIR defaults to $OUT (the device machine's results folder) when set, else
# results/gpu_check. Python: $PYTHON, else .venv/bin/python, else python3; the project must be
# installed in it (`make .venv/.installed`, or `pip install -e .` on the machine).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=() plan=() out="${OUT:-results/gpu_check}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=(--dry-run) ;;
        --plan) plan=(--plan) ;;
        --out) out="${2:?--out needs a folder}"; shift ;;
        *) echo "gpu_check.sh: unknown argument $1 (--dry-run, --plan, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done

python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi

"$python" bench/gpu_check.py "${dry[@]}" "${plan[@]}" --plan | sed 's/^/plan: /'
[ ${#plan[@]} -gt 0 ] && exit 0

mkdir -p "$out"
if [ ${#dry[@]} -eq 0 ]; then
    if ! nvidia-smi >"$out/nvidia-smi.txt" 2>&1; then
        echo "gpu_check.sh: nvidia-smi failed (see $out/nvidia-smi.txt): no GPU here? Use --dry-run." >&2
        exit 2
    fi
    head -n 12 "$out/nvidia-smi.txt"
fi
# 9.5 minutes: the check must finish inside one 10-minute device command.
timeout 570 "$python" bench/gpu_check.py "${dry[@]}" --out "$out"
rc=$?
[ "$rc" -eq 124 ] && echo "gpu_check.sh: timed out after 570 s (the steps done are in $out)" >&2
exit "$rc"
