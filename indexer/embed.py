"""The model behind a tiny protocol: OpenCLIP for real work, a deterministic fake for unit tests.

torch and open_clip are imported inside the concrete class, so `clipdex --help` stays instant.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from .errors import ClipdexError, WeightsUnavailableError
from .preprocess import ClipPreprocess
from .preprocess import supported as preprocess_supported
from .types import FloatArray

log = logging.getLogger(__name__)

RANDOM_INIT = "random-init"
# Offered only when the minimum cosine to fp32 over the benchmark corpus is >= 0.999
# (benchmarks/build_throughput.py). int8 = dynamic quantisation of the nn.Linear layers (CPU).
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
# The identity fields: two embedders that agree on these produce comparable vectors.
IDENTITY_KEYS = ("name", "pretrained", "weights_sha256", "dim", "precision", "preprocess")


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for: a model config name, a pretrained tag and/or a weights file."""

    name: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"
    weights: str | None = None  # local checkpoint; wins over the tag's download
    random_init: bool = False  # explicit opt-in: benchmarks and tests only
    model_config: str | None = None  # a JSON open_clip config file registered under its stem
    device: str = "auto"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ClipdexError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.random_init and self.weights:
            raise ClipdexError("--random-weights and --weights exclude each other")
        if self.weights and not os.path.isfile(self.weights):
            raise WeightsUnavailableError(f"weights file not found: {self.weights}")


