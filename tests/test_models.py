"""The model zoo: shipped weights map key for key, real photos get their ImageNet class, user weights load strictly."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from models import efficientnet_lite, mobilenet_v2, zoo
from models.layers import Backbone, ClampedReLU6, TFSamePad

REAL = ["efficientnet_lite0", "mobilenet_v2"]
SHIPPED = {
    "efficientnet_lite0": (efficientnet_lite.weights_path, efficientnet_lite.WEIGHTS_SHA256, 296),
    "mobilenet_v2": (mobilenet_v2.weights_path, mobilenet_v2.WEIGHTS_SHA256, 314),
}
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP, COFFEE_MUG = 967, 968, 504


class Network:
    """A real backbone with its shipped weights and ImageNet classifier, loaded once per module."""

    def __init__(self, name: str):
        self.spec = zoo.get(name)
        self.backbone = zoo.load_backbone(name).eval()
        assert self.spec.imagenet_head is not None, f"{name}: no shipped ImageNet classifier"
        self.head = self.spec.imagenet_head().eval()

    def probabilities(self, photo: np.ndarray, backbone: Backbone | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.head((backbone or self.backbone)(imagenet_input(photo, self.spec.preprocessing))).softmax(1)[0]


@pytest.fixture(scope="module")
def networks() -> dict[str, Network]:
    return {name: Network(name) for name in REAL}


def imagenet_input(photo: np.ndarray, pre: zoo.Preprocessing) -> torch.Tensor:
    """The standard evaluation crop: shorter side to 256 (bilinear), centre 224, scaled to 0..1, normalised."""
    img = Image.fromarray(photo)
    w, h = img.size
    scale = 256 / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
    w, h = img.size
    left, top = (w - pre.input_size) // 2, (h - pre.input_size) // 2
    img = img.crop((left, top, left + pre.input_size, top + pre.input_size))
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    return ((pixels - mean) / std).unsqueeze(0)


@pytest.mark.parametrize("name", REAL)
def test_every_shipped_key_maps_exactly_once(name: str):
    path, sha256, count = SHIPPED[name]
    assert hashlib.sha256(path().read_bytes()).hexdigest() == sha256, "not the weight file the key map was written for"
    original = torch.load(path(), map_location="cpu", weights_only=True)
    assert len(original) == count
    spec = zoo.get(name)
    assert spec.map_key is not None, f"{name}: shipped weights without a key map"
    targets = [spec.map_key(key) for key in original]
    assert None not in targets, [k for k, t in zip(original, targets, strict=True) if t is None]
    mapped = [t for t in targets if t is not None]  # all of them
    uses = Counter(mapped)
    assert max(uses.values()) == 1, [t for t, n in uses.items() if n > 1]
    ours = set(spec.build().state_dict())
    assert {key for part, key in mapped if part == "backbone"} == ours
    assert {key for part, key in mapped if part == "classifier"} == {"weight", "bias"}


@pytest.mark.parametrize("name", REAL)
def test_shipped_weights_load_strictly_and_unchanged(name: str, networks: dict[str, Network]):
    original = torch.load(SHIPPED[name][0](), map_location="cpu", weights_only=True)
    spec, backbone, head = networks[name].spec, networks[name].backbone, networks[name].head
    loaded = backbone.state_dict()
    assert spec.map_key is not None, f"{name}: shipped weights without a key map"
    for key, tensor in original.items():
        mapped = spec.map_key(key)
        assert mapped is not None, key
        part, target = mapped
        assert torch.equal((loaded if part == "backbone" else head.state_dict())[target], tensor), key
    assert backbone.embedding_size == spec.embedding_size == 1280
    assert head.in_features == 1280 and head.out_features == 1000


@pytest.mark.parametrize("name", REAL)
def test_chelsea_is_a_cat(name: str, networks: dict[str, Network]):
    p = networks[name].probabilities(data.chelsea())
    assert int(p.argmax()) in CAT_CLASSES
    assert float(p[CAT_CLASSES.start : CAT_CLASSES.stop].sum()) > 0.8


@pytest.mark.parametrize("name", REAL)
def test_coffee_is_an_espresso(name: str, networks: dict[str, Network]):
    p = networks[name].probabilities(data.coffee())
    assert int(p.argmax()) in (ESPRESSO, CUP, COFFEE_MUG)
    assert ESPRESSO in p.topk(3).indices.tolist()
    assert float(p[ESPRESSO]) > 0.5


@pytest.mark.parametrize("name", REAL)
def test_random_init_does_not_see_the_cat(name: str, networks: dict[str, Network]):
    """The photo tests pass because of the weights, not by chance: the same network untrained is lost."""
    torch.manual_seed(0)
    fresh = zoo.get(name).build().eval()
    p = networks[name].probabilities(data.chelsea(), fresh)
    assert float(p[CAT_CLASSES.start : CAT_CLASSES.stop].sum()) < 0.1


@pytest.mark.parametrize("name", REAL)
def test_blocks_cover_every_parameter_in_order(name: str, networks: dict[str, Network]):
    backbone = networks[name].backbone
    blocks = backbone.blocks()
    assert len(blocks) == {"efficientnet_lite0": 18, "mobilenet_v2": 19}[name]
    assert sum(p.numel() for b in blocks for p in b.parameters()) == sum(p.numel() for p in backbone.parameters())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = x
        for block in blocks:
            y = block(y)
        assert torch.equal(y.mean(dim=(2, 3)), backbone(x))


def wrapped(state: dict[str, torch.Tensor], form: str, name: str) -> object:
    return {"plain": state, "wrapped": {"state_dict": state}, "named": {"backbone": name, "state_dict": state}}[form]


@pytest.mark.parametrize("form", ["plain", "wrapped", "named"])
def test_load_weights_round_trip(form: str, networks: dict[str, Network], tmp_path: Path):
    source = networks["mobilenet_v2"].backbone
    path = tmp_path / "weights.pt"
    torch.save(wrapped(source.state_dict(), form, "mobilenet_v2"), path)
    target = zoo.get("mobilenet_v2").build().eval()
    zoo.load_weights(target, path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("name", REAL)
def test_load_weights_takes_the_original_key_names(name: str, networks: dict[str, Network], tmp_path: Path):
    original = torch.load(SHIPPED[name][0](), map_location="cpu", weights_only=True)
    path = tmp_path / "original.pt"
    torch.save({"backbone": name, "state_dict": original}, path)  # classifier keys included: ignored
    target = zoo.get(name).build().eval()
    zoo.load_weights(target, path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(target(x), networks[name].backbone(x))


def test_load_weights_refuses_another_backbones_file(tmp_path: Path):
    path = tmp_path / "weights.pt"
    torch.save({"backbone": "mobilenet_v2", "state_dict": zoo.get("tiny").build().state_dict()}, path)
    with pytest.raises(ValueError, match="'mobilenet_v2', not 'tiny'"):
        zoo.load_weights(zoo.get("tiny").build(), path)


def test_load_weights_names_a_missing_key(tmp_path: Path):
    state = zoo.get("tiny").build().state_dict()
    del state["features.1.conv.weight"]
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"1 missing: features\.1\.conv\.weight"):
        zoo.load_weights(zoo.get("tiny").build(), path)


def test_load_weights_names_an_unexpected_key_and_a_wrong_shape(tmp_path: Path):
    state = zoo.get("tiny").build().state_dict()
    state["features.9.conv.weight"] = torch.zeros(1)
    state["features.0.bn.bias"] = torch.zeros(5)
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"unexpected: features\.9\.conv\.weight.*wrong shape: features\.0\.bn\.bias"):
        zoo.load_weights(zoo.get("tiny").build(), path)


def test_load_weights_refuses_what_is_not_a_state_dict(tmp_path: Path):
    path = tmp_path / "weights.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="not a state_dict"):
        zoo.load_weights(zoo.get("tiny").build(), path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a state_dict"):
        zoo.load_weights(zoo.get("tiny").build(), path)


def test_tiny_backbone():
    spec = zoo.get("tiny")
    backbone = zoo.load_backbone("tiny")
    size = spec.preprocessing.input_size
    assert backbone(torch.randn(4, 3, size, size)).shape == (4, 32) == (4, spec.embedding_size)
    assert backbone.blocks()
    assert spec.pretrained is None and spec.imagenet_head is None


def test_names_and_unknown_backbone():
    assert zoo.names() == ["efficientnet_lite0", "mobilenet_v2", "tiny"]
    with pytest.raises(ValueError, match="efficientnet_lite0, mobilenet_v2, tiny"):
        zoo.get("nope")


def test_clamped_relu6_equals_relu6():
    x = torch.cat([torch.randn(10_000) * 8, torch.tensor([-6.0, -0.0, 0.0, 6.0, 6.0001, float("inf")])])
    assert torch.equal(ClampedReLU6()(x), F.relu6(x))


@pytest.mark.parametrize(
    ("size", "kernel", "pads"), [(224, 3, (0, 1)), (225, 3, (1, 1)), (112, 5, (1, 2)), (7, 5, (2, 2))]
)
def test_tf_same_padding_puts_the_extra_pixel_bottom_right(size: int, kernel: int, pads: tuple[int, int]):
    x = torch.ones(1, 1, size, size)
    y = TFSamePad(kernel, 2)(x)
    assert y.shape[-1] == size + sum(pads)
    assert y[0, 0, pads[0], pads[0]] == 1 and y[0, 0, -1 - pads[1], -1 - pads[1]] == 1
    assert y[0, 0, :, : pads[0]].sum() == 0 and y[0, 0, :, y.shape[-1] - pads[1] :].sum() == 0
