#!/usr/bin/env bash
# One prepared check for a machine with one CUDA GPU (about 5-8 minutes), run from the repo root:
#
#     bash benchmarks/gpu_check.sh            # PY=path/to/python to choose the interpreter
#
# 1. the tests that need CUDA (tests/test_distributed_cuda.py);
# 2. `gce train` end to end on the GPU (tiny generated dataset, bf16 autocast, channels-last):
#    every path of a run (steps, meta-class refresh, evaluation) on CUDA tensors;
# 3. ResNet-50 224 px training throughput, single-metric head against GCE K=4 and K=8,
#    fp32 and bf16 autocast (random weights: ImageNet ResNet-50 weights cannot be fetched offline;
#    speed does not depend on them); 3b. the effect of train.channels_last, train.compile and
#    train.amp on the GCE K=4 step (benchmarks/step_options.py);
# 4. the `gce eval` pipeline at SOP size: 60,000 images embedded on the GPU (ResNet-50, 224 px,
#    generated images), then the 60,000 x 512 retrieval + clustering metrics.
# It ends with one table. Nothing is written outside a temporary folder.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d)
TABLE="$WORK/table.tsv"
trap 'rm -rf "$WORK"' EXIT
row() { printf '%s\t%s\n' "$1" "$2" >> "$TABLE"; }

"$PY" - <<'PY' >> "$TABLE"
import torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"device\t{name}, torch {torch.__version__}")
PY

echo "== 1. CUDA tests" >&2
if "$PY" -m pytest -q -p no:cacheprovider tests/test_distributed_cuda.py > "$WORK/tests.log" 2>&1; then
  row "CUDA tests" "$(tail -1 "$WORK/tests.log")"
else
  row "CUDA tests" "FAILED: $(tail -1 "$WORK/tests.log")"; tail -30 "$WORK/tests.log" >&2
fi

echo "== 2. gce train on the GPU" >&2
"$PY" -c "from gce.data.synthetic import make_pattern_folder as m; m(__import__('pathlib').Path('$WORK/shapes'))"
cat > "$WORK/tiny.yaml" <<YAML
name: gpu-check
data: {dataset: folder, root: $WORK/shapes, image_size: 32, test_resize: 32, workers: 2,
       options: {test_fraction: 0.25, seed: 0}}
model: {backbone: resnet18, head: gce, num_learners: 2, embedding_dim: 32, pretrained: false}
metaclass: {strategy: class_proxy, update_every: 1}
sampler: {classes_per_batch: 3, samples_per_class: 2, batches_per_epoch: 6}
optim: {name: adam, lr: 1.0e-3}
train: {epochs: 2, seed: 0, out_dir: $WORK/run, device: cuda, amp: true, channels_last: true}
eval: {batch_size: 16}
YAML
start=$(date +%s)
if "$PY" -m gce train "$WORK/tiny.yaml" --quiet > "$WORK/train.log" 2>&1; then
  row "gce train (cuda, bf16, channels-last)" "ok in $(( $(date +%s) - start )) s, $(grep -m1 -i 'recall@1' "$WORK/train.log" | tr -s ' ')"
else
  row "gce train (cuda, bf16, channels-last)" "FAILED: $(tail -1 "$WORK/train.log")"; tail -30 "$WORK/train.log" >&2
fi

echo "== 3. ResNet-50 224 px throughput" >&2
for amp in "" "--amp"; do
  "$PY" benchmarks/head_step_ratio.py --device cuda --backbone resnet50 --size 224 --pretrained no --flush off \
      --k 4 8 --classes 16 --per-class 4 --steps 10 --warmup 3 $amp > "$WORK/throughput.log" 2>&1 \
    || { tail -30 "$WORK/throughput.log" >&2; row "ResNet-50 throughput ${amp:-fp32}" "FAILED"; continue; }
  precision=$([ -n "$amp" ] && echo bf16 || echo fp32)
  awk -v p="$precision" '$1=="random" {printf "ResNet-50 224px %s, batch 64, K=%s\tGCE %s img/s, single %s img/s, ratio %s\n", p, $3, $6, $7, $8}' \
      "$WORK/throughput.log" >> "$TABLE"
done

echo "== 3b. train.channels_last / train.compile / train.amp on a ResNet-50 GCE step" >&2
if "$PY" benchmarks/step_options.py --device cuda --backbone resnet50 --size 224 --k 4 --steps 10 --warmup 3 \
      --only plain channels_last compile "amp (bf16)" "amp + channels_last" > "$WORK/options.log" 2>&1; then
  awk 'NR>2 {n=NF; name=$1; for (i=2; i<=n-4; i++) name=name" "$i; printf "step option: %s\t%s img/s, %s of plain, warm-up %s s\n", name, $(n-2), $(n-1), $n}' \
      "$WORK/options.log" >> "$TABLE"
else
  tail -30 "$WORK/options.log" >&2; row "step options" "FAILED"
fi

echo "== 4. gce eval pipeline at 60,000 x 512" >&2
"$PY" - <<'PY' >> "$TABLE" 2> "$WORK/eval.log" || { tail -30 "$WORK/eval.log" >&2; row "eval 60,000 x 512" "FAILED"; }
import time
import torch
from torch.utils.data import Dataset
from gce.evaluation import evaluate_embeddings, extract_embeddings
from gce.models import build_model

class Generated(Dataset):
    """60,000 random 224 px images (made on the fly: 36 GB as one tensor), SOP-like class sizes."""
    def __len__(self): return 60_000
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, 224, 224, generator=g), i // 5

model = build_model(backbone="resnet50", head="gce", num_learners=4, embedding_dim=512, pretrained=False,
                    freeze_bn=True).cuda()
start = time.perf_counter()
with torch.autocast("cuda", dtype=torch.bfloat16):
    x, y = extract_embeddings(model, Generated(), batch_size=256, num_workers=8, device="cuda", progress=False)
torch.cuda.synchronize()
embed_s = time.perf_counter() - start
start = time.perf_counter()
result = evaluate_embeddings(x, y, recall_ks=(1, 10, 100, 1000), clustering=True, seed=0)
metric_s = time.perf_counter() - start
print(f"eval 60,000 x 512 (ResNet-50 224px bf16)\tembedding {embed_s:.0f} s ({60000 / embed_s:.0f} img/s on GPU), "
      f"metrics {metric_s:.0f} s (CPU), R@1 {100 * result.recall[1]:.1f}, peak GPU memory "
      f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
PY

echo
echo "gpu_check summary"
column -t -s $'\t' "$TABLE"