@dataclass(frozen=True)
class ModelIdentity:
    """What the store's manifest records about the model that made its vectors."""

    name: str
    pretrained: str | None
    weights_sha256: str
    dim: int
    precision: str
    preprocess: dict[str, Any]
    weights_path: str | None = None
    random_init: bool = False
    model_config: str | None = None
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelIdentity:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def differences(self, other: ModelIdentity) -> list[str]:
        """Identity fields that differ, as 'field: ours != theirs' strings."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in IDENTITY_KEYS if a[k] != b[k]]


class Embedder(Protocol):
    """Turns preprocessed pixels (or text) into L2-normalisable float32 vectors."""

    identity: ModelIdentity
    input_side: int

    @property
    def dim(self) -> int: ...

    @property
    def preprocess(self) -> Callable[[Image.Image], FloatArray]: ...

    def embed_pixels(self, batch: FloatArray) -> FloatArray: ...

    def embed_texts(self, texts: list[str]) -> FloatArray: ...


class _Base:
    """What every embedder derives from its identity and preprocessing."""

    identity: ModelIdentity
    _preprocess: Callable[[Image.Image], FloatArray]

    @property
    def dim(self) -> int:
        return self.identity.dim

    @property
    def preprocess(self) -> Callable[[Image.Image], FloatArray]:
        return self._preprocess


def sha256_file(path: str, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class TorchPreprocess:
    """open_clip's own transform, made picklable for decode workers; returns float32 numpy."""

    def __init__(self, transform: Callable[[Image.Image], Any]) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image) -> FloatArray:
        return np.ascontiguousarray(self.transform(image).numpy(), dtype=np.float32)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("clipdex", "open-clip-torch", "torch", "torchvision", "pillow", "faiss-cpu",
                "numpy", "lmdb"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _passive_openmp() -> None:
    """Let torch's OpenMP threads sleep, not spin, between parallel regions.

    libgomp's default spin-wait burns the cores the decode workers need while the main thread
    is in Python (batching, storing); with passive waiting the model alone is as fast and the
    whole build faster on the 2-core box (benchmarks/results/build_throughput.txt). Read once,
    when libgomp loads: it only applies if torch is not imported yet, and a user's own
    OMP_WAIT_POLICY wins.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _offline_help(spec: ModelSpec, err: Exception) -> str:
    return (
        f"could not get weights for {spec.name} / {spec.pretrained}: {err}\n"
        "Do one of:\n"
        "  - pass a local checkpoint: --weights /path/to/open_clip_model.safetensors "
        "(or set CLIPDEX_WEIGHTS=/path/...)\n"
        "  - run once with network access so open_clip caches the weights "
        "(Hugging Face cache, $HF_HOME)\n"
        "  - for benchmarks and tests only: --random-weights (recorded as random-init)"
    )


def _resolve_weights(spec: ModelSpec) -> tuple[str | None, str]:
    """Return (checkpoint path or None, sha256 or RANDOM_INIT) without building the model."""
    if spec.random_init:
        return None, RANDOM_INIT
    if spec.weights:
        return spec.weights, sha256_file(spec.weights)
    if not spec.pretrained:
        raise WeightsUnavailableError(_offline_help(spec, ValueError("no pretrained tag given")))
    from open_clip import pretrained as oc_pretrained

    cfg = oc_pretrained.get_pretrained_cfg(spec.name, spec.pretrained)
    if not cfg:
        raise WeightsUnavailableError(
            f"open_clip knows no pretrained tag {spec.pretrained!r} for {spec.name}; "
            f"known: {oc_pretrained.list_pretrained_tags_by_model(spec.name)}"
        )
    try:
        path = oc_pretrained.download_pretrained(cfg)
    except Exception as err:  # hub errors come in many types; all mean "not available"
        raise WeightsUnavailableError(_offline_help(spec, err)) from err
    if not path or not os.path.isfile(path):
        raise WeightsUnavailableError(_offline_help(spec, FileNotFoundError(path)))
    return path, sha256_file(path)


class OpenClipEmbedder(_Base):
    """An open_clip model with its own preprocessing; vectors are returned unnormalised.

    The identity (weights sha256, preprocessing, dim) and the preprocess transform are known at
    construction from the config alone; the network itself is built on the first embed call (or
    `load()`), so a build that finds nothing new never pays seconds for loading weights.
    """

    def __init__(self, spec: ModelSpec) -> None:
        _passive_openmp()
        import open_clip

        if spec.model_config:
            open_clip.add_model_config(spec.model_config)
        path, digest = _resolve_weights(spec)
        self.device = _resolve_device(spec.device)
        if spec.precision == "fp16" and self.device != "cuda":
            raise ClipdexError("fp16 needs a CUDA device; use int8, bf16 or fp32 on the CPU")
        if spec.precision == "int8" and self.device != "cpu":
            raise ClipdexError("int8 runs on the CPU only; use fp16 or bf16 on CUDA")
        self._spec, self._path = spec, path
        self._tag_cfg = self._tag_preprocess(spec)
        self._model: Any = None
        self._tokenizer: Any = None
        self.precision = spec.precision
        skeleton = self._skeleton()
        pcfg = dict(skeleton.visual.preprocess_cfg)
        # Pillow + numpy when it reproduces open_clip's transform exactly (decode workers then
        # never import torch); open_clip's own transform otherwise.
        self._preprocess = (
            ClipPreprocess(pcfg) if preprocess_supported(pcfg)
            else TorchPreprocess(_eval_transform(pcfg)))
        self.input_side = int(min(pcfg["size"]) if isinstance(pcfg["size"], tuple | list)
                              else pcfg["size"])
        self.identity = ModelIdentity(
            name=spec.name,
            pretrained=None if spec.random_init else spec.pretrained,
            weights_sha256=digest,
            dim=_output_dim(skeleton, self.input_side),
            precision=spec.precision,
            preprocess=_plain(pcfg),
            weights_path=os.path.abspath(path) if path else None,
            random_init=spec.random_init,
            model_config=os.path.abspath(spec.model_config) if spec.model_config else None,
            versions=library_versions(),
        )

    def _skeleton(self) -> Any:
        """The model built on the meta device: its config and shapes, no weights, no memory."""
        import open_clip
        import torch

        quiet = _DropMessage("No pretrained weights loaded")  # not true of the real model
        logging.getLogger().addFilter(quiet)
        try:
            with torch.device("meta"):
                return open_clip.create_model(self._spec.name, pretrained=None, device="meta",
                                              force_preprocess_cfg=_force_cfg(self._tag_cfg))
        finally:
            logging.getLogger().removeFilter(quiet)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Build the network and load its weights (idempotent)."""
        if self._model is not None:
            return
        import open_clip
        import torch

        spec = self._spec
        if spec.random_init:
            torch.manual_seed(0)  # random weights, but the same ones on every load
        try:
            model = open_clip.create_model(spec.name, pretrained=self._path, device=self.device,
                                           force_preprocess_cfg=_force_cfg(self._tag_cfg))
        except RuntimeError as err:
            raise WeightsUnavailableError(
                f"cannot load {self._path} into {spec.name}: {err}") from err
        if _plain(dict(model.visual.preprocess_cfg)) != self.identity.preprocess:
            raise ClipdexError(f"{spec.name}: loaded preprocessing "
                               f"{model.visual.preprocess_cfg} != planned "
                               f"{self.identity.preprocess}")
        model.eval()
        if self.precision == "int8":
            model = _quantize_int8(model)
        self._tokenizer = open_clip.get_tokenizer(spec.name)
        self._model = model
        if spec.random_init:
            log.warning("model %s uses RANDOM weights: embeddings are not meaningful", spec.name)

    @staticmethod
    def _tag_preprocess(spec: ModelSpec) -> dict[str, Any]:
        """Mean/std/interpolation of the pretrained tag, also when weights come from a file."""
        if not spec.pretrained or spec.random_init:
            return {}
        from open_clip import pretrained as oc_pretrained

        cfg = oc_pretrained.get_pretrained_cfg(spec.name, spec.pretrained) or {}
        keys = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
                "resize_mode": "image_resize_mode"}
        return {arg: cfg[k] for k, arg in keys.items() if k in cfg}

    def _autocast(self) -> Any:
        import torch

        if self.precision in ("fp32", "int8"):
            return torch.autocast(self.device, enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device, dtype=dtype)

    def embed_pixels(self, batch: FloatArray) -> FloatArray:
        import torch

        self.load()
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        with torch.inference_mode(), self._autocast():
            out = self._model.encode_image(x)
        return out.float().cpu().numpy()

    def embed_texts(self, texts: list[str]) -> FloatArray:
        import torch

        self.load()
        tokens = self._tokenizer(texts).to(self.device)
        with torch.inference_mode(), self._autocast():
            out = self._model.encode_text(tokens)
        return out.float().cpu().numpy()


