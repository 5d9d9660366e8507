"""`make demo`: index a generated sample collection and search it, as a new user would.

Uses the real default model (ViT-B-32, laion2b_s34b_b79k). Weights come from CLIPDEX_WEIGHTS or
open_clip's cache; when neither is available (an offline machine) the demo says so and runs on
RANDOM weights in a separate store, so that every step still runs (results are then meaningless).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-out"
CLIPDEX = str(Path(sys.executable).with_name("clipdex"))


def scene(rng: np.random.Generator, size: tuple[int, int] = (640, 480)) -> Image.Image:
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, size[0] - 40)), int(rng.integers(0, size[1] - 40))
        x1, y1 = x0 + int(rng.integers(30, size[0] // 2)), y0 + int(rng.integers(30, size[1] // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x0, y0, x1, y1], fill=colour)
    return img.filter(ImageFilter.GaussianBlur(1))


def make_sample(folder: Path) -> Path:
    """40 scenes, the two photos scikit-learn ships, near-copies of some, and a corrupt file."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    (folder / "scenes").mkdir(parents=True)
    (folder / "copies").mkdir()
    for i in range(40):
        scene(rng).save(folder / "scenes" / f"scene{i:02d}.png")
    for name, arr in zip(("china", "flower"), load_sample_images().images, strict=True):
        Image.fromarray(arr).save(folder / f"{name}.jpg", quality=95)
    for i in (3, 17):  # an edited re-upload: smaller, lossy, slightly cropped
        img = Image.open(folder / "scenes" / f"scene{i:02d}.png")
        img.crop((8, 8, 632, 472)).resize((480, 357)).save(
            folder / "copies" / f"scene{i:02d}-reupload.jpg", quality=70)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    query = OUT / "query-china-small.jpg"
    buf = io.BytesIO()
    Image.open(folder / "china.jpg").resize((320, 214)).save(buf, "JPEG", quality=60)
    query.write_bytes(buf.getvalue())
    return query


def clipdex(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    print(f"\n$ clipdex {' '.join(args)}", flush=True)
    proc = subprocess.run([CLIPDEX, *args], text=True)
    if check and proc.returncode != 0:
        sys.exit(proc.returncode)
    return proc


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    images = OUT / "images"
    query = make_sample(images)
    store = str(OUT / "demo.clipdex")
    build = ["index", "build", str(images), "--store", store]
    if clipdex(*build, "--quiet", check=False).returncode != 0:
        print("\n*** No model weights here (see the message above). Running the rest of the demo"
              " on RANDOM weights so every step runs; the scores are NOT meaningful. ***\n"
              "*** Set CLIPDEX_WEIGHTS=/path/to/open_clip_model.safetensors for real results.")
        store = str(OUT / "demo-random.clipdex")
        clipdex("index", "build", str(images), "--store", store, "--random-weights", "--quiet")
    clipdex("search", str(query), "--k", "5", "--store", store)
    clipdex("search", "--text", "a temple in the mountains", "--k", "3", "--store", store)
    clipdex("dedup", "--store", store)
    clipdex("index", "failures", "--store", store)
    clipdex("index", "verify", "--store", store)
    clipdex("index", "info", "--store", store)


if __name__ == "__main__":
    main()
