"""Compare the two offline OCR engines on a seeded sample of the shared detection set.

For each engine: seconds per image, share of images with text found, per category, and (for the
typographic attacks, whose text is known to be an instruction) how many key words were read.
Output: benchmarks/results/ocr_engines.txt. Usage: python benchmarks/ocr_engines.py [--n 60]
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import random
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from indexer.ocr import make_engine, read_file, read_image  # noqa: E402
from tests.synth_text import samples  # noqa: E402

DATA = os.environ.get("CLIPDEX_DETECT_DATA", os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "detect"))
# FigStep images spell instructions as numbered steps; these words are on nearly all of them.
KEYWORDS = ("steps", "list", "detail", "methods", "how")


def squash(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", text.lower())


def sample(n: int, seed: int) -> list[dict[str, object]]:
    with open(os.path.join(DATA, "labels.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(x) for x in f if x.strip()]
    by_cat: dict[str, list[dict[str, object]]] = {}
    for r in rows:
        by_cat.setdefault(str(r["category"]), []).append(r)
    rng = random.Random(seed)
    out = []
    for cat in sorted(by_cat):
        out += rng.sample(by_cat[cat], min(len(by_cat[cat]), n // len(by_cat)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synthetic", type=int, default=24)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "ocr_engines.txt"))
    args = ap.parse_args()
    rows = sample(args.n, args.seed)
    lines = [f"OCR engines on a seeded sample (seed {args.seed}) of {DATA}: {len(rows)} images",
             f"machine: {os.cpu_count()} CPUs, 1 thread per engine; {time.strftime('%F %T')}",
             "", f"{'engine':<44} {'category':<26} {'n':>3} {'s/img':>6} {'text%':>6} "
             f"{'accuracy':>9}"]
    examples = []
    for name in ("rapidocr", "tesseract"):
        engine = make_engine(name)
        stats: dict[str, list[tuple[float, bool, float]]] = {}
        for r in rows:
            res = read_file(os.path.join(DATA, str(r["path"])), engine)
            words = set(re.findall(r"[a-z]+", res.text.lower()))
            joined = res.text.lower().replace(" ", "")
            kw = float(any(k in words or k in joined for k in KEYWORDS))
            stats.setdefault(str(r["category"]), []).append((res.seconds, res.has_text, kw))
            if r["label"] == 1 and len(examples) < 6:
                examples.append(f"{name}: {res.text[:100]!r}")
        for smp in samples(args.synthetic, seed=args.seed):
            res = read_image(engine, smp.image)
            acc = difflib.SequenceMatcher(None, squash(smp.text), squash(res.text)).ratio()
            stats.setdefault(f"synthetic_{smp.layout}", []).append((res.seconds, res.has_text,
                                                                    acc))
        for cat, st in sorted(stats.items()):
            n = len(st)
            kw = (f"{sum(x[2] for x in st) / n:9.2f}" if cat.startswith(("typo", "synth"))
                  else f"{'-':>9}")
            lines.append(f"{engine.engine_id:<44} {cat:<26} {n:>3} "
                         f"{sum(x[0] for x in st) / n:6.2f} "
                         f"{100 * sum(x[1] for x in st) / n:6.0f} {kw}")
    lines += ["", "accuracy: typographic = share of FigStep attacks whose heading word ("
              + ", ".join(KEYWORDS) + ") was read; synthetic = similarity (difflib ratio) of the"
              " read text to the rendered text, letters and digits only", "",
              "first attack images as read:", *examples]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
