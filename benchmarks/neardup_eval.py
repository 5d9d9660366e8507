"""Near-duplicate precision/recall per threshold on ../shared/data/neardup.

    python benchmarks/neardup_eval.py [--data DIR] [--random-weights] [--out FILE]

Indexes the ground-truth images with the real pipeline (ViT-B-32 by default; weights from
CLIPDEX_WEIGHTS or the open_clip cache, or --random-weights), then, for every anchor, counts
its edited copies (positives) and its `distractor` / `similar_not_dup` images (negatives) at or
above each threshold. Also reports, per anchor, whether every copy ranks above every negative.
The header names the weights: with random weights the figures say nothing about the model.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from _report import publish

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from indexer.build import BuildSettings  # noqa: E402
from indexer.embed import ModelSpec  # noqa: E402
from indexer.store import Store  # noqa: E402
from search.app import run_build  # noqa: E402

POSITIVE = {"near_dup", "near_dup_or_hard", "exif_orientation_dup", "format_dup", "rot_flip_dup"}
NEGATIVE = {"distractor", "similar_not_dup"}
THRESHOLDS = [0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98]


def load_truth(data: Path) -> list[dict[str, str]]:
    with open(data / "groundtruth.csv", newline="") as f:
        return [dict(r, path=str((data / r["path"]).resolve())) for r in csv.DictReader(f)]


def vectors_by_path(store_path: str) -> dict[str, np.ndarray]:
    out = {}
    with Store.open(store_path) as st:
        for img in st.iter_images():
            vec = st.vector(img.id)
            for p in img.paths:
                out[p] = vec
    return out


def evaluate(rows: list[dict[str, str]], vecs: dict[str, np.ndarray]) -> tuple[list, dict]:
    anchors = [r for r in rows if r["role"] == "anchor" and r["path"] in vecs]
    negatives = [r for r in rows if r["role"] in NEGATIVE and r["path"] in vecs]
    pos_sims, neg_sims, role_sims = [], [], defaultdict(list)
    clean_rank = 0
    for a in anchors:
        av = vecs[a["path"]]
        pos = [(r["role"], float(av @ vecs[r["path"]])) for r in rows
               if r["group"] == a["group"] and r["role"] in POSITIVE and r["path"] in vecs]
        neg = [float(av @ vecs[r["path"]]) for r in negatives
               if r["group"] == a["group"] or r["role"] == "distractor"]
        for role, s in pos:
            role_sims[role].append(s)
        pos_sims += [s for _, s in pos]
        neg_sims += neg
        clean_rank += bool(pos) and min(s for _, s in pos) > max(neg, default=-1)
    table = []
    for t in THRESHOLDS:
        tp = sum(s >= t for s in pos_sims)
        fp = sum(s >= t for s in neg_sims)
        prec = tp / (tp + fp) if tp + fp else 1.0
        rec = tp / len(pos_sims) if pos_sims else 0.0
        by_role = {r: np.mean([s >= t for s in v]) for r, v in sorted(role_sims.items())}
        table.append((t, prec, rec, fp, by_role))
    return table, {"anchors": len(anchors), "positives": len(pos_sims),
                   "negative_pairs": len(neg_sims), "anchors_ranked_clean": clean_rank}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "neardup"))
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "neardup_eval.txt"))
    args = ap.parse_args()
    data = Path(args.data)
    rows = load_truth(data)
    spec = ModelSpec(name=args.model, random_init=args.random_weights,
                     weights=os.environ.get("CLIPDEX_WEIGHTS") or None)
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "neardup.clipdex")
        result = run_build([str(data / "images")], store, spec, BuildSettings())
        with Store.open(store) as st:
            ident = st.identity()
            fails = list(st.iter_failures())
        vecs = vectors_by_path(store)
    table, counts = evaluate(rows, vecs)
    lines = [
        "# clipdex near-duplicate evaluation on shared/data/neardup",
        f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}",
        f"# model: {ident.name} / {ident.pretrained}  weights: {ident.weights_sha256}"
        + ("  (RANDOM WEIGHTS: figures say nothing about the real model)"
           if ident.random_init else ""),
        f"# images embedded {result.summary.embedded}, failed {len(fails)} "
        + ", ".join(f"{os.path.basename(p)}={r['reason']}" for p, r in fails),
        f"# anchors {counts['anchors']}, positive pairs {counts['positives']}, negative pairs "
        f"{counts['negative_pairs']}; anchors whose every copy outranks every negative: "
        f"{counts['anchors_ranked_clean']}/{counts['anchors']}",
        "",
        "threshold  precision  recall  false_pos  " + "  ".join(
            f"recall[{r}]" for r in table[0][4]),
    ]
    for t, prec, rec, fp, by_role in table:
        lines.append(f"{t:9.2f}  {prec:9.3f}  {rec:6.3f}  {fp:9d}  " + "  ".join(
            f"{v:>{len(r) + 8}.2f}" for r, v in by_role.items()))
    publish(lines, args.out)


if __name__ == "__main__":
    main()
