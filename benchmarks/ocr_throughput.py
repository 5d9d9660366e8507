"""Images/s of `index build` with and without `--ocr`, on a seeded sample of
../shared/data/detect (photos without text, UI screenshots, typographic attacks) plus synthetic
injection screenshots.

    python benchmarks/ocr_throughput.py [--photos 14 --ui 10 --typographic 8 --synthetic 8]

Measured in one run, in this order: the CLIP build alone (the baseline: ViT-B-32, random
weights unless CLIPDEX_WEIGHTS), OCR in-process (1 engine, nothing stored), OCR in 2 worker
processes (stored), and the same OCR pass again (every result cached by content hash).
Output: benchmarks/results/ocr_throughput.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from _report import publish

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.detect_eval import machine  # noqa: E402
from indexer.build import BuildSettings  # noqa: E402
from indexer.embed import ModelSpec  # noqa: E402
from indexer.store import Store  # noqa: E402
from search.app import run_build  # noqa: E402
from search.ocr_app import ocr_images, ocr_store  # noqa: E402
from tests.synth_text import samples  # noqa: E402


def pick(data: Path, want: dict[str, int], seed: int) -> list[tuple[str, str]]:
    rows = [json.loads(x) for x in (data / "labels.jsonl").read_text().splitlines() if x.strip()]
    rng = random.Random(seed)
    out = []
    for cat, n in want.items():
        pool = [r for r in rows if r["category"] == cat]
        out += [(cat, str((data / r["path"]).resolve())) for r in rng.sample(pool, n)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "detect"))
    ap.add_argument("--photos", type=int, default=14)
    ap.add_argument("--ui", type=int, default=10)
    ap.add_argument("--typographic", type=int, default=8)
    ap.add_argument("--synthetic", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ocr_throughput.txt"))
    args = ap.parse_args()
    files = pick(Path(args.data), {"photo": args.photos, "ui_screenshot": args.ui,
                                   "typographic_instruction": args.typographic}, args.seed)
    weights = os.environ.get("CLIPDEX_WEIGHTS") or None
    spec = ModelSpec(name="ViT-B-32", random_init=not weights, weights=weights)
    with tempfile.TemporaryDirectory() as tmp:
        for i, smp in enumerate(samples(args.synthetic, args.seed, size=(800, 500))):
            smp.image.save(os.path.join(tmp, f"synth{i}.png"))
            files.append(("synthetic", os.path.join(tmp, f"synth{i}.png")))
        n = len(files)
        store = os.path.join(tmp, "t.clipdex")
        t0 = time.perf_counter()
        run_build([p for _, p in files], store, spec, BuildSettings())
        clip_s = time.perf_counter() - t0
        with Store.open(store) as st:
            items = [(st.sha_for_path(p) or "", p) for _, p in files]
            t0 = time.perf_counter()
            single = ocr_images(st, items, workers=1)
            single_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pooled = ocr_store(store, workers=2)
        pool_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = ocr_store(store, workers=2)
        cached_s = time.perf_counter() - t0
    per_cat: dict[str, list[float]] = defaultdict(list)
    text_cat: dict[str, int] = defaultdict(int)
    for (cat, _), (sha, _) in zip(files, items, strict=True):
        per_cat[cat].append(single[sha].seconds)
        text_cat[cat] += single[sha].has_text
    rows = [("CLIP build only (baseline)", clip_s),
            ("OCR, in-process, 1 engine", single_s),
            ("OCR, 2 worker processes (index build --ocr)", pool_s),
            ("CLIP build + OCR in workers", clip_s + pool_s),
            ("OCR again: every image cached by sha256", cached_s)]
    lines = ["# clipdex OCR throughput (index build with and without --ocr)",
             f"# machine: {machine()}; shared with other jobs: compare rows of this run only",
             f"# {n} images: {args.photos} photos, {args.ui} UI screenshots, {args.typographic} "
             f"typographic attacks (shared/data/detect, seed {args.seed}), {args.synthetic} "
             f"synthetic injection screenshots 800x500; CLIP: ViT-B-32 "
             f"{'(random weights)' if not weights else ''}; OCR: {pooled.engine}",
             "", f"{'stage':<46} {'seconds':>8} {'images/s':>9} {'x baseline':>10}",
             *(f"{name:<46} {s:8.1f} {n / s:9.2f} {clip_s / s:10.3f}" for name, s in rows),
             "", f"OCR pass in workers: read {pooled.read}, {pooled.with_text} with text; "
             f"second pass read {again.read} (cached {again.cached})",
             "", "OCR seconds per image (in-process), by kind: text-free photos pay only the "
             "text detector (recognition is skipped when it finds no text)",
             f"{'kind':<26} {'n':>3} {'with text':>9} {'mean s':>7} {'max s':>6}",
             *(f"{cat:<26} {len(v):>3} {text_cat[cat]:>9} {sum(v) / len(v):7.2f} {max(v):6.2f}"
               for cat, v in per_cat.items())]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
