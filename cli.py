"""The `clipdex` command. It only translates: options in, one library call, output out."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any, TypeVar

import typer

from indexer.errors import ClipdexError

app = typer.Typer(help="Find near-duplicate and similar images, and flag malicious ones.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
index_app = typer.Typer(help="Build, inspect and check a store's index.", no_args_is_help=True)
app.add_typer(index_app, name="index")

log = logging.getLogger("clipdex")
T = TypeVar("T")

StoreOpt = Annotated[str, typer.Option("--store", "-s", envvar="CLIPDEX_STORE",
                                       help="Store directory [default: $CLIPDEX_STORE or "
                                            "~/.local/share/clipdex/default.clipdex]")]
WeightsOpt = Annotated[str | None, typer.Option(
    "--weights", envvar="CLIPDEX_WEIGHTS", help="Local open_clip checkpoint (.safetensors/.pt)")]
ModelConfigOpt = Annotated[str | None, typer.Option(
    "--model-config", envvar="CLIPDEX_MODEL_CONFIG",
    help="An open_clip model config JSON, registered under its file name")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda")]
OcrEngineOpt = Annotated[str, typer.Option(
    "--ocr-engine", help="rapidocr (PP-OCRv4, default) or tesseract")]


def _store(path: str | None) -> str:
    from search.app import default_store_path

    return path or default_store_path()


def _fail(err: Exception, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _read_store(store: str, read: Callable[[Any], T]) -> T:
    """`read` on the store opened read-only; a ClipdexError becomes one clear error line."""
    from indexer.store import Store

    try:
        with Store.open(_store(store)) as st:
            return read(st)
    except ClipdexError as err:
        raise _fail(err) from err


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


# ---- index -------------------------------------------------------------------------------------
@index_app.command("build")
def index_build(
    roots: Annotated[list[str] | None, typer.Argument(help="Image folders or files")] = None,
    store: StoreOpt = "",
    model: Annotated[str, typer.Option(help="open_clip model name")] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option(help="open_clip pretrained tag")] = "laion2b_s34b_b79k",
    weights: WeightsOpt = None,
    random_weights: Annotated[bool, typer.Option(
        "--random-weights", help="Random model weights (tests/benchmarks only; recorded)")] = False,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
    precision: Annotated[str, typer.Option(
        help="fp32, int8 (cpu), bf16, fp16 (cuda); recorded in the store")] = "fp32",
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    workers: Annotated[int | None, typer.Option(min=1, help="Decode processes")] = None,
    worker_nice: Annotated[int, typer.Option(
        min=0, max=19, help="Decode workers run this much nicer than the model")] = 10,
    min_batch: Annotated[int, typer.Option(
        min=0, help="Embed a partial batch of this many when decoding lags "
        "(0: batch size / 4)")] = 0,
    index_type: Annotated[str | None, typer.Option(
        help="FAISS factory string, e.g. Flat, IVF4096,Flat, HNSW32")] = None,
    prune: Annotated[bool, typer.Option(help="Forget files that vanished from the roots")] = False,
    retry_failed: Annotated[bool, typer.Option(help="Retry quarantined, unchanged files")] = False,
    allow_format: Annotated[list[str], typer.Option(
        help="Also accept this Pillow format (e.g. TIFF); riskier decoders")] = [],  # noqa: B006
    max_bytes: Annotated[int, typer.Option(help="Files larger than this are refused")] = 100 << 20,
    wait: Annotated[float, typer.Option(help="Seconds to wait for another writer")] = 0.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON")] = False,
    from_dir: Annotated[str | None, typer.Option(
        "--from", help="Build from `clipdex embed` shards (merged with `ingest merge`)")] = None,
    ondisk: Annotated[str | None, typer.Option(
        help="With --from: merge an IVF index on disk in this folder")] = None,
    ocr: Annotated[bool, typer.Option(
        "--ocr", help="Also read the text in every stored image (OCR; ~1 s an image)")] = False,
    ocr_engine: OcrEngineOpt = "rapidocr",
) -> None:
    """Embed every image under ROOTS into the store and publish its FAISS index."""
    if from_dir or ondisk:
        return _index_build_from(from_dir, ondisk, _store(store), index_type, json_out)
    if not roots:
        raise typer.BadParameter("give image folders or files (or --from SHARDS --ondisk DIR)")
    missing = [r for r in roots if not os.path.exists(r)]
    if missing:
        raise typer.BadParameter(f"no such file or folder: {', '.join(missing)}")
    from indexer.build import BuildSettings
    from indexer.decode import ALLOWED_FORMATS, DecodeLimits
    from indexer.embed import ModelSpec
    from search.app import run_build

    try:
        spec = ModelSpec(name=model, pretrained=pretrained or None, weights=weights,
                         random_init=random_weights, model_config=model_config, device=device,
                         precision=precision)
        limits = DecodeLimits(max_bytes=max_bytes, formats=tuple(
            dict.fromkeys([*ALLOWED_FORMATS, *(f.upper() for f in allow_format)])))
        settings = BuildSettings(batch_size=batch_size, limits=limits, prune=prune,
                                 retry_failed=retry_failed, worker_nice=worker_nice,
                                 min_batch=min(min_batch, batch_size),
                                 **({"workers": workers} if workers else {}))
        with _progress(quiet) as on_progress:
            result = run_build(roots, _store(store), spec, settings, index_type, on_progress,
                               wait)
        ocr_summary = _run_ocr(_store(store), ocr_engine, workers, quiet, wait) if ocr else None
    except (ClipdexError, ValueError) as err:
        raise _fail(err) from err
    s = result.summary
    if json_out:
        typer.echo(json.dumps({**asdict(s), "failed": dict(s.failed),
                               "index": asdict(result.index),
                               **({"ocr": asdict(ocr_summary)} if ocr_summary else {})}))
        return
    if ocr_summary:
        o = ocr_summary
        typer.echo(f"ocr ({o.engine}): {o.total} images, {o.cached} already read, read {o.read}"
                   f" now; {o.with_text} show text, {o.failed} unreadable (stored as no text)")
    failed = ", ".join(f"{r}: {n}" for r, n in sorted(s.failed.items())) or "none"
    typer.echo(f"scanned {s.scanned}: embedded {s.embedded}, same bytes as stored {s.linked}, "
               f"unchanged {s.unchanged}, failed {sum(s.failed.values())} ({failed}), "
               f"pruned {s.pruned} in {s.seconds:.1f}s ({s.images_per_second:.1f} images/s)")
    typer.echo(f"index: {result.index.index_type}, {result.index.ntotal} vectors, "
               f"generation {result.index.generation}")
    if s.failed:
        typer.echo("see the failures with: clipdex index failures", err=True)


def _run_ocr(store_path: str, engine: str, workers: int | None, quiet: bool, wait: float) -> Any:
    from tqdm import tqdm

    from search.ocr_app import ocr_store

    bar = None if quiet else tqdm(desc="ocr", unit="img", file=sys.stderr)

    def update(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        return ocr_store(store_path, engine, workers or 2, update, wait)
    finally:
        if bar is not None:
            bar.close()


class _Bar:
    """A tqdm bar drawn from a library progress callback (the library never prints).

    `draw(bar, summary)` copies the summary's counters onto the bar.
    """

    def __init__(self, quiet: bool, unit: str, desc: str,
                 draw: Callable[[Any, Any], None]) -> None:
        self.quiet = quiet or not sys.stderr.isatty()
        self.unit, self.desc, self.draw = unit, desc, draw
        self.bar: Any = None

    def __enter__(self) -> Any:
        if self.quiet:
            return None
        from tqdm import tqdm

        self.bar = tqdm(unit=self.unit, desc=self.desc, dynamic_ncols=True)

        def update(s: Any) -> None:
            self.draw(self.bar, s)
            self.bar.refresh()
        return update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _draw_files(bar: Any, s: Any) -> None:
    bar.n = s.scanned
    bar.set_postfix(embedded=s.embedded, failed=sum(s.failed.values()),
                    img_s=f"{s.images_per_second:.1f}", refresh=False)


def _progress(quiet: bool) -> _Bar:
    return _Bar(quiet, "file", "indexing", _draw_files)


@index_app.command("info")
def index_info(store: StoreOpt = "",
               json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show the store's manifest (model, weights hash, preprocessing, versions) and counts."""
    from search.app import store_info

    info = _read_store(store, store_info)
    if json_out:
        typer.echo(json.dumps(info, indent=1))
        return
    model = (info["manifest"] or {}).get("model", {})
    typer.echo(f"store:       {info['path']}")
    typer.echo(f"model:       {model.get('name')} / {model.get('pretrained')} "
               f"({model.get('precision')}, dim {model.get('dim')})")
    typer.echo(f"weights:     {model.get('weights_sha256')} {model.get('weights_path') or ''}")
    if model.get("random_init"):
        typer.secho("WARNING:     random weights: similarities are not meaningful",
                    fg=typer.colors.YELLOW)
    typer.echo(f"preprocess:  {json.dumps(model.get('preprocess'))}")
    typer.echo(f"versions:    {json.dumps(model.get('versions'))}")
    c = info["counts"]
    typer.echo(f"images:      {c['images']} ({c['paths']} paths), failures {c['failures']}, "
               f"labels {c['labels']}")
    idx = info["index"]
    state = "fresh" if info["index_fresh"] else "stale (rebuilt on next search)"
    typer.echo(f"index:       {idx['index_type'] if idx else 'none'}, "
               f"{idx['ntotal'] if idx else 0} vectors, {state}")


