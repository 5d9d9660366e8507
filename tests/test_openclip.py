"""The real open_clip path, on a tiny model config (random or file weights) and ViT-B-32."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer.build import BuildSettings
from indexer.embed import ModelSpec, OpenClipEmbedder
from indexer.errors import ModelMismatchError, WeightsUnavailableError
from search.app import open_searcher, run_build

from .conftest import near_copy, scene


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _pixels(emb, seed=0):
    return emb.preprocess(scene(seed))[None]


def test_random_init_is_recorded_and_reproducible(tiny_spec):
    a, b = OpenClipEmbedder(tiny_spec), OpenClipEmbedder(tiny_spec)
    assert a.identity.random_init and a.identity.weights_sha256 == "random-init"
    assert a.identity.dim == 32 and a.input_side == 32
    np.testing.assert_array_equal(a.embed_pixels(_pixels(a)), b.embed_pixels(_pixels(b)))


def test_weights_file_is_loaded_and_its_sha256_recorded(tiny_spec, tiny_weights):
    spec = ModelSpec(name="clipdex-tiny", pretrained=None, weights=tiny_weights,
                     model_config=tiny_spec.model_config, device="cpu")
    emb, rand = OpenClipEmbedder(spec), OpenClipEmbedder(tiny_spec)
    assert emb.identity.weights_sha256 == _sha(tiny_weights)
    assert not emb.identity.random_init
    assert not np.allclose(emb.embed_pixels(_pixels(emb)), rand.embed_pixels(_pixels(rand)))
    assert emb.embed_texts(["a red bridge"]).shape == (1, 32)


def test_offline_without_weights_says_what_to_do():
    with pytest.raises(WeightsUnavailableError) as err:
        OpenClipEmbedder(ModelSpec(device="cpu"))
    msg = str(err.value)
    assert "--weights" in msg and "CLIPDEX_WEIGHTS" in msg and "laion2b_s34b_b79k" in msg


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="not found"):
        ModelSpec(weights=str(tmp_path / "nope.safetensors"))


@pytest.mark.slow
def test_default_model_loads_offline_from_a_warm_hugging_face_cache(tmp_path):
    """The default ViT-B-32 / laion2b path, exactly as for a user whose HF cache is warm."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    torch.manual_seed(7)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(snap / "open_clip_model.safetensors"))
    # huggingface_hub reads HF_HOME at import: run the load in a fresh process, as a user would
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    code = ("import json, numpy as np; from indexer.embed import ModelSpec, OpenClipEmbedder; "
            "from PIL import Image; e = OpenClipEmbedder(ModelSpec(device='cpu')); "
            "v = e.embed_pixels(e.preprocess(Image.new('RGB', (300, 200), 'red'))[None]); "
            "print(json.dumps({**e.identity.to_dict(), 'finite': bool(np.isfinite(v).all())}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    ident = json.loads(out.stdout.strip().splitlines()[-1])
    assert (ident["name"], ident["pretrained"], ident["dim"]) == ("ViT-B-32",
                                                                   "laion2b_s34b_b79k", 512)
    assert ident["weights_sha256"] == _sha(snap / "open_clip_model.safetensors")
    assert not ident["random_init"] and ident["finite"]
    assert ident["preprocess"]["size"] == [224, 224]
    assert ident["preprocess"]["interpolation"] == "bicubic"


def test_build_and_search_with_the_tiny_model(tiny_spec, image_dir, store_path, tmp_path):
    near_copy(scene(3)).save(tmp_path / "q.jpg")
    result = run_build([str(image_dir)], store_path, tiny_spec, BuildSettings(workers=1))
    assert result.summary.embedded == 8 and result.index.ntotal == 8
    store, searcher = open_searcher(store_path, model_config=tiny_spec.model_config)
    with store:
        res = searcher.query("image", str(tmp_path / "q.jpg"), k=3)
        text = searcher.query("text", "a red bridge at night", k=3)
    assert res.hits[0].paths[0].endswith("scene3.jpg")
    assert text.ok and len(text.hits) == 3


def test_store_refuses_another_model(tiny_spec, tiny_weights, image_dir, store_path):
    run_build([str(image_dir)], store_path, tiny_spec, BuildSettings(workers=1))
    other = ModelSpec(name="clipdex-tiny", pretrained=None, weights=tiny_weights,
                      model_config=tiny_spec.model_config, device="cpu")
    with pytest.raises(ModelMismatchError, match="weights_sha256"):
        run_build([str(image_dir)], store_path, other, BuildSettings(workers=1))
    store, searcher = open_searcher(store_path, weights=tiny_weights,
                                    model_config=tiny_spec.model_config)
    with store:
        res = searcher.query("text", "anything", k=3)
    assert not res.ok and "different model" in res.error
    assert os.path.exists(store_path)
