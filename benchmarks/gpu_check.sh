#!/usr/bin/env bash
# One prepared check for a machine with one CUDA GPU (about 5-8 minutes), run from the repo root:
#
#     bash benchmarks/gpu_check.sh            # PY=path/to/python to choose the interpreter
#     GPU_CHECK_OUT=dir bash benchmarks/gpu_check.sh     # keep the table and every section's log in dir
#     GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh  # rehearsal on the CPU at toy sizes (minutes)
#
# 1. the tests that need CUDA (tests/distributed/test_distributed_cuda.py);
# 2. `gce train` end to end on the GPU (tiny generated dataset, bf16 autocast, channels-last):
#    every path of a run (steps, meta-class refresh, evaluation) on CUDA tensors;
# 3. ResNet-50 224 px training throughput, single-metric head against GCE K=4 and K=8,
#    fp32 and bf16 autocast (random weights: ImageNet ResNet-50 weights cannot be fetched offline;
#    speed does not depend on them), with the GiB each peaks at;
# 4. the `gce eval` pipeline at SOP size: 60,000 images embedded on the GPU (ResNet-50, 224 px,
#    generated images), then the 60,000 x 512 retrieval + clustering metrics;
# 5. the effect of train.channels_last, cudnn.benchmark, train.amp and (last, on its own: it
#    compiles for a minute or more) train.compile on the GCE K=4 step (benchmarks/step_options.py);
# 6. embedding images/s of each inference runtime (benchmarks/inference_floor.py --device-table):
#    torch on CUDA, ONNX Runtime's CUDA and TensorRT providers when its build has them (a row says
#    "skipped" otherwise); on a CPU-only machine torch and ONNX Runtime on the CPU.
# 7. ViT-S/16 (timm/vit_small_patch16_224) 224 px training throughput, GCE K=4 and K=8 on the 14 x 14
#    patch-token grid against the single-metric head, fp32 and bf16 (random weights; needs timm);
#    skipped without a CUDA device (the CPU rehearsal runs it at 32 px) or without timm.
# Every section has its own time limit and a failed one does not stop the others. Each row of the
# table is printed as soon as it is known; the script ends with the whole table. Nothing is written
# outside a temporary folder (and GPU_CHECK_OUT when given).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOGS=${GPU_CHECK_OUT:-$WORK}
mkdir -p "$LOGS"
TABLE="$LOGS/table.tsv"
: > "$TABLE"
row() { printf '%s\t%s\n' "$1" "$2" | tee -a "$TABLE" >&2; }
section() { echo "== $1 ($(date +%T))" >&2; }
# run LIMIT LOG CMD...: the command under a time limit, its output in LOG; a failure shows LOG's end.
run() {
  local limit=$1 log=$2; shift 2
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    { echo "-- $(basename "$log"): exit $rc$([ $rc -eq 124 ] && echo " (over its ${limit} s limit)")"; tail -25 "$log"; } >&2
  fi
  return $rc
}
if [ "$DEVICE" = cpu ]; then  # toy sizes: checks the script, not the GPU
  BACKBONE=resnet18 SIZE=64 EVAL_N=2000 EVAL_DIM=64 EVAL_BATCH=64
else
  BACKBONE=resnet50 SIZE=224 EVAL_N=60000 EVAL_DIM=512 EVAL_BATCH=256
fi