@index_app.command("verify")
def index_verify(store: StoreOpt = "",
                 repair: Annotated[bool, typer.Option(help="Rebuild the index")] = False) -> None:
    """Check that store and index agree (ids, vectors, generation); exit 1 on problems."""
    from search.verify import verify

    report = _read_store(store, lambda st: verify(st, repair=repair))
    for p in report.problems:
        typer.echo(f"problem: {p}")
    typer.echo(f"checked {report.checked_vectors} vectors, index holds {report.index_ntotal}: "
               + ("OK" if report.ok else f"{len(report.problems)} problem(s)")
               + (" -> index rebuilt from the store" if report.repaired else ""))
    if not report.ok and not report.repaired:
        raise typer.Exit(1)


@index_app.command("failures")
def index_failures(store: StoreOpt = "",
                   csv_out: Annotated[bool, typer.Option("--csv")] = False,
                   reason: Annotated[str | None, typer.Option(help="Only this reason")] = None,
                   ) -> None:
    """List quarantined files with the reason and message."""
    rows = _read_store(store, lambda st: [(p, r) for p, r in st.iter_failures()
                                          if not reason or r["reason"] == reason])
    if csv_out:
        w = csv.writer(sys.stdout)
        w.writerow(["path", "reason", "message", "size", "mtime_ns"])
        for p, r in rows:
            w.writerow([p, r["reason"], r["message"], r["size"], r["mtime_ns"]])
        return
    for p, r in rows:
        typer.echo(f"{r['reason']:<20} {p}  ({r['message']})")
    typer.echo(f"{len(rows)} failed file(s)", err=True)


