"""TFLite Model Metadata in every export: read back by tflite-support, inert on both interpreters, and used by the
platform classifiers apps run (MediaPipe's ImageClassifier, the TFLite Task Library) to name the classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from learning_helpers import learned_state
from PIL import Image

from daemon.common.settings import Settings
from daemon.export.converter import convert
from daemon.export.metadata import UNPUBLISHED, describe, stamp_version
from daemon.export.pipeline import export_once
from daemon.export.verification import EDGE_ROOT, default_tflite_runtime_python
from daemon.registry.signing import Signer
from daemon.registry.versions import Registry, registry_root
from edge.manifest import Quantization
from edge.model import EdgeModel

MODES = [q.value for q in Quantization]
SIZE = 32
REPO = Path(__file__).resolve().parents[1]
TASKS_PYTHON = Path(sys.prefix + "-tasks") / "bin" / "python"  # scripts/test-tools.sh makes it
CONSUMERS = ["mediapipe", "task-library"]


@pytest.fixture(scope="module")
def candidates(trained):
    """Each mode's converted bytes, before and after :func:`describe`, and the labels."""
    model, _, _, calibration = trained
    labels = ["class-0", "class-1", "class-2"]
    out = {}
    for mode in MODES:
        plain = convert(model, mode, SIZE, calibration if mode == "int8" else ())
        out[mode] = (
            plain,
            describe(plain, name="leaves", labels=labels, input_size=SIZE, base="tiny", quantization=mode),
        )
    return out, labels


def read_metadata(tflite: bytes) -> tuple[dict, dict[str, bytes]]:
    """The metadata as JSON and the attached files, as tflite-support's MetadataDisplayer reads them."""
    from tensorflow_lite_support.metadata.python.metadata import MetadataDisplayer

    shown = MetadataDisplayer.with_model_buffer(tflite)
    return (
        json.loads(shown.get_metadata_json()),
        {name: shown.get_associated_file_buffer(name) for name in shown.get_packed_associated_file_list()},
    )


