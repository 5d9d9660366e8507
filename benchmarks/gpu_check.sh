#!/usr/bin/env bash
# One short check (< 5 minutes) for a machine with an NVIDIA GPU:
#   1. embedding throughput of ViT-B-32 (random weights) with CUDA fp32 / fp16 / bf16 autocast
#      against the fp32 CPU path, with the minimum cosine of each mode to fp32;
#   2. faiss-gpu exact search against faiss-cpu on the same vectors (speed and top-k agreement).
# Usage: bash benchmarks/gpu_check.sh            (from anywhere; uses the repo's .venv if present)
# faiss-gpu-cu12 is installed into a separate folder (it ships the same `faiss` module as
# faiss-cpu, so the two never share one environment); without network that part is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
  else
    python3 -m venv /tmp/clipdex-gpu-venv
    /tmp/clipdex-gpu-venv/bin/pip install --quiet -e "$ROOT"
    PY=/tmp/clipdex-gpu-venv/bin/python
  fi
fi
FAISS_GPU_DIR=${FAISS_GPU_DIR:-/tmp/clipdex-faiss-gpu}
if [[ ! -d "$FAISS_GPU_DIR/faiss" ]]; then
  timeout 120 "$PY" -m pip install --quiet --target "$FAISS_GPU_DIR" --no-deps \
    "faiss-gpu-cu12==1.14.1.post1" || echo "note: could not install faiss-gpu-cu12; skipping it"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

timeout 150 "$PY" - <<'EOF'
import time, numpy as np, torch
from PIL import Image, ImageDraw
from indexer.embed import ModelSpec, OpenClipEmbedder

print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
rng = np.random.default_rng(0)
def scene(i):
    img = Image.new("RGB", (640, 480), tuple(int(c) for c in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(8):
        x, y = int(rng.integers(0, 560)), int(rng.integers(0, 400))
        d.ellipse([x, y, x + int(rng.integers(20, 200)), y + int(rng.integers(20, 200))],
                  fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img
def run(emb, x, bs=32, reps=1):
    emb.embed_pixels(x[:bs])  # warm-up: cuDNN/oneDNN kernels, allocator
    if emb.device == "cuda": torch.cuda.synchronize()
    t0 = time.perf_counter(); out = []
    for _ in range(reps):
        out = [emb.embed_pixels(x[i:i + bs]) for i in range(0, len(x), bs)]
    if emb.device == "cuda": torch.cuda.synchronize()
    v = np.concatenate(out)
    return reps * len(x) / (time.perf_counter() - t0), v / np.linalg.norm(v, axis=1, keepdims=True)

cpu = OpenClipEmbedder(ModelSpec(random_init=True, device="cpu")); cpu.load()
x = np.stack([cpu.preprocess(scene(i)) for i in range(256)])
n_cpu = 64  # the CPU is slow: time it on a quarter, compare vectors on the same quarter
ips_cpu, ref = run(cpu, x[:n_cpu])
rows = [("cpu fp32 (baseline)", ips_cpu, 1.0, 1.0)]
if torch.cuda.is_available():
    for prec in ("fp32", "fp16", "bf16"):
        emb = OpenClipEmbedder(ModelSpec(random_init=True, device="cuda", precision=prec))
        emb.load()
        ips, v = run(emb, x, bs=128, reps=3)
        rows.append((f"cuda {prec} autocast", ips, ips / ips_cpu,
                     float((v[:n_cpu] * ref).sum(1).min())))
print("\n## ViT-B-32 embedding throughput (random weights, 256 synthetic 640x480 images)")
print(f"{'mode':<22} | {'images/s':>9} | {'x cpu fp32':>10} | {'min cos to cpu fp32':>19}")
for name, ips, ratio, cos in rows:
    print(f"{name:<22} | {ips:9.1f} | {ratio:10.1f} | {cos:19.5f}")
print("a mode is offered only at min cos >= 0.999 (re-check with the real weights)")
EOF

FAISS_BENCH=$(cat <<'EOF'
import json, sys, time, numpy as np, faiss
n, d, nq, k = 200_000, 512, 2_000, 10
rng = np.random.default_rng(0)
xb = rng.standard_normal((n, d), dtype=np.float32); faiss.normalize_L2(xb)
xq = xb[rng.choice(n, nq, replace=False)] + 0.05 * rng.standard_normal((nq, d), dtype=np.float32)
faiss.normalize_L2(xq)
index = faiss.IndexFlatIP(d); index.add(xb)
gpu = sys.argv[1] == "gpu"
if gpu:
    if faiss.get_num_gpus() == 0:
        print(json.dumps({"error": "faiss sees no GPU"})); sys.exit()
    index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
index.search(xq[:10], k)
t0 = time.perf_counter(); _, ids = index.search(xq, k); dt = time.perf_counter() - t0
np.save(f"/tmp/clipdex-faiss-{sys.argv[1]}.npy", ids)
print(json.dumps({"qps": nq / dt, "seconds": dt, "faiss": faiss.__version__}))
EOF
)
echo
echo "## Exact search, IndexFlatIP, 200,000 x 512 vectors, 2,000 queries, k=10"
CPU_JSON=$(timeout 60 "$PY" -c "$FAISS_BENCH" cpu)
echo "faiss-cpu (baseline): $CPU_JSON"
if [[ -d "$FAISS_GPU_DIR/faiss" ]]; then
  GPU_JSON=$(PYTHONPATH="$FAISS_GPU_DIR" timeout 60 "$PY" -c "$FAISS_BENCH" gpu || echo '{"error": "failed"}')
  echo "faiss-gpu:            $GPU_JSON"
  "$PY" - "$CPU_JSON" "$GPU_JSON" <<'EOF'
import json, sys, numpy as np
cpu, gpu = json.loads(sys.argv[1]), json.loads(sys.argv[2])
if "qps" in gpu:
    a, b = np.load("/tmp/clipdex-faiss-cpu.npy"), np.load("/tmp/clipdex-faiss-gpu.npy")
    agree = np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)])
    print(f"gpu / cpu speed-up: {gpu['qps'] / cpu['qps']:.1f}x; top-10 agreement {agree:.4f}")
EOF
fi
