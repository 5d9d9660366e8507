"""Wiring: the few `open_*`/`run_*` functions that build the collaborators the CLI needs."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from indexer.build import BuildSettings, BuildSummary, Indexer, Progress
from indexer.embed import Embedder, ModelSpec, OpenClipEmbedder, spec_for_identity
from indexer.store import Store, check_identity

from .index import IndexInfo, build_index, open_index, read_pointer, save_index
from .query import Searcher

log = logging.getLogger(__name__)


def default_store_path() -> str:
    env = os.environ.get("CLIPDEX_STORE")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "clipdex", "default.clipdex")


def load_embedder(spec: ModelSpec) -> Embedder:
    return OpenClipEmbedder(spec)


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
    emb = embedder or load_embedder(spec)
    with Store.create_or_open(store_path, emb.identity, wait=wait) as store:
        summary = Indexer(emb, store, settings).build(roots, on_progress)
        pointer = read_pointer(store)
        wanted = index_type or (pointer.index_type if pointer else "Flat")
        if pointer and pointer.generation == store.generation() and pointer.index_type == wanted:
            info = pointer  # nothing changed: keep the published index as it is
        else:
            info = save_index(store, build_index(store, wanted))
    return BuildResult(summary, info)


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