def probabilities(runtime: str, tflite: bytes, images: np.ndarray, tmp: Path) -> np.ndarray | str:
    """The model's outputs on ``runtime`` through edge/probe.py, as the exporter's verification runs it; or why not."""
    python = sys.executable if runtime == "ai-edge-litert" else default_tflite_runtime_python()
    (tmp / "model.tflite").write_bytes(tflite)
    np.save(tmp / "images.npy", images)
    run = subprocess.run(
        [
            str(python),
            "-m",
            "edge.probe",
            "--runtime",
            runtime,
            "--threads",
            "1",
            tmp / "model.tflite",
            tmp / "images.npy",
            tmp / "out.npz",
        ],
        env={**os.environ, "PYTHONPATH": str(EDGE_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if run.returncode != 0:
        return run.stderr.strip().splitlines()[-1]
    with np.load(tmp / "out.npz") as saved:
        return saved["probabilities"]


def platform_classifier(consumer: str, model: Path, photos: list[Path]) -> dict | str:
    """tests/platform_classifiers.py in the platform classifiers' virtualenv: its JSON, or why the model did not load."""
    assert TASKS_PYTHON.exists(), f"{TASKS_PYTHON} is missing: run scripts/test-tools.sh (make test does)"
    run = subprocess.run(
        [TASKS_PYTHON, REPO / "tests" / "platform_classifiers.py", "--consumer", consumer, model, *photos],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(run.stdout) if run.returncode == 0 else run.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_carries_metadata_with_the_labels_and_the_input(candidates, mode):
    (models, labels) = candidates
    meta, files = read_metadata(models[mode][1])
    assert files == {"labels.txt": b"class-0\nclass-1\nclass-2\n"}
    assert (meta["name"], meta["version"], meta["author"]) == ("leaves", UNPUBLISHED, "Sprout")
    assert "3 labels" in meta["description"] and mode in meta["description"]
    (graph,) = meta["subgraph_metadata"]
    (image,), (output,) = graph["input_tensor_metadata"], graph["output_tensor_metadata"]
    assert image["content"] == {
        "content_properties_type": "ImageProperties",
        "content_properties": {"color_space": "RGB", "default_size": {"width": SIZE, "height": SIZE}},
    }
    assert image["stats"] == {"max": [255.0], "min": [0.0]}  # uint8 pixels as they are
    assert "process_units" not in image  # no normalisation options: the graph normalises
    assert "Normalisation is inside the model" in image["description"]
    assert output["associated_files"] == [
        {
            "name": "labels.txt",
            "type": "TENSOR_AXIS_LABELS",
            "description": "Labels for categories that the model can recognize.",
        }
    ]
    assert [line.decode() for line in files["labels.txt"].splitlines()] == labels


def test_metadata_is_absent_from_the_converters_output(candidates):
    """So the tests above show what describe() adds, not what the converter writes anyway."""
    from tensorflow_lite_support.metadata.python.metadata import MetadataDisplayer

    (models, _) = candidates
    with pytest.raises(ValueError, match="does not have metadata"):
        MetadataDisplayer.with_model_buffer(models["int8"][0])


@pytest.mark.parametrize("mode", MODES)
def test_described_and_stamped_files_compute_what_the_converter_made_on_both_interpreters(
    candidates,
    trained,
    mode,
    tmp_path,
):
    """The metadata changes no number on ai-edge-litert or tflite-runtime 2.14, before or after the version stamp."""
    (models, _) = candidates
    plain, described = models[mode]
    stamped = stamp_version(described, 12345)
    assert len(stamped) == len(described)
    changed = [i for i in range(len(described)) if described[i] != stamped[i]]
    assert 0 < len(changed) <= len(UNPUBLISHED) + 4 and changed[-1] - changed[0] < len(UNPUBLISHED) + 4
    assert read_metadata(stamped)[0]["version"] == "12345"
    images = trained[1]
    for runtime in ("ai-edge-litert", "tflite-runtime"):
        outputs = [probabilities(runtime, tflite, images, tmp_path) for tflite in (plain, described, stamped)]
        if mode == "dynamic" and runtime == "tflite-runtime":  # refused, with or without metadata (FC version 12)
            assert all(isinstance(o, str) and "FULLY_CONNECTED" in o for o in outputs), outputs
            assert outputs[0] == outputs[1] == outputs[2]
            continue
        assert not any(isinstance(o, str) for o in outputs), outputs
        assert np.array_equal(outputs[0], outputs[1]) and np.array_equal(outputs[0], outputs[2]), runtime


def unpacked(tflite: bytes, resolve_external: bool = False):
    """The model as ai-edge-litert's (current) TFLite schema reads it: a ModelT."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(tflite, 0))
    if resolve_external:  # weights stored after the flatbuffer, read in as describe() stores them
        for buffer in model.buffers:
            if buffer.offset > 1:
                buffer.data, buffer.offset, buffer.size = (
                    np.frombuffer(tflite, np.uint8, buffer.size, buffer.offset),
                    0,
                    0,
                )
    return model


def plain_values(value):
    """A ModelT (or any part of it) as nested dicts, lists and bytes: equal exactly when every field is."""
    if isinstance(value, np.ndarray):
        return value.dtype.str, value.tobytes()
    if isinstance(value, list):
        return [plain_values(v) for v in value]
    return {k: plain_values(v) for k, v in vars(value).items()} if hasattr(value, "__dict__") else value


def assert_only_metadata_added(plain: bytes, described: bytes) -> None:
    """The described model is the converter's, field for field, plus one buffer and one metadata entry."""
    before, after = unpacked(plain, resolve_external=True), unpacked(described)
    (added,) = [m for m in after.metadata if m.name == b"TFLITE_METADATA"]
    assert added.buffer == len(after.buffers) - 1 == len(before.buffers)
    after.metadata.remove(added)
    after.buffers.pop()
    assert plain_values(after) == plain_values(before)


@pytest.mark.parametrize("mode", MODES)
def test_describe_keeps_every_field_the_converter_wrote(candidates, mode):
    assert_only_metadata_added(*candidates[0][mode])


def test_weights_stored_after_the_flatbuffer_are_moved_inside_and_still_compute_the_same(trained, tmp_path):
    """ai-edge-quantizer stores fp16 weights after the flatbuffer once they pass 256 KB (EfficientNet-Lite0 does):
    here a 4,096-class head. The described file keeps every weight (inside the flatbuffer now), computes the same
    on both interpreters, and loads on the Task Library, whose TFLite could not read the converter's file."""
    from daemon.export.converter import snapshot
    from daemon.learning.head import GrowingHead
    from models.zoo import get

    model = trained[0]
    wide = snapshot(model.backbone, GrowingHead(model.head.embedding_size, 4096), get("tiny").preprocessing)
    plain = convert(wide, "fp16", SIZE)
    labels = [f"class-{i}" for i in range(4096)]
    assert any(b.offset > 1 for b in unpacked(plain).buffers)  # the case at hand: external weights
    described = describe(plain, name="leaves", labels=labels, input_size=SIZE, base="tiny", quantization="fp16")
    assert not any(b.offset > 1 for b in unpacked(described).buffers)
    assert_only_metadata_added(plain, described)
    assert read_metadata(described)[1]["labels.txt"].decode().splitlines() == labels
    images = trained[1][:4]
    for runtime in ("ai-edge-litert", "tflite-runtime"):
        before, after = (probabilities(runtime, tflite, images, tmp_path) for tflite in (plain, described))
        assert np.array_equal(before, after), (runtime, before, after)
    expected = after[0]  # tflite-runtime 2.14's, the Task Library's generation of TFLite
    Image.fromarray(images[0]).save(tmp_path / "photo.png")
    (tmp_path / "plain.tflite").write_bytes(plain)
    (tmp_path / "described.tflite").write_bytes(described)
    refused = platform_classifier("task-library", tmp_path / "plain.tflite", [tmp_path / "photo.png"])
    assert isinstance(refused, str) and "is not produced" in refused, refused
    named = platform_classifier("task-library", tmp_path / "described.tflite", [tmp_path / "photo.png"])
    assert isinstance(named, dict), named
    best = named["results"][0]["categories"][0]
    assert best["name"] == labels[best["index"]]
    assert abs(best["score"] - expected[best["index"]]) < 1e-4 and best["score"] > expected.max() - 1e-4


def test_stamp_version_refuses_what_it_cannot_stamp(candidates):
    (models, _) = candidates
    plain, described = models["fp16"]
    with pytest.raises(ValueError, match="no TFLite Model Metadata"):
        stamp_version(plain, 1)
    with pytest.raises(ValueError, match="not the placeholder"):
        stamp_version(stamp_version(described, 1), 2)
    with pytest.raises(ValueError, match="does not fit"):
        stamp_version(described, 10 ** len(UNPUBLISHED))


# -- The consumers: platform classifiers on published models -------------------------------------------------


@pytest.fixture(scope="module")
def published(candidates, tmp_path_factory):
    """Every mode's described candidate published by the registry, its version stamped in: (registry, mode -> version)."""
    (models, labels) = candidates
    tmp = tmp_path_factory.mktemp("published")
    registry = Registry(tmp / "registry", "leaves", Signer.load_or_create(tmp / "keys" / "signing.key"))
    fields = {
        "base": "tiny",
        "labels": labels,
        "metrics": {},
        "input": {"shape": [1, SIZE, SIZE, 3], "layout": "NHWC", "dtype": "uint8", "range": [0, 255]},
        "runtimes_verified": [{"name": "ai-edge-litert", "version": "2.3.0"}],
    }
    versions = {
        mode: registry.publish(models[mode][1], {**fields, "quantization": mode}, stamp=stamp_version)["version"]
        for mode in MODES
    }
    return registry, versions


@pytest.fixture(scope="module")
def photos(trained, tmp_path_factory) -> list[Path]:
    """Two holdout photos of each class, at the model's input size and lossless: every reader sees the same pixels."""
    _, images, labels, _ = trained
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for c in range(3):
        for k, i in enumerate(np.flatnonzero(labels == c)[:2]):
            paths.append(folder / f"class-{c}-{k}.png")
            Image.fromarray(images[i]).save(paths[-1])
    return paths


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_platform_classifiers_name_the_classes_of_every_published_mode_as_sprout_edge_classify_ranks_them(
    published, photos, consumer
):
    registry, versions = published
    for mode, version in versions.items():
        model = registry.model_path(version)
        labels = model.with_name("labels.txt").read_text().splitlines()
        out = platform_classifier(consumer, model, photos)
        if consumer == "task-library" and mode == "dynamic":
            # Its TFLite (2.13 era, as tflite-runtime 2.14) lacks FULLY_CONNECTED version 12, metadata or not.
            assert isinstance(out, str) and "FULLY_CONNECTED" in out and "'12'" in out, out
            continue
        assert isinstance(out, dict), f"{consumer} could not load the {mode} model: {out}"
        edge = EdgeModel.from_parts(registry.manifest(version), model.read_bytes(), runtime="ai-edge-litert")
        for photo, result in zip(photos, out["results"], strict=True):
            categories = result["categories"]
            assert [c["name"] for c in categories] == [labels[c["index"]] for c in categories]  # from labels.txt
            assert sorted(c["name"] for c in categories) == sorted(labels)
            ranked = edge.predict(photo, top=len(labels))  # what `sprout-edge classify` prints
            print(
                f"{consumer} {out['version']} v{version} {mode} {photo.name}: "
                f"{[(c['name'], round(c['score'], 4)) for c in categories]} | sprout-edge {ranked}"
            )
            assert categories[0]["name"] == ranked[0][0], (mode, photo.name, categories, ranked)
            scores = dict(ranked)
            assert all(abs(c["score"] - scores[c["name"]]) < 0.02 for c in categories), (mode, categories, ranked)


def test_an_export_publishes_the_verified_file_with_its_version_in_the_metadata(tmp_path, photos):
    """The daemon's own export: int8 (the default) verified on both interpreters, published as version 1."""
    state = learned_state(tmp_path)
    settings = Settings.load(
        None,
        {
            "state_dir": str(state),
            "model": {"name": "leaves", "backbone": "tiny", "input_size": SIZE},
            "training": {"mode": "head"},
        },
    )
    outcome = export_once(settings)
    assert outcome.published is not None and outcome.published["quantization"] == "int8", outcome.reasons
    registry = Registry.open_readonly(registry_root(state), "leaves")
    model = registry.model_path(1)
    meta, files = read_metadata(model.read_bytes())
    assert (meta["name"], meta["version"]) == ("leaves", "1")
    assert files["labels.txt"] == model.with_name("labels.txt").read_bytes()
    assert outcome.metrics["size_bytes"] == model.stat().st_size  # the stamp kept the verified file's length
    out = platform_classifier("mediapipe", model, photos)
    assert isinstance(out, dict), out
    assert {c["name"] for c in out["results"][0]["categories"]} == set(registry.manifest(1)["labels"])