class DeferredEmbedder(_Base):
    """A store's own model, kept unbuilt until something needs embedding.

    An unchanged re-run of `index build` should cost a scan and some LMDB look-ups; importing
    torch + open_clip (~4 s) and building the model (~2 s) would be most of it. When the store's
    manifest already names the asked-for model (see `matches_stored`), this carries the stored
    identity and open_clip's pixels (`ClipPreprocess`, no torch); the first embed call builds the
    real `OpenClipEmbedder` and refuses to go on if its identity differs from the stored one.
    """

    def __init__(self, spec: ModelSpec, stored: ModelIdentity, where: str) -> None:
        self._spec, self._where = spec, where
        self.identity = stored
        self._preprocess = ClipPreprocess(stored.preprocess)
        self.input_side = self._preprocess.side
        self._real: OpenClipEmbedder | None = None

    @property
    def loaded(self) -> bool:
        return self._real is not None and self._real.loaded

    def load(self) -> None:
        self._model().load()

    def _model(self) -> OpenClipEmbedder:
        if self._real is None:
            from .store import check_identity

            real = OpenClipEmbedder(self._spec)
            check_identity(self.identity, real.identity, self._where)
            self._real = real
        return self._real

    def embed_pixels(self, batch: FloatArray) -> FloatArray:
        return self._model().embed_pixels(batch)

    def embed_texts(self, texts: list[str]) -> FloatArray:
        return self._model().embed_texts(texts)