row "device" "$("$PY" -c "import torch; print((torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device') + ', torch ' + torch.__version__)" 2>&1)"

section "1. CUDA tests"
if run 180 "$LOGS/tests.log" "$PY" -m pytest -q -p no:cacheprovider tests/distributed/test_distributed_cuda.py; then
  row "CUDA tests" "$(tail -1 "$LOGS/tests.log")"
else
  row "CUDA tests" "FAILED: $(tail -1 "$LOGS/tests.log")"
fi

section "2. gce train on the $DEVICE"
"$PY" -c "from gce.data.synthetic import make_pattern_folder as m; m(__import__('pathlib').Path('$WORK/shapes'))"
cat > "$WORK/tiny.yaml" <<YAML
name: gpu-check
data: {dataset: folder, root: $WORK/shapes, image_size: 32, test_resize: 32, workers: 2,
       options: {test_fraction: 0.25, seed: 0}}
model: {backbone: resnet18, head: gce, num_learners: 2, embedding_dim: 32, pretrained: false}
metaclass: {strategy: class_proxy, update_every: 1}
sampler: {classes_per_batch: 3, samples_per_class: 2, batches_per_epoch: 6}
optim: {name: adam, lr: 1.0e-3}
train: {epochs: 2, seed: 0, out_dir: $WORK/run, device: $DEVICE, amp: true, channels_last: true}
eval: {batch_size: 16}
YAML
start=$(date +%s)
if run 90 "$LOGS/train.log" "$PY" -m gce train "$WORK/tiny.yaml"; then
  row "gce train ($DEVICE, bf16, channels-last)" "ok in $(( $(date +%s) - start )) s, test $("$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); print(', '.join(f'{k} {100*v:.1f}' for k,v in m.items() if k in ('recall@1','map@r','nmi')))" "$WORK/run/final_metrics.json")"
else
  row "gce train ($DEVICE, bf16, channels-last)" "FAILED: $(tail -1 "$LOGS/train.log")"
fi

section "3. $BACKBONE $SIZE px throughput"
for precision in fp32 bf16; do
  amp=$([ $precision = bf16 ] && echo --amp)
  if run 120 "$LOGS/throughput_$precision.log" "$PY" benchmarks/head_step_ratio.py --device "$DEVICE" \
      --backbone "$BACKBONE" --size "$SIZE" --pretrained no --flush off --k 4 8 --classes 16 --per-class 4 \
      --steps 10 --warmup 3 $amp; then
    awk -v p="$precision" -v b="$BACKBONE" -v s="$SIZE" '$1=="random" {printf "%s %spx %s, batch 64, K=%s\tGCE %s img/s, single %s img/s, time ratio %s, FLOP ratio %s, peak GiB GCE %s / single %s\n", b, s, p, $3, $6, $7, $8, $10, $12, $13}' \
        "$LOGS/throughput_$precision.log" | while IFS=$'\t' read -r name value; do row "$name" "$value"; done
  else
    row "$BACKBONE throughput $precision" "FAILED"
  fi
done

section "4. gce eval pipeline at $EVAL_N x $EVAL_DIM"
if run 300 "$LOGS/eval.log" "$PY" benchmarks/eval_pipeline.py --device "$DEVICE" --backbone "$BACKBONE" \
    --size "$SIZE" --n "$EVAL_N" --dim "$EVAL_DIM" --batch "$EVAL_BATCH"; then
  tail -1 "$LOGS/eval.log" | while IFS=$'\t' read -r name value; do row "$name" "$value"; done
else
  row "eval $EVAL_N x $EVAL_DIM" "FAILED: $(grep -E '^  [a-z-]+.*: [0-9.]+ s$' "$LOGS/eval.log" | tr -s ' ' | paste -sd ';')"
fi

section "5. train.channels_last / cudnn.benchmark / train.amp, then train.compile, on a $BACKBONE GCE step"
options_rows() {  # the step_options table (after its header line) as rows
  awk 'started {n=NF; name=$1; for (i=2; i<=n-5; i++) name=name" "$i; printf "step option: %s\t%s img/s, %s of plain, warm-up %s s, peak %s GiB\n", name, $(n-3), $(n-2), $(n-1), $n} /^option /{started=1}' \
      "$1" | while IFS=$'\t' read -r name value; do row "$name" "$value"; done
}
only=(plain channels_last)
[ "$DEVICE" != cpu ] && only+=("amp (bf16)" "amp + channels_last" "cudnn.benchmark" "amp + channels_last + cudnn.benchmark")
if run 150 "$LOGS/options.log" "$PY" benchmarks/step_options.py --device "$DEVICE" --backbone "$BACKBONE" \
      --size "$SIZE" --k 4 --steps 10 --warmup 3 --only "${only[@]}"; then
  options_rows "$LOGS/options.log"
else
  row "step options" "FAILED"
fi
# torch.compile on its own (its first steps compile for a minute or more; a timeout loses only this row)
if run 200 "$LOGS/compile.log" "$PY" benchmarks/step_options.py --device "$DEVICE" --backbone "$BACKBONE" \
      --size "$SIZE" --k 4 --steps 10 --warmup 3 --only plain compile; then
  options_rows "$LOGS/compile.log"
else
  row "step option: compile" "FAILED"
fi

section "6. inference runtimes on the $DEVICE"
if run 240 "$LOGS/runtimes.log" "$PY" benchmarks/inference_floor.py --checkpoint untrained \
      --workdir "$WORK/runtimes" --device-table "$DEVICE"; then
  grep -P '\t' "$LOGS/runtimes.log" | while IFS=$'\t' read -r name value; do row "$name" "$value"; done
else
  row "inference runtimes" "FAILED"
fi

section "7. ViT-S/16 throughput on the $DEVICE"
VIT=timm/vit_small_patch16_224
VIT_SIZE=224 VIT_ARGS=(--k 4 8 --classes 16 --per-class 4 --steps 10 --warmup 3)
# toy sizes on the CPU (the size a multiple of the patch, 16): checks the section, not the speed
[ "$DEVICE" = cpu ] && VIT_SIZE=32 VIT_ARGS=(--k 4 --classes 4 --per-class 2 --steps 2 --warmup 1)
if [ "$DEVICE" != cpu ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  row "$VIT throughput" "skipped: no CUDA device"
elif ! "$PY" -c "import timm" 2>/dev/null; then
  row "$VIT throughput" "skipped: timm not installed (pip install 'gce-dml[timm]')"
else
  for precision in fp32 bf16; do
    amp=$([ $precision = bf16 ] && echo --amp)
    if run 150 "$LOGS/vit_$precision.log" "$PY" benchmarks/head_step_ratio.py --device "$DEVICE" \
        --backbone "$VIT" --size "$VIT_SIZE" --pretrained no --flush off "${VIT_ARGS[@]}" $amp; then
      awk -v p="$precision" -v s="$VIT_SIZE" '/^timm/ {split($5, pm, /[x,]/); batch=pm[1]*pm[2]} $1=="random" {printf "vit_small_patch16 %spx %s, batch %s, K=%s\tGCE %s img/s, single %s img/s, time ratio %s, FLOP ratio %s, peak GiB GCE %s / single %s\n", s, p, batch, $3, $6, $7, $8, $10, $12, $13}' \
          "$LOGS/vit_$precision.log" | while IFS=$'\t' read -r name value; do row "$name" "$value"; done
    else
      row "$VIT throughput $precision" "FAILED"
    fi
  done
fi

echo
echo "gpu_check summary ($(date +%T))"
column -t -s $'\t' "$TABLE" 2>/dev/null || cat "$TABLE"
