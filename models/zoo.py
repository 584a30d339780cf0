"""The model zoo: backbone name -> architecture, shipped ImageNet weights, and the preprocessing they expect.

Weights ship inside installed packages; nothing is downloaded. Each shipped
file is mapped key by key onto our parameter names, strictly: a key that maps
nowhere, or a parameter that nothing fills, is an error, never a silent
partial load.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models import efficientnet_lite, mobilenet_v2
from models.layers import Backbone, ConvBNAct

__all__ = [
    "Backbone",
    "BackboneSpec",
    "Preprocessing",
    "build_starting_network",
    "get",
    "load_backbone",
    "load_weights",
    "names",
]

KeyMap = Callable[[str], tuple[str, str] | None]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Google trained the Lite models on (pixel - 127) / 128, i.e. mean 127/255 and std 128/255 on 0..1 pixels.
# Checked on scikit-image's photos (the crop tests/test_models.py uses), top-1 probability with these vs ImageNet's:
# chelsea (a cat) 0.38 vs 0.38, and 0.91 vs 0.87 summed over the cat classes 281-285; coffee (espresso,
# 967) 0.96 vs 0.84. Both classify correctly; the network is more certain under the normalisation it was
# trained with, so that is the one.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True, slots=True)
class Preprocessing:
    input_size: int  # square side in pixels the weights were trained at
    mean: tuple[float, float, float]  # per RGB channel, on pixels scaled to 0..1
    std: tuple[float, float, float]


@dataclass(frozen=True, slots=True)
class BackboneSpec:
    name: str
    embedding_size: int
    preprocessing: Preprocessing
    build: Callable[[], Backbone]  # the architecture, random init
    pretrained: Callable[[], dict[str, torch.Tensor]] | None  # shipped weights under our names, classifier excluded
    imagenet_head: Callable[[], nn.Linear] | None  # the shipped 1000-class classifier
    map_key: KeyMap | None = None  # the shipped file's key -> ("backbone" | "classifier", our key); None if foreign


class TinyBackbone(Backbone):
    """Three strided convs to 32 channels, random init: for tests that need a backbone, not a good one."""

    name = "tiny"
    embedding_size = 32

    def __init__(self) -> None:
        super().__init__(nn.Sequential(ConvBNAct(3, 8, 3, 2), ConvBNAct(8, 16, 3, 2), ConvBNAct(16, 32, 3, 2)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    # Real backbones give embeddings averaging ~0.5-0.8 per dimension (EfficientNet-Lite0, MobileNetV2 on
    # photos at 128 px); three random convs give ~0.07. The gain puts tiny's in the same range, so tests
    # on it exercise the head's optimiser as a real backbone would.
    GAIN = 10.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Before the pooling, not after: the converter folds a constant multiply after it into the classifier's
        # weights, and the export then could not write a new head into the file (daemon/export/head_patch.py).
        return (self.features(x) * self.GAIN).mean(dim=(2, 3))


def names() -> list[str]:
    return list(_SPECS)


def get(name: str) -> BackboneSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}: choose one of {', '.join(_SPECS)}") from None


def load_backbone(name: str, pretrained: bool = True) -> Backbone:
    """Build ``name`` and load its shipped weights strictly.

    "tiny" has no weights by design, so it comes back random-init either way.
    """
    spec = get(name)
    backbone = spec.build()
    if pretrained and spec.pretrained is not None:
        backbone.load_state_dict(spec.pretrained(), strict=True)
    return backbone


def build_starting_network(name: str, *, weights_file: str | Path | None = None, seed: int | None = None) -> Backbone:
    """The backbone learning starts from: ``name`` with its shipped weights, then ``weights_file`` over them.

    Built under ``seed`` (inside ``fork_rng``, so the caller's random state is untouched): a backbone without
    shipped weights ("tiny") gets the same random init wherever it is built. The learner builds it at its
    start and when it falls back to it; an export rebuilds it for a checkpoint that stores only the head.

    >>> a, b = build_starting_network("tiny", seed=1), build_starting_network("tiny", seed=1)
    >>> all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    True
    """
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        backbone = load_backbone(name)
    if weights_file is not None:
        load_weights(backbone, weights_file)
    return backbone


def load_weights(backbone: Backbone, path: str | Path) -> None:
    """Load a user's own weights into ``backbone``: a torch.save'd state_dict, ours or the original file's key names.

    Also accepted: ``{"state_dict": ...}`` and ``{"backbone": name, "state_dict": ...}``
    (the name must match). Classifier keys of the original layout are ignored;
    anything else that does not fit raises ValueError saying which keys.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a state_dict saved with torch.save: {err}") from None
    state = _unwrap(loaded, backbone.name, path)
    spec = _SPECS.get(backbone.name)
    map_key = spec.map_key if spec is not None else None
    own, _ = _rename(state, map_key, backbone.state_dict(), f"{path} (backbone {backbone.name!r})")
    backbone.load_state_dict(own, strict=True)


def shipped_state(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The shipped file of ``name`` split into (backbone state_dict, classifier weight and bias), strictly mapped."""
    spec = get(name)
    path = _WEIGHTS[name]()
    state = torch.load(path, map_location="cpu", weights_only=True)
    expected = spec.build().state_dict()
    return _rename(state, spec.map_key, expected, f"{path} (backbone {name!r})", expect_classifier=True)


def _unwrap(loaded: object, name: str, path: str | Path) -> Mapping[str, torch.Tensor]:
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        saved_for = loaded.get("backbone")
        if saved_for is not None and saved_for != name:
            raise ValueError(f"{path} holds weights for backbone {saved_for!r}, not {name!r}: pick that backbone")
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise ValueError(f"{path} is not a state_dict (a mapping of parameter names to tensors)")
    return loaded


def _rename(
    state: Mapping[str, torch.Tensor],
    map_key: KeyMap | None,
    expected: Mapping[str, torch.Tensor],
    source: str,
    expect_classifier: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split ``state`` into (our backbone keys, classifier); every key must land exactly once where it fits."""
    own: dict[str, torch.Tensor] = {}
    classifier: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    twice: list[str] = []
    for key, tensor in state.items():
        mapped = ("backbone", key) if key in expected or map_key is None else map_key(key)
        if mapped is None or (mapped[0] == "backbone" and mapped[1] not in expected):
            unexpected.append(key)
            continue
        part, target = mapped
        into = own if part == "backbone" else classifier
        if target in into:
            twice.append(key)
        else:
            into[target] = tensor
    missing = [k for k in expected if k not in own]
    wrong_shape = [
        f"{k} is {tuple(own[k].shape)}, needs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in own and own[k].shape != v.shape
    ]
    if expect_classifier:
        missing += [f"classifier {k}" for k in ("weight", "bias") if k not in classifier]
    found = {"missing": missing, "unexpected": unexpected, "given twice": twice, "wrong shape": wrong_shape}
    problems = [f"{len(keys)} {label}: {_listing(keys)}" for label, keys in found.items() if keys]
    if problems:
        raise ValueError(f"{source} does not fit: " + "; ".join(problems))
    return own, classifier


def _listing(keys: list[str], shown: int = 8) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def _pretrained(name: str) -> Callable[[], dict[str, torch.Tensor]]:
    return lambda: shipped_state(name)[0]


def _imagenet_head(name: str, embedding_size: int) -> Callable[[], nn.Linear]:
    def build() -> nn.Linear:
        head = nn.Linear(embedding_size, 1000)
        head.load_state_dict(shipped_state(name)[1], strict=True)
        return head

    return build


_WEIGHTS: dict[str, Callable[[], Path]] = {
    "efficientnet_lite0": efficientnet_lite.weights_path,
    "mobilenet_v2": mobilenet_v2.weights_path,
}

_SPECS: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        name="efficientnet_lite0",
        embedding_size=efficientnet_lite.HEAD_CHANNELS,
        preprocessing=Preprocessing(224, LITE_MEAN, LITE_STD),
        build=efficientnet_lite.EfficientNetLite0,
        pretrained=_pretrained("efficientnet_lite0"),
        imagenet_head=_imagenet_head("efficientnet_lite0", efficientnet_lite.HEAD_CHANNELS),
        map_key=efficientnet_lite.map_key,
    ),
    "mobilenet_v2": BackboneSpec(
        name="mobilenet_v2",
        embedding_size=mobilenet_v2.HEAD_CHANNELS,
        preprocessing=Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD),
        build=mobilenet_v2.MobileNetV2,
        pretrained=_pretrained("mobilenet_v2"),
        imagenet_head=_imagenet_head("mobilenet_v2", mobilenet_v2.HEAD_CHANNELS),
        map_key=mobilenet_v2.map_key,
    ),
    "tiny": BackboneSpec(
        name="tiny",
        embedding_size=TinyBackbone.embedding_size,
        preprocessing=Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        build=TinyBackbone,
        pretrained=None,
        imagenet_head=None,
        map_key=None,
    ),
}
