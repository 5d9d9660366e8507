"""The model loads only when a file needs embedding; precision modes are recorded, never mixed."""

import numpy as np
import open_clip
import pytest

from indexer.build import BuildSettings
from indexer.embed import ModelSpec, OpenClipEmbedder
from indexer.errors import ClipdexError, ModelMismatchError
from indexer.store import Store
from search.app import run_build

from .conftest import scene


@pytest.fixture
def model_builds(monkeypatch):
    """Counts real (non-meta) open_clip model builds, i.e. weight loads."""
    calls: list[str] = []
    real = open_clip.create_model

    def counting(*args, **kwargs):
        if str(kwargs.get("device")) != "meta":
            calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", counting)
    return calls


def test_unchanged_rerun_never_loads_the_model(tiny_spec, image_dir, store_path, model_builds):
    first = run_build([str(image_dir)], store_path, tiny_spec, BuildSettings(workers=1))
    assert first.summary.embedded == 8 and len(model_builds) == 1

    again = run_build([str(image_dir)], store_path, tiny_spec, BuildSettings(workers=1))
    assert (again.summary.unchanged, again.summary.embedded) == (8, 0)
    assert len(model_builds) == 1  # identity checked and files scanned without the weights
    assert again.index.generation == first.index.generation

    scene(99).save(image_dir / "new.png")
    more = run_build([str(image_dir)], store_path, tiny_spec, BuildSettings(workers=1))
    assert more.summary.embedded == 1 and more.summary.unchanged == 8
    assert len(model_builds) == 2


_RERUN = """
import json, sys
from indexer.build import BuildSettings
from indexer.embed import ModelSpec
from search.app import run_build
spec = ModelSpec(name="clipdex-tiny", pretrained=None, random_init=True,
                 model_config=sys.argv[3], device="cpu")
res = run_build([sys.argv[1]], sys.argv[2], spec, BuildSettings(workers=1))
heavy = sorted(m for m in ("torch", "open_clip", "torchvision") if m in sys.modules)
print(json.dumps({"embedded": res.summary.embedded, "unchanged": res.summary.unchanged,
                  "heavy": heavy}))
"""


def _rerun(image_dir, store_path, config):
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RERUN, str(image_dir), store_path, config],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_unchanged_rerun_never_imports_torch(tiny_spec, image_dir, store_path):
    """The store's manifest names the model: an unchanged re-run is a scan, not a model load."""
    run_build([str(image_dir)], store_path, tiny_spec, BuildSettings(workers=1))
    again = _rerun(image_dir, store_path, tiny_spec.model_config)
    assert again == {"embedded": 0, "unchanged": 8, "heavy": []}
    scene(77).save(image_dir / "new.png")
    more = _rerun(image_dir, store_path, tiny_spec.model_config)
    assert more["embedded"] == 1 and "torch" in more["heavy"]


def test_deferred_model_still_refuses_a_changed_model(tiny_spec, image_dir, store_path,
                                                      tmp_path):
    """Same config path, different contents: caught when the first new file needs the model."""
    import json
    from pathlib import Path

    config = tmp_path / "clipdex-tiny.json"
    cfg = json.loads(Path(tiny_spec.model_config).read_text())
    config.write_text(json.dumps(cfg))
    spec = ModelSpec(name="clipdex-tiny", pretrained=None, random_init=True,
                     model_config=str(config), device="cpu")
    run_build([str(image_dir)], store_path, spec, BuildSettings(workers=1))
    cfg["embed_dim"] = 2 * cfg["embed_dim"]
    config.write_text(json.dumps(cfg))
    scene(78).save(image_dir / "new.png")
    with pytest.raises(ModelMismatchError, match="dim"):
        run_build([str(image_dir)], store_path, spec, BuildSettings(workers=1))
    with Store.open(store_path) as store:
        assert store.counts()["images"] == 8


def test_matches_stored_decides_without_the_model(tiny_spec, tiny_weights, image_dir,
                                                  store_path, tmp_path):
    from dataclasses import replace

    from indexer.embed import matches_stored

    weighted = ModelSpec(name="clipdex-tiny", pretrained=None, weights=tiny_weights,
                         model_config=tiny_spec.model_config, device="cpu")
    run_build([str(image_dir)], store_path, weighted, BuildSettings(workers=1))
    with Store.open(store_path) as store:
        stored = store.identity()
    assert matches_stored(weighted, stored)
    assert not matches_stored(replace(weighted, precision="int8"), stored)
    assert not matches_stored(tiny_spec, stored)  # random weights are not these weights
    other = tmp_path / "other.pt"
    other.write_bytes(b"x" + open(tiny_weights, "rb").read())
    assert not matches_stored(replace(weighted, weights=str(other)), stored)


def test_lazy_identity_is_the_loaded_models_identity(tiny_spec, model_builds):
    emb = OpenClipEmbedder(tiny_spec)
    before = emb.identity
    assert not emb.loaded and model_builds == []
    vec = emb.embed_pixels(emb.preprocess(scene(1))[None])
    assert emb.loaded and vec.shape == (1, before.dim) and emb.identity == before


def test_precision_is_recorded_and_a_store_never_mixes_modes(tiny_spec, image_dir, store_path):
    int8 = ModelSpec(**{**tiny_spec.__dict__, "precision": "int8"})
    run_build([str(image_dir)], store_path, int8, BuildSettings(workers=1))
    with Store.open(store_path) as st:
        assert st.manifest()["model"]["precision"] == "int8"
        n = st.counts()["vectors"]
    (image_dir / "extra").mkdir()
    scene(42).save(image_dir / "extra" / "x.png")
    with pytest.raises(ModelMismatchError, match="precision"):
        run_build([str(image_dir)], store_path, tiny_spec, BuildSettings(workers=1))
    with Store.open(store_path) as st:
        assert st.counts()["vectors"] == n  # nothing from the fp32 attempt got in


def test_int8_is_refused_on_cuda_and_fp16_on_cpu(tiny_spec):
    with pytest.raises(ClipdexError, match="CPU only"):
        OpenClipEmbedder(ModelSpec(**{**tiny_spec.__dict__, "precision": "int8",
                                      "device": "cuda"}))
    with pytest.raises(ClipdexError, match="CUDA"):
        OpenClipEmbedder(ModelSpec(**{**tiny_spec.__dict__, "precision": "fp16"}))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_offered_cpu_modes_stay_within_the_cosine_bar(precision):
    """ViT-B-32, random weights: each offered CPU mode is >= 0.999 cosine to fp32."""
    base = OpenClipEmbedder(ModelSpec(random_init=True, device="cpu"))
    mode = OpenClipEmbedder(ModelSpec(random_init=True, device="cpu", precision=precision))
    pixels = np.stack([base.preprocess(scene(i, (320, 240))) for i in range(8)])
    a, b = base.embed_pixels(pixels), mode.embed_pixels(pixels)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.999