# ---- search and dedup ----------------------------------------------------------------------------
@app.command()
def search(
    queries: Annotated[list[str] | None, typer.Argument(
        help="Image files, or paths already in the store")] = None,
    text: Annotated[list[str], typer.Option("--text", "-t", help="Text query")] = [],  # noqa: B006
    ocr_text: Annotated[list[str], typer.Option(
        "--ocr-text", help="Images that SHOW this text (OCR; index build --ocr)")] = [],  # noqa: B006
    ocr_engine: OcrEngineOpt = "rapidocr",
    k: Annotated[int, typer.Option("--k", "-k", min=1)] = 20,
    threshold: Annotated[float | None, typer.Option(help="Minimum cosine score")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per query")] = False,
    html: Annotated[str | None, typer.Option(
        "--html", help="Also write a self-contained HTML page with thumbnails")] = None,
    store: StoreOpt = "",
    weights: WeightsOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Find the nearest images to image files, stored paths or text; exit 1 if a query failed."""
    from search.app import open_searcher

    asked = [("image" if os.path.isfile(q) else "path", q) for q in queries or []]
    asked += [("text", t) for t in text]
    if ocr_text and asked:
        raise typer.BadParameter("--ocr-text searches stored OCR text: give it on its own")
    if ocr_text:
        return _search_ocr_text(_store(store), ocr_text, k, ocr_engine, json_out)
    if not asked:
        raise typer.BadParameter("give an image, a stored path or --text")
    try:
        st, searcher = open_searcher(_store(store), weights, model_config, device)
    except ClipdexError as err:
        raise _fail(err) from err
    failed, results = 0, []
    with st:
        for kind, q in asked:
            res = searcher.query(kind, q, k, threshold)
            failed += not res.ok
            results.append(res)
            _print_result(res, json_out)
        if html:
            from search.report import write_search_report

            try:
                write_search_report(html, st, results)
            except OSError as err:
                raise _fail(err) from err
    if failed:
        raise typer.Exit(1)


def _search_ocr_text(store_path: str, queries: list[str], k: int, engine: str,
                     json_out: bool) -> None:
    from indexer.store import Store
    from search.ocr_app import search_ocr_text

    try:
        with Store.open(store_path) as st:
            found = [(q, search_ocr_text(st, q, k, engine)) for q in queries]
    except (ClipdexError, ValueError) as err:
        raise _fail(err) from err
    for q, hits in found:
        if json_out:
            typer.echo(json.dumps({"query": q, "kind": "ocr_text",
                                   "hits": [asdict(h) for h in hits]}))
            continue
        typer.echo(f"# ocr text: {q}")
        for h in hits:
            typer.echo(f"{h.rank:>4}  {h.score:.4f}  {h.paths[0] if h.paths else h.sha256}"
                       f"  | {h.snippet}")


def _print_result(res: Any, json_out: bool) -> None:
    if json_out:
        typer.echo(json.dumps({"query": res.query, "kind": res.kind, "error": res.error,
                               "hits": [asdict(h) for h in res.hits]}))
        return
    if res.error:
        typer.secho(f"{res.kind} query {res.query!r} failed: {res.error}", fg=typer.colors.RED,
                    err=True)
        return
    typer.echo(f"# {res.kind}: {res.query}")
    for h in res.hits:
        more = f"  (+{len(h.paths) - 1} more)" if len(h.paths) > 1 else ""
        typer.echo(f"{h.rank:>4}  {h.score:.4f}  {h.paths[0] if h.paths else h.sha256}{more}")


@app.command()
def dedup(
    threshold: Annotated[float, typer.Option(help="Cosine similarity for 'near-duplicate'")] = 0.95,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per group")] = False,
    html: Annotated[str | None, typer.Option(
        "--html", help="Also write a self-contained HTML contact sheet of the groups")] = None,
    store: StoreOpt = "",
) -> None:
    """Group the store's near-duplicate images (similarity >= threshold)."""
    from indexer.store import Store
    from search.dedup import near_duplicate_groups
    from search.index import open_index

    try:
        with Store.open(_store(store)) as st:
            groups = near_duplicate_groups(st, open_index(st), threshold)
            if html:
                from search.report import write_dedup_report

                write_dedup_report(html, st, groups, threshold)
    except (ClipdexError, ValueError, OSError) as err:
        raise _fail(err) from err
    for i, g in enumerate(groups, 1):
        if json_out:
            typer.echo(json.dumps({"group": i, "members": [asdict(m) for m in g.members]}))
            continue
        typer.echo(f"# group {i}: {len(g.members)} images")
        for m in g.members:
            typer.echo(f"  {m.score:.4f}  {m.paths[0]}"
                       + (f"  (+{len(m.paths) - 1} more)" if len(m.paths) > 1 else ""))
    if not json_out:
        typer.echo(f"{len(groups)} group(s) at threshold {threshold}", err=True)


# ==== labels and detection (search/labels.py, search/detect.py, search/detect_app.py) ==========
labels_app = typer.Typer(help="Label images benign/malicious for the detector.",
                         no_args_is_help=True)
detect_app = typer.Typer(help="Train, run and evaluate the malicious-image detector.",
                         no_args_is_help=True)
app.add_typer(labels_app, name="labels")
app.add_typer(detect_app, name="detect")

EXIT_FLAGGED = 3  # `detect run --fail-on-flag` found something (1 = error, 2 = usage)


def _label_spec(model: str, pretrained: str, weights: str | None, random_weights: bool,
                model_config: str | None, device: str) -> Any:
    from indexer.embed import ModelSpec

    return ModelSpec(name=model, pretrained=pretrained or None, weights=weights,
                     random_init=random_weights, model_config=model_config, device=device)


def _print_label_report(r: Any) -> None:
    for c in r.conflicts:
        typer.secho(f"conflict: {c.path} ({c.sha256[:12]}): stored {c.stored['label']}/"
                    f"{c.stored['category']} from {c.stored['source']}, asked {c.asked['label']}"
                    f"/{c.asked['category']}: kept the stored label", fg=typer.colors.YELLOW,
                    err=True)
    for path, why in r.unreadable:
        typer.echo(f"unreadable: {path} ({why})", err=True)
    typer.echo(f"{r.asked} listed: {r.written} labels stored, {r.unchanged} already stored, "
               f"{len(r.conflicts)} conflict(s), {len(r.unreadable)} unreadable, "
               f"{r.not_embedded} labelled but not embeddable (see `clipdex index failures`)")


LabelModelOpt = Annotated[str, typer.Option("--model", help="open_clip model (new store only)")]
LabelTagOpt = Annotated[str, typer.Option("--pretrained", help="Pretrained tag (new store only)")]
RandomOpt = Annotated[bool, typer.Option(
    "--random-weights", help="Random model weights for a new store (tests/benchmarks only)")]
OverwriteOpt = Annotated[bool, typer.Option(
    help="Replace a stored, different label instead of reporting a conflict")]


@labels_app.command("import")
def labels_import(
    jsonl: Annotated[str, typer.Argument(help='JSONL: {"path", "label": 0|1, "category"}')],
    store: StoreOpt = "", overwrite: OverwriteOpt = False,
    model: LabelModelOpt = "ViT-B-32", pretrained: LabelTagOpt = "laion2b_s34b_b79k",
    weights: WeightsOpt = None, random_weights: RandomOpt = False,
    model_config: ModelConfigOpt = None, device: DeviceOpt = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Label the images listed in a JSONL file (paths relative to it); embed new ones first."""
    from indexer.build import BuildSettings
    from search.detect_app import import_labels

    try:
        spec = _label_spec(model, pretrained, weights, random_weights, model_config, device)
        with _progress(quiet) as on_progress:
            report = import_labels(_store(store), jsonl, spec, BuildSettings(), overwrite,
                                   on_progress)
    except (ClipdexError, ValueError, OSError) as err:
        raise _fail(err) from err
    _print_label_report(report)


@labels_app.command("add")
def labels_add(
    roots: Annotated[list[str], typer.Argument(help="Image files or folders")],
    label: Annotated[str, typer.Option(help="malicious|benign (or 1|0)")],
    category: Annotated[str | None, typer.Option(help="Attack type or benign source")] = None,
    store: StoreOpt = "", overwrite: OverwriteOpt = False,
    model: LabelModelOpt = "ViT-B-32", pretrained: LabelTagOpt = "laion2b_s34b_b79k",
    weights: WeightsOpt = None, random_weights: RandomOpt = False,
    model_config: ModelConfigOpt = None, device: DeviceOpt = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Give every image under ROOTS one label (and category); embed new ones first."""
    from indexer.build import BuildSettings
    from search.detect_app import label_files
    from search.labels import entries_for_roots, parse_label

    try:
        value = parse_label(label)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--label") from err
    try:
        spec = _label_spec(model, pretrained, weights, random_weights, model_config, device)
        entries, skipped = entries_for_roots(roots, value, category)
        with _progress(quiet) as on_progress:
            report = label_files(_store(store), entries, "labels add", spec, BuildSettings(),
                                 overwrite, on_progress)
    except (ClipdexError, ValueError, OSError) as err:
        raise _fail(err) from err
    report.unreadable.extend(skipped)
    _print_label_report(report)


@labels_app.command("list")
def labels_list(store: StoreOpt = "",
                json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Count stored labels per label/category."""
    from search.labels import label_counts

    counts = _read_store(store, label_counts)
    if json_out:
        typer.echo(json.dumps(counts))
        return
    for key, n in counts.items():
        typer.echo(f"{n:>8}  {key}")


KOpt = Annotated[int | None, typer.Option("--k", min=1, help="Labelled neighbours in the vote")]
LrWeightOpt = Annotated[float | None, typer.Option(
    min=0.0, max=1.0, help="Share of the LR probability in the hybrid score")]
NearCopyOpt = Annotated[float | None, typer.Option(
    min=-1.0, max=1.0, help="Similarity to a known-malicious image that flags on its own")]
ThresholdOpt = Annotated[float | None, typer.Option(
    min=0.0, max=1.0, help="Hybrid score at or above which an image is flagged")]


TextRuleOpt = Annotated[str | None, typer.Option(
    help="How the text score joins the CLIP score: max (either flags) or mean")]
TextWeightOpt = Annotated[float | None, typer.Option(
    min=0.0, max=1.0, help="Share of the text score with --text-rule mean")]


def _overrides(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


@detect_app.command("train")
def detect_train(
    store: StoreOpt = "",
    holdout: Annotated[float, typer.Option(
        min=0.0, max=0.9, help="Share of labelled images held out (validation, calibration)")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the holdout split")] = 0,
    k: KOpt = None, lr_weight: LrWeightOpt = None, near_copy: NearCopyOpt = None,
    threshold: ThresholdOpt = None,
    no_near_copy: Annotated[bool, typer.Option(
        "--no-near-copy", help="Disable the near-copy rule")] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
    ocr: Annotated[bool, typer.Option(
        "--ocr", help="Read (OCR) the labelled images that have no stored text first")] = False,
    ocr_engine: OcrEngineOpt = "rapidocr",
    text_rule: TextRuleOpt = None, text_weight: TextWeightOpt = None,
) -> None:
    """Fit the detector on the store's labelled, embedded images and save it in the store.

    Every channel with data is trained: CLIP LR + kNN, and the OCR text classifier when the
    labelled images have stored OCR text (`--ocr`, or `index build --ocr`)."""
    from search.detect import DetectSettings
    from search.detect_app import train_detector
    from search.metrics import format_report

    try:
        settings = DetectSettings(**_overrides(k=k, lr_weight=lr_weight, near_copy=near_copy,
                                               threshold=threshold, text_rule=text_rule,
                                               text_weight=text_weight))
        if no_near_copy:
            settings = DetectSettings(**{**asdict(settings), "near_copy": None})
        result = train_detector(_store(store), settings, holdout, seed, ocr=ocr,
                                ocr_engine=ocr_engine)
    except (ClipdexError, ValueError) as err:
        raise _fail(err) from err
    if json_out:
        typer.echo(json.dumps({"path": result.path, "counts": result.counts,
                               "validation": asdict(result.validation)
                               if result.validation else None,
                               "text": asdict(result.text) if result.text else None}))
        return
    typer.echo(f"detector saved: {result.path}")
    typer.echo(f"trained on {json.dumps(result.counts['train'])}; held out "
               f"{result.counts['validation']}; excluded (no valid vector) "
               f"{json.dumps(result.counts['excluded'])}")
    typer.echo(f"text channel ({result.text.engine}): {json.dumps(result.text.counts)}"
               if result.text else "text channel: not trained (no stored OCR text of both "
               "labels; add --ocr)")
    if result.validation:
        typer.echo("validation split:")
        for line in format_report(result.validation):
            typer.echo("  " + line)


@detect_app.command("run")
def detect_run(
    roots: Annotated[list[str], typer.Argument(help="Image files or folders")],
    store: StoreOpt = "",
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per image")] = False,
    fail_on_flag: Annotated[bool, typer.Option(
        help=f"Exit {EXIT_FLAGGED} when an image is flagged (CI / pipelines)")] = False,
    k: KOpt = None, lr_weight: LrWeightOpt = None, near_copy: NearCopyOpt = None,
    threshold: ThresholdOpt = None,
    weights: WeightsOpt = None, model_config: ModelConfigOpt = None, device: DeviceOpt = "auto",
    text_rule: TextRuleOpt = None, text_weight: TextWeightOpt = None,
    no_text: Annotated[bool, typer.Option(
        "--no-text", help="Ignore the text (OCR) channel even when it is trained")] = False,
) -> None:
    """Score images: flagged or not, with the LR probability, kNN vote and neighbours, and
    the text channel (recognised text, the phrases that weighed most) when it is trained."""
    from indexer.store import Store
    from search.detect_app import ModelOptions, detect_files, open_detector
    from search.ocr_app import open_text_channel

    flagged = failed = 0
    try:
        with Store.open(_store(store)) as st:
            detector = open_detector(st, _overrides(k=k, lr_weight=lr_weight,
                                                    near_copy=near_copy, threshold=threshold,
                                                    text_rule=text_rule,
                                                    text_weight=text_weight))
            text = None if no_text else open_text_channel(st)
            for fv in detect_files(st, detector, roots, ModelOptions(weights, model_config,
                                                                      device), text=text):
                flagged += bool(fv.verdict and fv.verdict.flagged)
                failed += fv.error is not None
                _print_file_verdict(fv, json_out)
    except (ClipdexError, ValueError) as err:
        raise _fail(err) from err
    if not json_out:
        typer.echo(f"{flagged} flagged, {failed} could not be checked", err=True)
    if fail_on_flag and flagged:
        raise typer.Exit(EXIT_FLAGGED)
    if failed:
        raise typer.Exit(1)


def _print_file_verdict(fv: Any, json_out: bool) -> None:
    from search.detect import verdict_to_dict

    if json_out:
        body = verdict_to_dict(fv.verdict) if fv.verdict else {}
        typer.echo(json.dumps({"path": fv.path, "error": fv.error, **body}))
        return
    if fv.error:
        typer.secho(f"ERROR    {fv.path}: {fv.error}", fg=typer.colors.RED)
        return
    v = fv.verdict
    near = "-" if v.nearest_malicious is None else f"{v.nearest_malicious:.3f}"
    top = v.neighbours[0] if v.neighbours else None
    nn = f"{top.label}/{top.category} {top.similarity:.3f} {top.path}" if top else "-"
    typer.secho(f"{'FLAGGED' if v.flagged else 'ok':<8} score {v.score:.3f}  lr "
                f"{v.lr_probability:.3f}  knn {v.knn_vote:.3f}  near-mal {near}  {fv.path}"
                f"  [nn: {nn}]", fg=typer.colors.RED if v.flagged else None)
    if v.text_probability is not None:
        top_phrases = "; ".join(f"{p!r} {w:+.2f}" for p, w in v.text_phrases) or "-"
        typer.echo(f"         text {v.text_probability:.3f}  weighed most: {top_phrases}")
    if v.ocr_text:
        typer.echo("         reads: " + v.ocr_text.replace("\n", " / ")[:300])


@detect_app.command("eval")
def detect_eval(
    jsonl: Annotated[str, typer.Argument(help="Labelled test images (JSONL, like labels import)")],
    store: StoreOpt = "",
    calibrate: Annotated[bool, typer.Option(
        help="First set the thresholds for --target-fpr on the training holdout, and save")
    ] = False,
    target_fpr: Annotated[float, typer.Option(min=0.0, max=0.99)] = 0.01,
    json_out: Annotated[bool, typer.Option("--json")] = False,
    weights: WeightsOpt = None, model_config: ModelConfigOpt = None, device: DeviceOpt = "auto",
) -> None:
    """Precision, recall, F1, ROC-AUC, FPR and per-category rates: LR, kNN and hybrid."""
    from search.detect_app import ModelOptions, eval_detector
    from search.metrics import format_report

    try:
        res = eval_detector(_store(store), jsonl, calibrate, target_fpr,
                            ModelOptions(weights, model_config, device))
    except (ClipdexError, ValueError, OSError) as err:
        raise _fail(err) from err
    if json_out:
        typer.echo(json.dumps({"report": asdict(res.report) if res.report else None,
                               "failed": res.failed, "overlap": res.overlap,
                               "calibration": res.calibration,
                               "settings": asdict(res.settings)}))
        return
    if res.calibration:
        typer.echo(f"calibrated for FPR <= {target_fpr} on {res.calibration['benign_validation']}"
                   " benign validation images (saved)")
    for path, why in res.failed:
        typer.echo(f"not scored: {path} ({why})", err=True)
    typer.echo(f"{len(res.failed)} not embeddable, {res.overlap} left out (in the training set)")
    for line in format_report(res.report) if res.report else ["no test image could be scored"]:
        typer.echo(line)


# ==== serve: the HTTP API and web page (search/server.py) ======================================
@app.command()
def serve(
    store: StoreOpt = "",
    host: Annotated[str, typer.Option(help="Address to bind; non-loopback needs a token")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    token_file: Annotated[str | None, typer.Option(
        "--token-file", envvar="CLIPDEX_TOKEN_FILE",
        help="File whose first line is the bearer token clients must send")] = None,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes (413 above)")
                        ] = 20 << 20,
    max_pending: Annotated[int, typer.Option(min=1, help="Queued requests before 503")] = 16,
    timeout: Annotated[float, typer.Option(help="Seconds before a request answers 504")] = 30.0,
    weights: WeightsOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Serve search and detection over HTTP, with a web page at /."""
    from search.server import ServeSettings, read_token_file
    from search.server import serve as run_server

    try:
        token = read_token_file(token_file) if token_file else None
        settings = ServeSettings(store=_store(store), host=host, port=port, token=token,
                                 max_body_bytes=max_body, max_pending=max_pending,
                                 timeout_s=timeout, weights=weights, model_config=model_config,
                                 device=device)
        run_server(settings)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    except ClipdexError as err:
        raise _fail(err) from err


# ==== scaling out: `embed`, `ingest merge`, `index build --from/--ondisk`, `index export` =========
ingest_app = typer.Typer(help="Load `clipdex embed` shards into a store.", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")


@app.command()
def embed(
    roots: Annotated[list[str], typer.Argument(help="Image folders or files")],
    out: Annotated[str, typer.Option("--out", "-o", help="Shard folder (one Parquet per shard)")],
    engine: Annotated[str, typer.Option(help="local (this machine) or ray (a Ray cluster)")
                      ] = "local",
    address: Annotated[str | None, typer.Option(
        help="Ray cluster address (auto: the running cluster); default starts a local Ray")
    ] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="Files per shard (unit of resume)")
                          ] = 256,
    model: Annotated[str, typer.Option(help="open_clip model name")] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option(help="open_clip pretrained tag")] = "laion2b_s34b_b79k",
    weights: WeightsOpt = None,
    random_weights: Annotated[bool, typer.Option(
        "--random-weights", help="Random model weights (tests/benchmarks only; recorded)")] = False,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
    precision: Annotated[str, typer.Option(help="fp32, bf16 or fp16 (cuda)")] = "fp32",
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    workers: Annotated[int | None, typer.Option(min=1, help="Decode processes (local)")] = None,
    actors: Annotated[int, typer.Option(min=1, help="Most model actors (ray)")] = 4,
    decode_cpus: Annotated[float, typer.Option(help="CPUs per decode task (ray)")] = 1.0,
    embed_cpus: Annotated[float, typer.Option(help="CPUs per model actor without GPU (ray)")
                          ] = 1.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON")] = False,
) -> None:
    """Embed ROOTS into shard files (no store): resumable, on this machine or a Ray cluster."""
    from indexer.embed import ModelSpec
    from indexer.shards import ShardSettings
    from search.scale import RaySettings, run_embed

    try:
        spec = ModelSpec(name=model, pretrained=pretrained or None, weights=weights,
                         random_init=random_weights, model_config=model_config, device=device,
                         precision=precision)
        settings = ShardSettings(files_per_shard=shard_size, batch_size=batch_size,
                                 decode_workers=workers or ShardSettings().decode_workers)
        ray = RaySettings(address=address, decode_cpus=decode_cpus, embed_cpus=embed_cpus,
                          actors=(1, actors), device=device)
        with _shard_progress(quiet) as on_progress:
            s = run_embed(roots, out, spec, settings, engine, ray, on_progress)
    except (ClipdexError, ValueError) as err:
        raise _fail(err) from err
    if json_out:
        typer.echo(json.dumps({**asdict(s), "failed": dict(s.failed)}))
        return
    failed = ", ".join(f"{r}: {n}" for r, n in sorted(s.failed.items())) or "none"
    typer.echo(f"{s.shards} shards: {s.written} written, {s.skipped} already done; embedded "
               f"{s.embedded}, failed {sum(s.failed.values())} ({failed}) in {s.seconds:.1f}s "
               f"({s.images_per_second:.1f} images/s) -> {out}")


def _draw_shards(bar: Any, s: Any) -> None:
    bar.total = s.shards - s.skipped
    bar.n = s.written
    bar.set_postfix(embedded=s.embedded, failed=sum(s.failed.values()), refresh=False)


def _shard_progress(quiet: bool) -> _Bar:
    return _Bar(quiet, "shard", "embedding", _draw_shards)


@ingest_app.command("merge")
def ingest_merge(
    shard_dir: Annotated[str, typer.Argument(help="Folder written by `clipdex embed`")],
    store: StoreOpt = "",
    wait: Annotated[float, typer.Option(help="Seconds to wait for another writer")] = 0.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON")] = False,
) -> None:
    """Load shard files into the store (one writer); shards of another model are refused."""
    from search.ingest import merge_shards

    try:
        s = merge_shards(shard_dir, _store(store), wait)
    except ClipdexError as err:
        raise _fail(err) from err
    if json_out:
        typer.echo(json.dumps({**asdict(s), "failed": dict(s.failed)}))
        return
    typer.echo(f"merged {s.shards} shards ({s.rows} rows): {s.embedded} embedded, "
               f"{sum(s.failed.values())} failed; the store holds {s.images} images "
               f"({s.seconds:.1f}s)")


def _index_build_from(from_dir: str | None, ondisk: str | None, store_path: str,
                      index_type: str | None, json_out: bool) -> None:
    from indexer.store import Store
    from search.ondisk import OnDiskSettings, build_ondisk

    if not (from_dir and ondisk):
        raise typer.BadParameter("--from SHARDS and --ondisk DIR go together (load the shards "
                                 "with `clipdex ingest merge` first)")
    try:
        settings = OnDiskSettings(index_type=index_type or OnDiskSettings.index_type)
        with Store.open(store_path, readonly=True) as st:
            info = build_ondisk(from_dir, ondisk, st, settings)
    except (ClipdexError, ValueError) as err:
        raise _fail(err) from err
    if json_out:
        typer.echo(json.dumps(asdict(info)))
        return
    typer.echo(f"index: {info.index_type}, {info.ntotal} vectors on disk in {ondisk}, "
               f"generation {info.generation} ({info.build_seconds:.1f}s); published")


@index_app.command("export")
def index_export(
    store: StoreOpt = "",
    milvus: Annotated[str | None, typer.Option(
        help="Milvus URI (http://host:19530), or a local file for milvus-lite")] = None,
    collection: Annotated[str, typer.Option(help="Milvus collection")] = "images",
    milvus_index: Annotated[str, typer.Option(
        help="FLAT, HNSW, IVF_FLAT, IVF_PQ or DISKANN (inner product)")] = "HNSW",
    token: Annotated[str, typer.Option(envvar="CLIPDEX_MILVUS_TOKEN", help="Milvus token")] = "",
    replace: Annotated[bool, typer.Option(help="Drop an existing collection first")] = False,
    parquet: Annotated[str | None, typer.Option(
        help="Instead: write Parquet files for Milvus bulk import into this folder")] = None,
) -> None:
    """Export the store's vectors to Milvus for multi-machine serving."""
    from indexer.store import Store
    from search.milvus_export import MilvusTarget, export_store, write_bulk_parquet

    if not (milvus or parquet):
        raise typer.BadParameter("give --milvus URI or --parquet DIR")
    try:
        with Store.open(_store(store), readonly=True) as st:
            if parquet:
                files = write_bulk_parquet(st, parquet)
                typer.echo(f"wrote {len(files)} Parquet file(s) to {parquet}")
                return
            assert milvus is not None
            target = MilvusTarget(milvus, collection, milvus_index, token=token, replace=replace)
            s = export_store(st, target)
    except (ClipdexError, ValueError) as err:
        raise _fail(err) from err
    typer.echo(f"exported {s.rows} vectors to {milvus} collection {collection!r} "
               f"({milvus_index}, inner product) in {s.seconds:.1f}s")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
