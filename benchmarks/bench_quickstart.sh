#!/usr/bin/env bash
# Quickstart end to end: wall time, peak RSS and final held-out accuracy of
#   visiontune train mnist-efficientnet-lite0 output_dir=<tmp dir> --overwrite
# Wall time and peak RSS come from `/usr/bin/time -v` (or, where it is missing, a Python wrapper reading
# resource.getrusage(RUSAGE_CHILDREN)); the accuracy from <run>/eval/after.json.
# Usage (from anywhere): bash benchmarks/bench_quickstart.sh [extra key=value overrides]
# Set KEEP_RUN=1 to keep the run folder (it is deleted at exit otherwise).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
VT="$ROOT/.venv/bin/visiontune"
RECIPE="$ROOT/src/visiontune/recipes/classify/mnist-efficientnet-lite0.yaml"
export HF_HUB_OFFLINE=1

for f in "$PY" "$VT" "$RECIPE"; do
    [[ -e "$f" ]] || { echo "missing $f; run \`make setup\` first" >&2; exit 1; }
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/vt-quickstart-XXXXXX")"
RUN_DIR="$WORK/run"
TIME_LOG="$WORK/time.log"
if [[ "${KEEP_RUN:-0}" == 1 ]]; then
    echo "run folder kept: $RUN_DIR"
else
    trap 'rm -rf "$WORK"' EXIT
fi

# The built-in recipe by name, as the quickstart runs it (`visiontune.recipe.find_recipe` resolves it to $RECIPE).
CMD=("$VT" train mnist-efficientnet-lite0 "output_dir=$RUN_DIR" "$@" --overwrite)
echo "command: ${CMD[*]}"

if [[ -x /usr/bin/time ]]; then
    /usr/bin/time -v -o "$TIME_LOG" "${CMD[@]}"
    WALL="$(sed -n 's/^\s*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$TIME_LOG")"
    RSS_KB="$(sed -n 's/^\s*Maximum resident set size (kbytes): //p' "$TIME_LOG")"
else
    "$PY" - "$TIME_LOG" "${CMD[@]}" <<'EOF'
import resource, subprocess, sys, time

start = time.perf_counter()
rc = subprocess.call(sys.argv[2:])
wall = time.perf_counter() - start
peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kilobytes on Linux
minutes, seconds = divmod(wall, 60)
with open(sys.argv[1], "w") as f:
    f.write(f"wall {int(minutes)}:{seconds:05.2f}\nrss_kb {peak_kb}\n")
sys.exit(rc)
EOF
    WALL="$(sed -n 's/^wall //p' "$TIME_LOG")"
    RSS_KB="$(sed -n 's/^rss_kb //p' "$TIME_LOG")"
fi

ACCURACY="$("$PY" -c 'import json, sys; print("%.4f" % json.load(open(sys.argv[1]))["metrics"]["accuracy"])' \
    "$RUN_DIR/eval/after.json")"

echo "wall time (m:ss): $WALL"
echo "peak RSS: $((RSS_KB / 1024)) MiB"
echo "held-out accuracy (eval/after.json): $ACCURACY"
