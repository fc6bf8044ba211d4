#!/usr/bin/env bash
# The one prepared GPU benchmark: hctl's worker against heretic on a random-weight model of a
# real size (Qwen3-4B's shape, bf16), and the worker's decode step against the copy bandwidth
# measured on the same card. Prints a short table last; writes JSON and logs to $OUT.
#
#   set -o pipefail; bash scripts/device/bench_h200.sh 2>&1 | tee $OUT/bench_h200.log   # GPU machine
#   bash scripts/device/bench_h200.sh --cpu-smoke --python VENV/bin/python --wheels DIR --out DIR
#
# --graphs-only (about 5 minutes): steps 1-3, the CUDA-graph check (graph_check.py: the same
# replies with decode graphs off and on for a few edited trials, and the decode step each way
# against the bandwidth limit) and step 5 (the worker with graphs: decode_graphs = "auto");
# steps 4 and 5b are skipped.
#
# Wheels travel in WHEELS/common (both tools), WHEELS/hctl (optuna 5) and WHEELS/heretic (optuna
# 4.x, heretic-llm and what it imports): each set goes into its own folder under SITE, and each
# tool gets its own PYTHONPATH. heretic starts through heretic_run.py (import-only stand-ins for
# lm_eval and bitsandbytes), the worker through hctl_worker_run.py (worker/ on its path).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=python3 WHEELS=$REPO/.whl OUTDIR=${OUT:-/tmp/hctl-bench-out} SITE=/tmp/hctl-site SMOKE=0 GRAPHS=0
while [ $# -gt 0 ]; do
  case $1 in
    --cpu-smoke) SMOKE=1 ;;
    --graphs-only) GRAPHS=1 ;;
    --python) PY=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    --out) OUTDIR=$2; shift ;;
    --site) SITE=$2; shift ;;
    *) echo "error: unknown option $1"; echo "hint: --cpu-smoke, --graphs-only, --python, --wheels, --out, --site"; exit 2 ;;
  esac
  shift
done
if [ "$SMOKE" = 1 ]; then
  # CPU smoke: the tiny qwen3 shape, float32, 2 trials, few prompts: every step runs, quickly.
  # 4 layers: heretic's parameter ranges need at least 3 (min_weight_distance 1 .. 0.6 * last).
  DEVICE=cpu DTYPE=float32 ARCH=qwen3 BATCH=8 NEW=8 TRIALS=2 EVAL=8 TRAIN=16 MB=256 LIMIT=900
  SHAPE=(--layers 4)
else
  # 64 + 64 evaluation prompts in one batch each, 32-token replies, 8 trials: each tool's run is
  # about a minute of loading, directions and baseline plus 8 trials, both inside LIMIT seconds.
  DEVICE=cuda DTYPE=bfloat16 ARCH=qwen3-4b BATCH=64 NEW=32 TRIALS=8 EVAL=64 TRAIN=128 MB=4096 LIMIT=220
  SHAPE=()
fi
MODEL=/tmp/hctl-models/$ARCH
mkdir -p "$OUTDIR"
cd "$REPO"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset PYTHONPATH
step() { echo "== $(date +%T) $*"; }

step "1. wheels from $WHEELS into $SITE/{common,hctl,heretic}"
for set in common hctl heretic; do
  rm -rf "${SITE:?}/$set"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$SITE/$set" "$WHEELS/$set"/*.whl \
    || { echo "error: the $set wheels did not install"; echo "hint: carry .whl (see scripts/device/README.md)"; exit 3; }
done
HCTL_PATH=$REPO/worker:$SITE/hctl:$SITE/common
HERETIC_PATH=$SITE/heretic:$SITE/common
PYTHONPATH=$HCTL_PATH "$PY" -c "
import optuna, pydantic, pydantic_settings, tomli_w, hctl_worker.cli, hctl_worker.pipeline
assert int(optuna.__version__.split('.')[0]) >= 5, 'hctl needs optuna >= 5, found ' + optuna.__version__
print('hctl_worker imports (optuna', optuna.__version__ + ', pydantic', pydantic.VERSION + ')')
" || { echo "error: hctl's worker does not import on its PYTHONPATH"; exit 3; }
# Without heretic the device facts and the worker's decode step still come back; step 5 is skipped.
HERETIC_OK=1
PYTHONPATH=$HERETIC_PATH "$PY" scripts/device/heretic_run.py --import-check \
  || { HERETIC_OK=0; echo "error: heretic does not import on its PYTHONPATH: step 5 will be skipped"; }

