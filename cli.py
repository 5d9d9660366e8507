"""The `clipdex` command. It only translates: options in, one library call, output out."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from dataclasses import asdict
from typing import Annotated, Any

import typer

from indexer.errors import ClipdexError

app = typer.Typer(help="Find near-duplicate and similar images, and flag malicious ones.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
index_app = typer.Typer(help="Build, inspect and check a store's index.", no_args_is_help=True)
app.add_typer(index_app, name="index")

log = logging.getLogger("clipdex")

StoreOpt = Annotated[str, typer.Option("--store", "-s", envvar="CLIPDEX_STORE",
                                       help="Store directory [default: $CLIPDEX_STORE or "
                                            "~/.local/share/clipdex/default.clipdex]")]
WeightsOpt = Annotated[str | None, typer.Option(
    "--weights", envvar="CLIPDEX_WEIGHTS", help="Local open_clip checkpoint (.safetensors/.pt)")]
ModelConfigOpt = Annotated[str | None, typer.Option(
    "--model-config", envvar="CLIPDEX_MODEL_CONFIG",
    help="An open_clip model config JSON, registered under its file name")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda")]


def _store(path: str | None) -> str:
    from search.app import default_store_path

    return path or default_store_path()


def _fail(err: Exception, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


# ---- index -------------------------------------------------------------------------------------
@index_app.command("build")
def index_build(
    roots: Annotated[list[str], typer.Argument(help="Image folders or files")],
    store: StoreOpt = "",
    model: Annotated[str, typer.Option(help="open_clip model name")] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option(help="open_clip pretrained tag")] = "laion2b_s34b_b79k",
    weights: WeightsOpt = None,
    random_weights: Annotated[bool, typer.Option(
        "--random-weights", help="Random model weights (tests/benchmarks only; recorded)")] = False,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
    precision: Annotated[str, typer.Option(help="fp32, bf16 or fp16 (cuda)")] = "fp32",
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    workers: Annotated[int | None, typer.Option(min=1, help="Decode processes")] = None,
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
) -> None:
    """Embed every image under ROOTS into the store and publish its FAISS index."""
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
                                 retry_failed=retry_failed,
                                 **({"workers": workers} if workers else {}))
        with _progress(quiet) as on_progress:
            result = run_build(roots, _store(store), spec, settings, index_type, on_progress,
                               wait)
    except (ClipdexError, ValueError) as err:
        raise _fail(err) from err
    s = result.summary
    if json_out:
        typer.echo(json.dumps({**asdict(s), "failed": dict(s.failed),
                               "index": asdict(result.index)}))
        return
    failed = ", ".join(f"{r}: {n}" for r, n in sorted(s.failed.items())) or "none"
    typer.echo(f"scanned {s.scanned}: embedded {s.embedded}, same bytes as stored {s.linked}, "
               f"unchanged {s.unchanged}, failed {sum(s.failed.values())} ({failed}), "
               f"pruned {s.pruned} in {s.seconds:.1f}s ({s.images_per_second:.1f} images/s)")
    typer.echo(f"index: {result.index.index_type}, {result.index.ntotal} vectors, "
               f"generation {result.index.generation}")
    if s.failed:
        typer.echo("see the failures with: clipdex index failures", err=True)


class _progress:
    """A tqdm bar drawn from the library's progress callback (the library never prints)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet or not sys.stderr.isatty()
        self.bar: Any = None

    def __enter__(self) -> Any:
        if self.quiet:
            return None
        from tqdm import tqdm

        self.bar = tqdm(unit="file", desc="indexing", dynamic_ncols=True)

        def update(s: Any) -> None:
            self.bar.n = s.scanned
            self.bar.set_postfix(embedded=s.embedded, failed=sum(s.failed.values()),
                                 img_s=f"{s.images_per_second:.1f}", refresh=False)
            self.bar.refresh()
        return update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


@index_app.command("info")
def index_info(store: StoreOpt = "",
               json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show the store's manifest (model, weights hash, preprocessing, versions) and counts."""
    from indexer.store import Store
    from search.app import store_info

    try:
        with Store.open(_store(store)) as st:
            info = store_info(st)
    except ClipdexError as err:
        raise _fail(err) from err
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
    from indexer.store import Store
    from search.verify import verify

    try:
        with Store.open(_store(store)) as st:
            report = verify(st, repair=repair)
    except ClipdexError as err:
        raise _fail(err) from err
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
    from indexer.store import Store

    try:
        with Store.open(_store(store)) as st:
            rows = [(p, r) for p, r in st.iter_failures() if not reason or r["reason"] == reason]
    except ClipdexError as err:
        raise _fail(err) from err
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
    k: Annotated[int, typer.Option("--k", "-k", min=1)] = 20,
    threshold: Annotated[float | None, typer.Option(help="Minimum cosine score")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per query")] = False,
    store: StoreOpt = "",
    weights: WeightsOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Find the nearest images to image files, stored paths or text; exit 1 if a query failed."""
    from search.app import open_searcher

    asked = [("image" if os.path.isfile(q) else "path", q) for q in queries or []]
    asked += [("text", t) for t in text]
    if not asked:
        raise typer.BadParameter("give an image, a stored path or --text")
    try:
        st, searcher = open_searcher(_store(store), weights, model_config, device)
    except ClipdexError as err:
        raise _fail(err) from err
    failed = 0
    with st:
        for kind, q in asked:
            res = searcher.query(kind, q, k, threshold)
            failed += not res.ok
            _print_result(res, json_out)
    if failed:
        raise typer.Exit(1)


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
    store: StoreOpt = "",
) -> None:
    """Group the store's near-duplicate images (similarity >= threshold)."""
    from indexer.store import Store
    from search.dedup import near_duplicate_groups
    from search.index import open_index

    try:
        with Store.open(_store(store)) as st:
            groups = near_duplicate_groups(st, open_index(st), threshold)
    except (ClipdexError, ValueError) as err:
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