def matches_stored(spec: ModelSpec, stored: ModelIdentity) -> bool:
    """Whether `spec` asks for exactly the model a store records, decided without open_clip.

    Cheap fields first; weights are compared by sha256 of the file (the recorded path, for a
    pretrained tag resolved through the Hugging Face cache). False means "can't tell
    cheaply": the caller builds the real embedder, whose identity check is the final word.
    """
    config = os.path.abspath(spec.model_config) if spec.model_config else None
    if (spec.name, spec.precision, config) != (stored.name, stored.precision,
                                               stored.model_config):
        return False
    if not preprocess_supported(stored.preprocess):
        return False
    if spec.random_init or stored.random_init:
        return spec.random_init and stored.random_init
    if spec.weights:
        path = os.path.abspath(spec.weights)
    elif spec.pretrained and spec.pretrained == stored.pretrained and stored.weights_path:
        path = stored.weights_path
    else:
        return False
    return os.path.isfile(path) and sha256_file(path) == stored.weights_sha256


def _quantize_int8(model: Any) -> Any:
    """Dynamic int8 quantisation of every nn.Linear (weights int8, activations per batch)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao (not a dependency); the
        # eager API still works in the pinned torch, and the benchmark re-checks its accuracy.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear},
                                                      dtype=torch.qint8)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _force_cfg(tag_cfg: dict[str, Any]) -> dict[str, Any]:
    from open_clip.transform import merge_preprocess_kwargs

    return dict(merge_preprocess_kwargs({}, **tag_cfg))


def _eval_transform(pcfg: dict[str, Any]) -> Callable[[Image.Image], Any]:
    """open_clip's own inference transform for a preprocess config (what create_model_and_
    transforms returns as its second transform)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**pcfg), is_train=False)


def _output_dim(skeleton: Any, side: int) -> int:
    proj = getattr(skeleton, "text_projection", None)
    if proj is not None and hasattr(proj, "shape"):
        return int(proj.shape[1])
    import torch

    with torch.inference_mode():  # shape inference only: meta tensors hold no data
        return int(skeleton.encode_image(torch.zeros(1, 3, side, side, device="meta")).shape[1])


def _plain(pcfg: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in pcfg.items()}


class _FakePreprocess:
    def __init__(self, side: int) -> None:
        self.side = side

    def __call__(self, image: Image.Image) -> FloatArray:
        small = image.convert("RGB").resize((self.side, self.side), Image.Resampling.BILINEAR)
        arr = np.asarray(small, dtype=np.float32) / 255.0 - 0.5
        return np.ascontiguousarray(arr.transpose(2, 0, 1))


class FakeEmbedder(_Base):
    """Deterministic stand-in for unit tests: a fixed random projection of an 8x8 thumbnail.

    Visually similar images get similar vectors, which is all the pipeline tests need.
    """

    def __init__(self, dim: int = 16, side: int = 8, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self._proj = rng.standard_normal((3 * side * side, dim)).astype(np.float32)
        self.input_side = side
        self._preprocess = _FakePreprocess(side)
        self.identity = ModelIdentity(
            name="fake", pretrained=None, weights_sha256=f"fake-seed-{seed}", dim=dim,
            precision="fp32", preprocess={"size": [side, side], "resample": "bilinear"},
            random_init=True,
        )

    def embed_pixels(self, batch: FloatArray) -> FloatArray:
        return (batch.reshape(len(batch), -1) @ self._proj).astype(np.float32)

    def embed_texts(self, texts: list[str]) -> FloatArray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little")
            out[i] = np.random.default_rng(seed).standard_normal(self.dim)
        return out


def spec_for_identity(ident: ModelIdentity, weights: str | None = None,
                      model_config: str | None = None, device: str = "auto") -> ModelSpec:
    """The spec that reloads the model a store was built with (weights may be overridden)."""
    if weights is None and ident.weights_path and os.path.isfile(ident.weights_path):
        weights = ident.weights_path
    # An explicit weights file always wins, so a mismatch with the store is seen, not hidden.
    random_init = ident.random_init and weights is None
    return ModelSpec(name=ident.name, pretrained=ident.pretrained, weights=weights,
                     random_init=random_init,
                     model_config=model_config or ident.model_config, device=device,
                     precision=ident.precision)
