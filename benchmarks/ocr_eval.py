"""The OCR text channel against the CLIP channels, per category, on a seeded sample of
../shared/data/detect plus seeded synthetic injection screenshots (tests/synth_text.py) drawn on
the shared set's photos, with benign-text controls on the same backgrounds.

    python benchmarks/ocr_eval.py [--per-category 60] [--synthetic 80] [--seed 0]

Embeds (ViT-B-32; CLIPDEX_WEIGHTS or random weights) and OCRs (rapidocr, 2 workers) every
sampled image once, splits by sha256 per category (seeded) into train/test, trains every
channel on train (holding out 20% for calibration) and reports LR, kNN, the CLIP hybrid, text
alone and the combination side by side on test, at default thresholds and calibrated, for the
"max" and "mean" text rules. Output: benchmarks/results/ocr_eval.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from _report import publish

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from benchmarks.detect_eval import machine, split_files  # noqa: E402
from indexer.build import BuildSettings  # noqa: E402
from indexer.embed import ModelSpec  # noqa: E402
from indexer.store import Store  # noqa: E402
from search.app import run_build  # noqa: E402
from search.detect import DetectSettings  # noqa: E402
from search.detect_app import EvalResult, eval_detector, import_labels, train_detector  # noqa: E402
from search.metrics import format_report  # noqa: E402
from search.ocr_app import ocr_store  # noqa: E402
from tests.synth_text import samples  # noqa: E402


def build_sample(data: Path, per_cat: int, n_synth: int, seed: int, out: Path) -> Path:
    """labels.jsonl in `out` with absolute paths: a per-category sample + synthetic images."""
    rows = [json.loads(x) for x in (data / "labels.jsonl").read_text().splitlines() if x.strip()]
    rng = random.Random(seed)
    by_cat: dict[str, list[dict[str, object]]] = {}
    for r in rows:
        by_cat.setdefault(str(r["category"]), []).append(r)
    picked = []
    for cat in sorted(by_cat):
        for r in rng.sample(by_cat[cat], min(per_cat, len(by_cat[cat]))):
            picked.append({**r, "path": str((data / str(r["path"])).resolve())})
    photos = [Image.open(data / str(r["path"])) for r in by_cat.get("photo", [])[:40]]
    (out / "synth").mkdir(parents=True, exist_ok=True)
    for i, smp in enumerate(samples(n_synth, seed, photos, size=(640, 420))):
        path = out / "synth" / f"{i:04d}.png"
        smp.image.save(path)
        picked.append({"path": str(path), "label": smp.label,
                       "category": f"synth_{smp.category}"})
    labels = out / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in picked))
    return labels


def section(title: str, res: EvalResult) -> list[str]:
    s = res.settings
    head = (f"## {title}\n# thresholds: lr {s.lr_threshold:.4f}, knn {s.knn_threshold:.4f}, "
            f"clip+hybrid {s.threshold:.4f}, text {s.text_threshold:.4f}; text_rule "
            f"{s.text_rule} (weight {s.text_weight}); near_copy {s.near_copy}")
    return [head, *(format_report(res.report) if res.report else ["(nothing scored)"]), ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "detect"))
    ap.add_argument("--per-category", type=int, default=60)
    ap.add_argument("--synthetic", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-fpr", type=float, default=0.01)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ocr_eval.txt"))
    ap.add_argument("--workdir", help="keep the store here (a re-run reuses its vectors and OCR)")
    args = ap.parse_args()
    weights = os.environ.get("CLIPDEX_WEIGHTS") or None
    spec = ModelSpec(name="ViT-B-32", random_init=not weights, weights=weights)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.workdir or scratch
        os.makedirs(tmp, exist_ok=True)
        labels = build_sample(Path(args.data), args.per_category, args.synthetic, args.seed,
                              Path(tmp))
        store = os.path.join(tmp, "ocr.clipdex")
        t0 = time.perf_counter()
        paths = [json.loads(x)["path"] for x in labels.read_text().splitlines()]
        built = run_build(paths, store, spec, BuildSettings())
        t1 = time.perf_counter()
        ocr = ocr_store(store, workers=2)
        t2 = time.perf_counter()
        train, test, n_train, n_test = split_files(Path(tmp), 0.3, args.seed, tmp)
        import_labels(store, train, spec, BuildSettings())
        sections = []
        for rule in ("max", "mean"):
            trained = train_detector(store, DetectSettings(text_rule=rule), 0.2, args.seed)
            sections += section(f"text_rule {rule}, default thresholds", eval_detector(store, test))
            sections += section(f"text_rule {rule}, calibrated for FPR <= {args.target_fpr} on "
                                "the training holdout",
                                eval_detector(store, test, True, args.target_fpr))
        with Store.open(store) as st:
            ident = st.identity()
    lines = [
        "# clipdex OCR text channel vs CLIP channels (shared/data/detect sample + synthetic)",
        f"# machine: {machine()} (shared and busy: timings are indicative)",
        f"# model: {ident.name}  weights: {ident.weights_sha256}"
        + ("  (RANDOM WEIGHTS: the CLIP columns say nothing about the real model)"
           if ident.random_init else ""),
        f"# {built.summary.embedded} images embedded in {t1 - t0:.0f}s; OCR ({ocr.engine}, 2 "
        f"workers) {ocr.read} images in {t2 - t1:.0f}s, {ocr.with_text} with text, "
        f"{ocr.failed} unreadable",
        f"# sample: {args.per_category} per shared category + {args.synthetic} synthetic "
        f"(seed {args.seed}); split by sha256 per category: train {n_train}, test {n_test}",
        f"# text channel trained on {json.dumps(trained.text.counts if trained.text else None)}",
        "# columns: lr / knn = CLIP channels alone, clip = their hybrid (previous detector),"
        " text = OCR text classifier alone (no text = not flagged), hybrid = all combined",
        "",
        *sections,
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
