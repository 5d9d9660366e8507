"""Embedding throughput and memory of `clipdex index build`, against the model alone.

    .venv/bin/python benchmarks/build_throughput.py [--out benchmarks/results/build_throughput.txt]

Corpus: a seeded sample of real images from Debian packages (wallpapers up to 5120x2880,
telescope photos and textures, camera frames, clip art, game sprites), installed with apt-get
when missing (see ../shared/data/README.md). Model: ViT-B-32 with RANDOM weights: fine for
timing; the cosine columns compare precision modes of the same random model, which says how
much a mode perturbs the network's arithmetic, not how it ranks real images.

Every configuration runs in its own subprocess, so its peak RSS is its own (ru_maxrss of the
main process from wait4, plus the peak of the summed RSS of its process tree, decode workers
included, sampled every 50 ms). The machine is shared and noisy: each figure is printed beside
a baseline measured in the same run, and throughput rows are best-of-rounds, interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIPDEX = str(Path(sys.executable).with_name("clipdex"))
TINY_CONFIG = str(ROOT / "tests" / "fixtures" / "clipdex-tiny.json")
PACKAGES = ("openclipart-png stellarium-data visp-images-data plasma-workspace-wallpapers "
            "gnome-backgrounds wesnoth-1.16-data").split()
SOURCES = {  # kind -> folders
    "wallpaper": ["/usr/share/wallpapers", "/usr/share/backgrounds"],
    "photo": ["/usr/share/stellarium", "/usr/share/visp-images-data"],
    "clipart": ["/usr/share/openclipart/png"],
    "sprite": ["/usr/share/games/wesnoth"],
}
SHARES = {"wallpaper": 0.15, "photo": 0.25, "clipart": 0.30, "sprite": 0.30}
EXTS = {".jpg", ".jpeg", ".png", ".webp"}
BATCH = 32  # clipdex's default --batch-size
BAR = 0.999  # a precision mode is offered only at or above this minimum cosine to fp32


# ---- corpus -------------------------------------------------------------------------------------
def ensure_corpus() -> None:
    missing = [d for ds in SOURCES.values() for d in ds if not os.path.isdir(d)]
    if not missing:
        return
    print(f"installing the corpus packages ({', '.join(missing)} missing)...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def pool(kind: str) -> list[str]:
    out = []
    for d in SOURCES[kind]:
        for dirpath, _, files in os.walk(d):
            out += [os.path.join(dirpath, f) for f in files
                    if os.path.splitext(f)[1].lower() in EXTS
                    and not os.path.islink(os.path.join(dirpath, f))]
    return sorted(out)


def sample(n: int, rng: random.Random, shares: dict[str, float], exclude: set[str]
           ) -> list[tuple[str, str]]:
    """(kind, path) pairs, `n` in all, split between kinds by `shares`."""
    picked: list[tuple[str, str]] = []
    kinds = list(shares)
    for i, kind in enumerate(kinds):
        want = n - len(picked) if i == len(kinds) - 1 else round(n * shares[kind])
        files = [p for p in pool(kind) if p not in exclude]
        picked += [(kind, p) for p in rng.sample(files, min(want, len(files)))]
    return picked


def materialise(items: list[tuple[str, str]], folder: Path) -> list[str]:
    """Copy the files under `folder` (symlinks leaving the scanned roots are refused)."""
    out = []
    for i, (kind, src) in enumerate(items):
        dst = folder / kind / f"{i:05d}_{os.path.basename(src)}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        out.append(str(dst))
    return out


# ---- running one configuration -----------------------------------------------------------------
def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `cmd`; return its JSON output with wall seconds and peak RSS (MiB) added."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})
    ps, tree_peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            procs = [ps, *ps.children(recursive=True)]
            tree_peak = max(tree_peak, sum(_rss(p) for p in procs))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    # wait4 already happened inside poll(); the children's rusage covers the waited-for child
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    res = json.loads(out.decode().strip().splitlines()[-1])
    res.update(wall=wall, tree_rss_mib=tree_peak / 2**20)
    return res


def _rss(p) -> int:
    try:
        return p.memory_info().rss
    except Exception:
        return 0


def _pipeline_ips(res: dict) -> float:
    return res["embedded"] / res["seconds"] if res["seconds"] else 0.0


def main_rss_mib(res: dict) -> float:
    return res.get("main_rss_mib", float("nan"))


def build_cmd(root: str, store: str, *extra: str, model: str = "ViT-B-32") -> list[str]:
    cmd = [sys.executable, __file__, "--child", "build", "--", CLIPDEX, "index", "build", root,
           "--store", store, "--random-weights", "--model", model, "--quiet", "--json", *extra]
    if model != "ViT-B-32":
        cmd += ["--model-config", TINY_CONFIG]
    return cmd


# ---- children -----------------------------------------------------------------------------------
def child_build(argv: list[str]) -> None:
    """Run the clipdex command line and report its summary plus its own peak RSS."""
    import resource

    t0 = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    # ru_maxrss of RUSAGE_CHILDREN is the largest single descendant: the main clipdex process
    print(json.dumps({**summary, "build_wall": wall, "main_rss_mib": usage.ru_maxrss / 1024}))


def _embedder(precision: str = "fp32"):
    from indexer.embed import ModelSpec, OpenClipEmbedder

    emb = OpenClipEmbedder(ModelSpec(random_init=True, device="cpu", precision=precision))
    emb.load()
    return emb


def _pixels(emb, paths: list[str], min_side: int | None):
    import numpy as np

    from indexer.decode import DecodeLimits, load_image

    limits = DecodeLimits()
    return np.stack([emb.preprocess(load_image(p, limits, min_side)[0]) for p in paths])


def _batches(n: int) -> list[slice]:
    return [slice(i, min(i + BATCH, n)) for i in range(0, n, BATCH)]


def child_model(paths: list[str]) -> None:
    """(2) the ceiling: encode_image on preprocessed tensors, batch 32, fp32."""
    import resource

    emb = _embedder()
    x = _pixels(emb, paths, 448)
    emb.embed_pixels(x[:4])  # warm-up (first-call allocations)
    t0 = time.perf_counter()
    for sl in _batches(len(x)):
        emb.embed_pixels(x[sl])
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"ips": len(x) / dt, "seconds": dt, "main_rss_mib": rss}))


def child_naive(paths: list[str]) -> None:
    """(1) what earlier tools do: open, preprocess and encode_image one image at a time."""
    import resource

    import open_clip
    import torch
    from PIL import Image

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in paths:
            model.encode_image(preprocess(Image.open(p).convert("RGB")).unsqueeze(0))
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"ips": len(paths) / dt, "seconds": dt, "main_rss_mib": rss}))


def child_precision(paths: list[str]) -> None:
    """Each mode on the same batches, interleaved so that machine noise hits all alike."""
    import numpy as np

    modes = {m: _embedder(m) for m in ("fp32", "bf16", "int8")}
    x = _pixels(modes["fp32"], paths, 448)
    seconds = dict.fromkeys(modes, 0.0)
    outs: dict[str, list] = {m: [] for m in modes}
    for emb in modes.values():
        emb.embed_pixels(x[:4])
    for sl in _batches(len(x)):
        for m, emb in modes.items():
            t0 = time.perf_counter()
            outs[m].append(emb.embed_pixels(x[sl]))
            seconds[m] += time.perf_counter() - t0
    ref = _unit(np.concatenate(outs["fp32"]))
    res = {}
    for m in modes:
        cos = (ref * _unit(np.concatenate(outs[m]))).sum(1)
        res[m] = {"ips": len(x) / seconds[m], "min_cos": float(cos.min()),
                  "mean_cos": float(cos.mean())}
    print(json.dumps(res))


def child_draft(paths: list[str]) -> None:
    """Decode cost per large JPEG with and without draft, and what it does to the embedding."""
    import numpy as np

    from indexer.decode import DecodeLimits, decode_bytes

    emb = _embedder()
    limits = DecodeLimits()
    datas = [Path(p).read_bytes() for p in paths]
    res: dict = {}
    for label, min_side in (("full", None), ("draft", 2 * emb.input_side)):
        t_dec = t_pre = 0.0
        pixels = []
        for data in datas:
            t0 = time.perf_counter()
            img, _ = decode_bytes(data, limits, min_side)
            t1 = time.perf_counter()
            pixels.append(emb.preprocess(img))
            t_pre += time.perf_counter() - t1
            t_dec += t1 - t0
        vecs = np.concatenate([emb.embed_pixels(np.stack(pixels[s]))
                               for s in _batches(len(pixels))])
        res[label] = {"decode_ms": 1000 * t_dec / len(datas),
                      "preprocess_ms": 1000 * t_pre / len(datas), "vecs": _unit(vecs)}
    cos = (res["full"].pop("vecs") * res["draft"].pop("vecs")).sum(1)
    res["min_cos"], res["mean_cos"], res["n"] = float(cos.min()), float(cos.mean()), len(paths)
    print(json.dumps(res))


def _unit(v):
    import numpy as np

    return v / np.linalg.norm(v, axis=1, keepdims=True)


CHILDREN: dict[str, Callable[[list[str]], None]] = {
    "model": child_model, "naive": child_naive, "precision": child_precision,
    "draft": child_draft,
}


def child_cmd(kind: str, list_file: str) -> list[str]:
    return [sys.executable, __file__, "--child", kind, "--list", list_file]


# ---- report -------------------------------------------------------------------------------------
class Report:
    def __init__(self, out: str | None) -> None:
        self.lines: list[str] = []
        self.out = out

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def table(self, head: list[str], rows: list[list[object]]) -> None:
        cells = [head, *[[_fmt(c) for c in r] for r in rows]]
        widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
        for j, r in enumerate(cells):
            self(" | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                            for i, (c, w) in enumerate(zip(r, widths, strict=True))))
            if j == 0:
                self("-+-".join("-" * w for w in widths))
        self()

    def save(self) -> None:
        if self.out:
            Path(self.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out).write_text("\n".join(self.lines) + "\n")


def _fmt(c: object) -> str:
    return f"{c:.2f}" if isinstance(c, float) else str(c)


def header(say: Report, args: argparse.Namespace) -> None:
    import open_clip
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo")
                  if ln.startswith("flags")), [])
    isa = [f for f in flags if f.startswith(("avx512f", "avx512_bf16", "avx512_vnni", "amx"))]
    say("# clipdex build throughput (benchmarks/build_throughput.py)")
    say(f"CPU: {cpu}, {os.cpu_count()} cores; ISA: {' '.join(isa) or 'no AVX-512'}"
        f"{'' if any(f.startswith('amx') for f in flags) else ' (no AMX)'}")
    say(f"python {platform.python_version()}, torch {torch.__version__} "
        f"(threads {torch.get_num_threads()}), open_clip {open_clip.__version__}")
    say("model: ViT-B-32 with RANDOM weights (timing only), batch 32, clipdex defaults unless "
        "stated")
    say(f"load average at start: {os.getloadavg()[0]:.1f} (shared machine: compare ratios)")
    say(f"seed {args.seed}; throughput rows are best of {args.rounds} interleaved rounds; "
        f"args: {' '.join(sys.argv[1:]) or '(defaults)'}")
    say()


# ---- sections -----------------------------------------------------------------------------------
def section_draft(say: Report, work: Path, rng: random.Random, n: int) -> None:
    from PIL import Image

    big = []
    for kind in ("wallpaper", "photo", "sprite"):
        for p in pool(kind):
            if p.lower().endswith((".jpg", ".jpeg")):
                with Image.open(p) as im:
                    if min(im.size) >= 4 * 224:  # draft can halve it at least once
                        big.append(p)
    big = rng.sample(big, min(n, len(big)))
    lst = work / "draft.txt"
    lst.write_text("\n".join(big))
    r = measure(child_cmd("draft", str(lst)))
    f, d = r["full"], r["draft"]
    say(f"## Large-JPEG decode with and without draft ({r['n']} JPEGs, short side >= 896 px)")
    say("draft = Pillow JPEG DCT scaling to >= 2 x 224 px on the short side (decode_bytes "
        "min_side=448, BuildSettings.draft_factor=2.0)")
    say.table(["decode", "decode ms/img", "preprocess ms/img", "total ms/img", "x full"], [
        ["full size (baseline)", f["decode_ms"], f["preprocess_ms"],
         f["decode_ms"] + f["preprocess_ms"], 1.0],
        ["draft", d["decode_ms"], d["preprocess_ms"], d["decode_ms"] + d["preprocess_ms"],
         (d["decode_ms"] + d["preprocess_ms"]) / (f["decode_ms"] + f["preprocess_ms"])],
    ])
    say(f"cosine(draft embedding, full-decode embedding) over these JPEGs: min "
        f"{r['min_cos']:.5f}, mean {r['mean_cos']:.5f}")
    say()


def section_main(say: Report, work: Path, paths: list[str], root: str, args) -> dict:
    lst = work / "main.txt"
    lst.write_text("\n".join(paths))
    naive_lst = work / "naive.txt"
    naive_lst.write_text("\n".join(paths[:: max(1, len(paths) // args.naive)][: args.naive]))
    runs: dict[str, list[dict]] = {"model": [], "build": [], "naive": []}
    for rnd in range(args.rounds):
        runs["model"].append(measure(child_cmd("model", str(lst))))
        store = str(work / f"main-{rnd}.clipdex")
        b = measure(build_cmd(root, store))
        b["ips"], b["store"] = b["embedded"] / b["wall"], store
        runs["build"].append(b)
        if rnd == 0:
            runs["naive"].append(measure(child_cmd("naive", str(naive_lst))))
    best = {k: max(v, key=lambda r: r["ips"]) for k, v in runs.items()}
    m, b, n = best["model"], best["build"], best["naive"]
    say(f"## Throughput: {len(paths)} images ({args.naive} for the naive loop), ViT-B-32 fp32")
    say("(3) images/s = embedded / wall time of the whole `clipdex index build` process "
        "(python start, model load, scan, decode, embed, store, FAISS publish);")
    say("    'pipeline' = the build's own images/s (from scan to last commit, model load "
        "excluded)")
    say.table(["configuration", "images/s", "x (2) model", "x (1) naive", "peak RSS main MiB",
               "peak RSS tree MiB"], [
        ["(1) naive loop, 1 image at a time", n["ips"], n["ips"] / m["ips"], 1.0,
         main_rss_mib(n), n["tree_rss_mib"]],
        ["(2) model alone, batch 32 (ceiling)", m["ips"], 1.0, m["ips"] / n["ips"],
         main_rss_mib(m), m["tree_rss_mib"]],
        ["(3) clipdex index build, end to end", b["ips"], b["ips"] / m["ips"],
         b["ips"] / n["ips"], main_rss_mib(b), b["tree_rss_mib"]],
        ["(3) clipdex index build, pipeline", _pipeline_ips(b),
         _pipeline_ips(b) / m["ips"], _pipeline_ips(b) / n["ips"], "", ""],
    ])
    say("rounds (images/s): " + "; ".join(
        f"{k} " + ", ".join(f"{r['ips']:.2f}" for r in v) for k, v in runs.items()))
    say(f"build summary: embedded {b['embedded']}, failed {sum(b['failed'].values())} "
        f"{b['failed'] or ''}, wall {b['wall']:.1f}s")
    say()
    return b


def section_precision(say: Report, work: Path, paths: list[str]) -> None:
    lst = work / "precision.txt"
    lst.write_text("\n".join(paths))
    r = measure(child_cmd("precision", str(lst)))
    say(f"## Precision modes: {len(paths)} corpus images, batch 32, interleaved per batch")
    rows = []
    for mode in ("fp32", "bf16", "int8"):
        v = r[mode]
        offered = "yes" if v["min_cos"] >= BAR else "NO (below bar)"
        rows.append([mode, v["ips"], v["ips"] / r["fp32"]["ips"], f"{v['min_cos']:.5f}",
                     f"{v['mean_cos']:.5f}", offered])
    say.table(["precision", "images/s", "x fp32", "min cos to fp32", "mean cos",
               f"offered (min cos >= {BAR})"], rows)
    say("random weights: re-check the bar with the real weights before relying on a mode")
    say()


def section_tuning(say: Report, work: Path, root: str, n: int) -> None:
    configs = [("workers 1, torch threads 2 (default)", [], {}),
               ("workers 2, torch threads 2", ["--workers", "2"], {}),
               ("workers 1, torch threads 1", [], {"OMP_NUM_THREADS": "1"}),
               ("workers 2, torch threads 1", ["--workers", "2"], {"OMP_NUM_THREADS": "1"}),
               ("workers 1, torch threads 2, batch 64", ["--batch-size", "64"], {})]
    rows, base = [], None
    for i, (label, extra, env) in enumerate(configs):
        r = measure(build_cmd(root, str(work / f"tune-{i}.clipdex"), *extra), env)
        ips = r["embedded"] / r["wall"]
        base = base or ips
        rows.append([label, ips, ips / base, _pipeline_ips(r), r["tree_rss_mib"]])
    say(f"## Defaults: worker processes x torch intra-op threads ({n} images, end to end)")
    say("OMP_NUM_THREADS sets torch's thread count (in the decode workers too)")
    say.table(["configuration", "images/s", "x default", "pipeline images/s",
               "peak RSS tree MiB"], rows)


def section_incremental(say: Report, first: dict, root: str, extra: list[tuple[str, str]]
                        ) -> None:
    store = first["store"]
    again = measure(build_cmd(root, store))
    materialise(extra, Path(root) / "added")
    more = measure(build_cmd(root, store))
    say("## Incremental work (same store as the best (3) run)")
    say.table(["run", "wall s", "x first build", "embedded", "unchanged"], [
        ["first build (baseline)", first["wall"], 1.0, first["embedded"], first["unchanged"]],
        ["re-run, nothing changed", again["wall"], again["wall"] / first["wall"],
         again["embedded"], again["unchanged"]],
        [f"re-run, {len(extra)} new images (+1%)", more["wall"], more["wall"] / first["wall"],
         more["embedded"], more["unchanged"]],
    ])
    fixed = again["wall"]
    say(f"+1% beyond the unchanged re-run's fixed cost: {more['wall'] - fixed:.1f}s = "
        f"{(more['wall'] - fixed) / first['wall']:.1%} of the first build")
    say()


def section_rss(say: Report, work: Path, rng: random.Random, sizes: list[int]) -> None:
    items = sample(max(sizes), rng, {"clipart": 0.3, "sprite": 0.7}, set())
    rows, base = [], None
    for n in sizes:
        root = work / f"rss-{n}"
        materialise(items[:n], root)
        r = measure(build_cmd(str(root), str(work / f"rss-{n}.clipdex"),
                              model="clipdex-tiny"))
        base = base or r
        rows.append([n, r["embedded"], r["embedded"] / r["wall"], main_rss_mib(r),
                     main_rss_mib(r) / main_rss_mib(base), r["tree_rss_mib"],
                     r["tree_rss_mib"] / base["tree_rss_mib"]])
        shutil.rmtree(root)
    say("## Peak RSS against collection size (clip art + sprites, tiny open_clip model "
        "tests/fixtures/clipdex-tiny.json,")
    say("   so that the pipeline's own memory is not hidden under ViT-B-32's ~600 MiB)")
    say.table(["images", "embedded", "images/s", "peak RSS main MiB", "x smallest",
               "peak RSS tree MiB", "x smallest"], rows)


def guarded(say: Report, fn: Callable[..., object], *args: object) -> object:
    """One failing section is reported, and the others still run."""
    try:
        return fn(*args)
    except Exception as err:
        say(f"!! {fn.__name__} failed: {type(err).__name__}: {str(err)[-1500:]}")
        say()
        return None


def run(args: argparse.Namespace) -> None:
    ensure_corpus()
    say = Report(args.out)
    header(say, args)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="clipdex-bench-") as tmp:
        work = Path(tmp)
        items = sample(args.n, rng, SHARES, set())
        root = str(work / "corpus")
        paths = materialise(items, Path(root))
        kinds = {k: sum(1 for kk, _ in items if kk == k) for k in SHARES}
        say(f"corpus sample: {len(paths)} files: " + ", ".join(f"{k} {v}" for k, v in
                                                               kinds.items()))
        say()
        guarded(say, section_draft, say, work, rng, args.draft_n)
        guarded(say, section_precision, say, work,
                paths[:: max(1, len(paths) // args.precision_n)][: args.precision_n])
        tune_root = work / "tune"
        materialise(items[:: max(1, len(items) // args.tune_n)][: args.tune_n], tune_root)
        guarded(say, section_tuning, say, work, str(tune_root), args.tune_n)
        first = guarded(say, section_main, say, work, paths, root, args)
        extra = sample(max(1, len(paths) // 100), rng, SHARES, {p for _, p in items})
        if first:
            guarded(say, section_incremental, say, first, root, extra)
        guarded(say, section_rss, say, work, rng, args.rss_sizes)
    say(f"load average at end: {os.getloadavg()[0]:.1f}")
    say.save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                         "build_throughput.txt"))
    ap.add_argument("--n", type=int, default=300, help="images for (2), (3) and incremental")
    ap.add_argument("--naive", type=int, default=80, help="images for the naive loop (1)")
    ap.add_argument("--precision-n", type=int, default=128)
    ap.add_argument("--draft-n", type=int, default=24, help="large JPEGs for the draft check")
    ap.add_argument("--tune-n", type=int, default=96)
    ap.add_argument("--rss-sizes", type=int, nargs="+", default=[2000, 10000])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--list", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.child == "build":
        child_build(rest[1:] if rest and rest[0] == "--" else rest)
    elif args.child:
        CHILDREN[args.child](Path(args.list).read_text().split("\n"))
    else:
        run(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
