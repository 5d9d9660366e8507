"""Malicious-image detection on ../shared/data/detect: LR, kNN and hybrid, side by side.

    python benchmarks/detect_eval.py [--data DIR] [--random-weights] [--test 0.2] [--seed 0]
                                     [--target-fpr 0.01] [--out FILE]

Embeds every image once with the real pipeline (ViT-B-32; weights from CLIPDEX_WEIGHTS or the
open_clip cache, or --random-weights), splits the labelled images by identity (sha256 of the
bytes, seeded, per category) into train and test, labels only the train part, trains the
detector (which holds out --holdout of train for calibration), and evaluates on the test part:
first at the default thresholds, then calibrated for --target-fpr on the holdout. No image is
in both train and test. The header names the weights: with random weights the figures say
nothing about the real model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _report import publish

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from indexer.build import BuildSettings  # noqa: E402
from indexer.embed import ModelSpec, sha256_file  # noqa: E402
from indexer.store import Store  # noqa: E402
from search.app import run_build  # noqa: E402
from search.detect import DetectSettings  # noqa: E402
from search.detect_app import EvalResult, eval_detector, import_labels, train_detector  # noqa: E402
from search.metrics import format_report, split_by_identity  # noqa: E402


def split_files(data: Path, fraction: float, seed: int, tmp: str) -> tuple[str, str, int, int]:
    """Write train.jsonl / test.jsonl (absolute paths), split by sha256 within each category."""
    rows = [json.loads(x) for x in (data / "labels.jsonl").read_text().splitlines() if x.strip()]
    for r in rows:
        r["path"] = str((data / r["path"]).resolve())
    shas = [sha256_file(r["path"]) for r in rows]
    test = split_by_identity(shas, [f"{r['label']}/{r['category']}" for r in rows], fraction,
                             seed)
    paths = []
    for name, keep in (("train", ~test), ("test", test)):
        path = os.path.join(tmp, f"{name}.jsonl")
        Path(path).write_text("".join(json.dumps(r) + "\n" for r, k in zip(rows, keep, strict=True)
                                       if k))
        paths.append(path)
    return paths[0], paths[1], int((~test).sum()), int(test.sum())


def machine() -> str:
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")),
                       cpu)
    except OSError:
        pass
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores usable, python "
            f"{platform.python_version()}, {platform.system()} {platform.release()}")


def section(title: str, res: EvalResult) -> list[str]:
    s = res.settings
    lines = [f"## {title}", f"# thresholds: lr {s.lr_threshold:.4f}, knn {s.knn_threshold:.4f}, "
             f"hybrid {s.threshold:.4f}; k {s.k}, lr_weight {s.lr_weight}, near_copy "
             f"{s.near_copy}; test images not embeddable {len(res.failed)}, in training set "
             f"{res.overlap}"]
    return lines + (format_report(res.report) if res.report else ["(nothing scored)"]) + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "detect"))
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--test", type=float, default=0.2, help="share of images for testing")
    ap.add_argument("--holdout", type=float, default=0.2, help="share of train for calibration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-fpr", type=float, default=0.01)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "detect_eval.txt"))
    args = ap.parse_args()
    data = Path(args.data)
    weights = os.environ.get("CLIPDEX_WEIGHTS") or None
    spec = ModelSpec(name=args.model, random_init=args.random_weights and not weights,
                     weights=weights)
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "detect.clipdex")
        t0 = time.perf_counter()
        built = run_build([str(data)], store, spec, BuildSettings())
        embed_s = time.perf_counter() - t0
        train, test, n_train, n_test = split_files(data, args.test, args.seed, tmp)
        import_labels(store, train, spec, BuildSettings())
        t1 = time.perf_counter()
        trained = train_detector(store, DetectSettings(), args.holdout, args.seed)
        train_s = time.perf_counter() - t1
        default = eval_detector(store, test)
        calibrated = eval_detector(store, test, calibrate=True, target_fpr=args.target_fpr)
        with Store.open(store) as st:
            ident = st.identity()
    s = built.summary
    lines = [
        "# clipdex detection evaluation on shared/data/detect (LR vs kNN vs hybrid)",
        f"# machine: {machine()}",
        f"# model: {ident.name} / {ident.pretrained}  weights: {ident.weights_sha256}"
        + ("  (RANDOM WEIGHTS: figures say nothing about real accuracy)"
           if ident.random_init else ""),
        f"# embedded {s.embedded} images in {embed_s:.0f}s ({s.images_per_second:.1f} img/s), "
        f"failed {sum(s.failed.values())}; split by sha256 per category, seed {args.seed}: "
        f"train {n_train} (of which held out for calibration {trained.counts['validation']}), "
        f"test {n_test}; training took {train_s:.1f}s",
        f"# trained on {json.dumps(trained.counts['train'])}",
        "",
        *section("default thresholds", default),
        *section(f"calibrated for FPR <= {args.target_fpr} on the training holdout", calibrated),
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
