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