step "2. the device and its copy bandwidth"
"$PY" scripts/device/device_facts.py --device "$DEVICE" --megabytes "$MB" --json "$OUTDIR/device.json"

step "3. a random $ARCH ($DTYPE) in $MODEL"
rm -rf "$MODEL"
"$PY" scripts/make_random_model.py "$MODEL" --arch "$ARCH" --dtype "$DTYPE" --device "$DEVICE" "${SHAPE[@]}"
du -sh "$MODEL"

HCTL_SETTINGS=()
[ "$GRAPHS" = 1 ] && HCTL_SETTINGS=(--hctl-setting 'decode_graphs = "auto"')
if [ "$GRAPHS" = 1 ]; then
  step "4g. decode steps as CUDA graphs: the same replies? how fast? (batch $BATCH, $NEW new tokens)"
  PYTHONPATH=$HCTL_PATH timeout 150 "$PY" scripts/device/graph_check.py "$MODEL" --device "$DEVICE" \
    --dtype "$DTYPE" --batch-size "$BATCH" --new-tokens "$NEW" \
    --facts "$OUTDIR/device.json" --json "$OUTDIR/graphs.json" \
    || echo "graph check failed, found a MISMATCH or ran out of time (see above)"
else
  step "4. the worker's decode step (batch $BATCH, $NEW new tokens)"
  PYTHONPATH=$HCTL_PATH "$PY" scripts/device/decode_roofline.py "$MODEL" --device "$DEVICE" \
    --dtype "$DTYPE" --batch-size "$BATCH" --new-tokens "$NEW" \
    --facts "$OUTDIR/device.json" --json "$OUTDIR/decode.json" \
    || echo "decode timing failed (see above)"
fi

step "5. hctl vs heretic, alternating (a random model never refuses: the time per trial is what compares)"
if [ "$HERETIC_OK" = 1 ]; then
  timeout "$LIMIT" "$PY" scripts/bench_heretic.py --model "$ARCH=$MODEL" --device "$DEVICE" \
    --dtype "$DTYPE" --trials "$TRIALS" --eval-prompts "$EVAL" --train-prompts "$TRAIN" \
    --batch-size "$BATCH" --max-response-length "$NEW" \
    --hctl-command "$PY $REPO/scripts/device/hctl_worker_run.py" --hctl-pythonpath "$HCTL_PATH" \
    --heretic-command "$PY $REPO/scripts/device/heretic_run.py" --heretic-pythonpath "$HERETIC_PATH" \
    "${HCTL_SETTINGS[@]}" --json "$OUTDIR/bench_heretic.json" 2>&1 | tee "$OUTDIR/bench_heretic.log" \
    || echo "bench_heretic failed or passed its $LIMIT s limit (see bench_heretic.log)"
else
  echo "skipped: heretic does not import"
fi

# What is left of the lease: the worker's own stages (KL, replies, drafts, pass cost) on the same
# model, stopped in time for the summary.
LEFT=$(( (SMOKE == 1 ? 900 : 500) - SECONDS ))
if [ "$GRAPHS" = 0 ] && [ "$LEFT" -gt 60 ]; then
  step "5b. the worker's stages (bench_worker.py, at most $LEFT s)"
  PYTHONPATH=$HCTL_PATH timeout "$LEFT" "$PY" scripts/bench_worker.py --model "$MODEL" \
    --device "$DEVICE" --dtype "$DTYPE" --params heretic --trials "$TRIALS" --prompts "$EVAL" \
    --batch-size "$BATCH" --max-response-length "$NEW" --json "$OUTDIR/bench_worker.json" \
    2>&1 | tail -25 || echo "bench_worker failed or ran out of time"
fi

step "6. summary"
"$PY" scripts/device/summary.py "$OUTDIR"
[ "$HERETIC_OK" = 1 ] || { echo "error: heretic did not import (see step 1): no comparison"; exit 3; }
