"""Wiring: the few `open_*`/`run_*` functions that build the collaborators the CLI needs."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from indexer.build import BuildSettings, BuildSummary, Indexer, Progress
from indexer.embed import (
    DeferredEmbedder,
    Embedder,
    ModelSpec,
    OpenClipEmbedder,
    matches_stored,
    spec_for_identity,
)
from indexer.errors import StoreError
from indexer.faults import crash_point
from indexer.store import Store, check_identity

from .index import (
    DEFAULT_INDEX_TYPE,
    IndexInfo,
    VectorIndex,
    build_index,
    index_dir,
    open_index,
    read_pointer,
    save_index,
)
from .query import Searcher

log = logging.getLogger(__name__)


def default_store_path() -> str:
    env = os.environ.get("CLIPDEX_STORE")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "clipdex", "default.clipdex")


def load_embedder(spec: ModelSpec, lazy: bool = False) -> Embedder:
    """The model for `spec`; with `lazy`, weights load only when something needs embedding."""
    emb = OpenClipEmbedder(spec)
    if not lazy:
        emb.load()
    return emb


def store_embedder(store: Store, weights: str | None = None, model_config: str | None = None,
                   device: str = "auto") -> Embedder:
    """Load the model a store was built with, and prove it is the same one."""
    ident = store.identity()
    emb = load_embedder(spec_for_identity(ident, weights, model_config, device))
    check_identity(ident, emb.identity, store.path)
    return emb


@dataclass(frozen=True)
class BuildResult:
    summary: BuildSummary
    index: IndexInfo


def run_build(roots: Iterable[str], store_path: str, spec: ModelSpec, settings: BuildSettings,
              index_type: str | None = None, on_progress: Progress | None = None,
              wait: float = 0.0, embedder: Embedder | None = None) -> BuildResult:
    """Embed new/changed files into the store, then publish an index for the new generation."""
    # An unchanged re-run must not pay for loading the model: identity (weights sha256,
    # preprocessing) needs no weights, and when the manifest already names the asked-for
    # model not even torch is imported (DeferredEmbedder: ~0.4 s instead of ~4.7 s). A new
    # store loads it first, so that its manifest is never written for weights that turn out
    # not to load.
    new_store = not os.path.exists(os.path.join(store_path, "data.mdb"))
    emb = embedder or (None if new_store else _deferred(spec, store_path)) or load_embedder(
        spec, lazy=not new_store)
    with Store.create_or_open(store_path, emb.identity, wait=wait) as store:
        summary = Indexer(emb, store, settings).build(roots, on_progress)
        crash_point("after_store_commit")
        pointer = read_pointer(store)
        wanted = index_type or (pointer.wanted if pointer else DEFAULT_INDEX_TYPE)
        if pointer and pointer.generation == store.generation() and pointer.wanted == wanted:
            info = pointer  # nothing changed: keep the published index as it is
        else:
            info = _publish(store, build_index(store, wanted))
    return BuildResult(summary, info)


def _deferred(spec: ModelSpec, store_path: str) -> Embedder | None:
    """The store's own model, unbuilt, when the manifest shows `spec` asks for exactly it."""
    try:
        with Store.open(store_path, readonly=True) as store:
            stored = store.identity()
    except (StoreError, OSError):
        return None  # let the normal path report whatever is wrong with the store
    if not matches_stored(spec, stored):
        return None
    return DeferredEmbedder(spec, stored, os.path.abspath(store_path))


def _publish(store: Store, vindex: VectorIndex) -> IndexInfo:
    try:
        return save_index(store, vindex)
    except (OSError, RuntimeError) as err:  # disk full; faiss reports it as RuntimeError
        raise StoreError(f"cannot publish the index in {index_dir(store)}: {err}. The store's "
                         "data is committed; free space and run the build again.") from err


def open_searcher(store_path: str, weights: str | None = None, model_config: str | None = None,
                  device: str = "auto") -> tuple[Store, Searcher]:
    """A read-only store and a Searcher; the model loads only when a query needs it."""
    store = Store.open(store_path, readonly=True)
    index = open_index(store)

    def factory() -> Embedder:
        return store_embedder(store, weights, model_config, device)

    return store, Searcher(store, index, factory)


def store_info(store: Store) -> dict[str, Any]:
    pointer = read_pointer(store)
    return {
        "path": store.path,
        "manifest": store.manifest(),
        "generation": store.generation(),
        "counts": store.counts(),
        "index": None if pointer is None else pointer.__dict__,
        "index_fresh": pointer is not None and pointer.generation == store.generation(),
    }
