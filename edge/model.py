"""The installed model, ready to classify: what ``sprout-edge classify`` and an app built on this package use.

>>> model = EdgeModel.load("/var/lib/sprout-edge/maize")  # doctest: +SKIP
>>> model.predict("leaf.jpg", top=2)  # doctest: +SKIP
[('rust', 0.91), ('healthy', 0.06)]

Loading re-checks the file against its manifest (size and sha256) and the
interpreter's tensors against the manifest's input and labels, so a damaged
install or a manifest that does not describe its model fails here, with the
reason, rather than classifying wrongly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge.manifest import ManifestError, input_size, parse
from edge.modeldir import LABELS_FILE, MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE, ModelDir
from edge.preprocess import load_rgb
from edge.runtime import Session, available
from edge.trust import SignatureError, verify_document, verify_file

REINSTALL = "run `sprout-edge sync` to install it again"


class ModelError(Exception):
    """The model cannot be used as it is; the message says why and what to do."""


class ImageError(ValueError):
    """An image that cannot be read or decoded."""


class EdgeModel:
    """One version of a model loaded on one interpreter. Not thread-safe (see :class:`edge.runtime.Session`)."""

    def __init__(self, manifest: dict[str, Any], session: Session):
        self.manifest = manifest
        self.session = session
        self.version: int = manifest["version"]
        self.labels: list[str] = list(manifest["labels"])
        self.input_size = input_size(manifest)

    @classmethod
    def load(
        cls, folder: Path | str, runtime: str | None = None, threads: int = 2, public_key: Any = None
    ) -> EdgeModel:
        """The current version in ``folder`` (see edge/modeldir.py); :class:`edge.modeldir.NoModelInstalled` when none.

        ``runtime`` is ``ai-edge-litert`` or ``tflite-runtime``; None takes the first installed.
        With ``public_key`` the manifest's signature is checked again too.
        """
        installed = ModelDir(folder)
        version = installed.require_current()
        where = installed.version_dir(version)
        try:
            document = (where / MANIFEST_FILE).read_bytes()
            tflite = (where / MODEL_FILE).read_bytes()
            labels = (where / LABELS_FILE).read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise ModelError(f"version {version} in {folder} is incomplete ({err}); {REINSTALL}") from None
        try:
            if public_key is not None:  # the bytes first, as at install: nothing unchecked is parsed
                try:
                    signature = (where / SIGNATURE_FILE).read_bytes()
                except FileNotFoundError:
                    raise SignatureError("it was installed without a signature (sync --insecure)") from None
                verify_document(document, signature, public_key)
            manifest = parse(document)
            if manifest["version"] != version:
                raise ManifestError(f"{where / MANIFEST_FILE} describes version {manifest['version']}, not {version}")
            verify_file(manifest, tflite)
        except (ManifestError, SignatureError) as err:
            raise ModelError(f"installed version {version} in {folder} is damaged: {err}; {REINSTALL}") from None
        if labels != manifest["labels"]:
            raise ModelError(f"{where / LABELS_FILE} does not list the manifest's labels; {REINSTALL}")
        return cls.from_parts(manifest, tflite, runtime, threads)

    @classmethod
    def from_parts(
        cls, manifest: dict[str, Any], tflite: bytes, runtime: str | None = None, threads: int = 2
    ) -> EdgeModel:
        """Load ``tflite`` and check that its tensors are what ``manifest`` says (raises :class:`ModelError`)."""
        runtime = available(runtime)
        version = manifest.get("version")
        try:
            session = Session(tflite, runtime, threads)
        except (ValueError, RuntimeError) as err:  # what both interpreters raise for a model they cannot run
            raise ModelError(f"version {version} does not load on {runtime}: {' '.join(str(err).split())}") from None
        spec = manifest["input"]
        problems = []
        if session.input_shape != tuple(spec["shape"]):
            problems.append(f"the model takes {list(session.input_shape)}, the manifest says {spec['shape']}")
        if session.input_dtype != spec["dtype"]:
            problems.append(f"the model takes {session.input_dtype}, the manifest says {spec['dtype']}")
        if session.classes != len(manifest["labels"]):
            problems.append(f"the model has {session.classes} outputs, the manifest {len(manifest['labels'])} labels")
        if problems:
            raise ModelError(f"version {version} does not match its manifest: " + "; ".join(problems))
        return cls(manifest, session)

    @property
    def runtime(self) -> str:
        return self.session.runtime

    def check(self) -> None:
        """Run one image through the model; :class:`ModelError` when the output is not probabilities."""
        grey = np.full((1, self.input_size, self.input_size, 3), 128, dtype=np.uint8)
        try:
            probabilities, _ = self.session.probabilities(grey)
        except (ValueError, RuntimeError) as err:
            raise ModelError(f"version {self.version} fails to run on {self.runtime}: {err}") from None
        if not np.isfinite(probabilities).all():
            raise ModelError(f"version {self.version} gives NaN or infinite outputs on {self.runtime}")

    def pixels(self, image: bytes | str | Path) -> np.ndarray:
        """(size, size, 3) uint8 RGB of an encoded image or its path, as the model takes it (edge/preprocess.py)."""
        if isinstance(image, (str, Path)):
            try:
                data = Path(image).read_bytes()
            except OSError as err:
                raise ImageError(f"{image}: cannot read it ({err.strerror})") from None
        else:
            data = bytes(image)
        rgb = load_rgb(data, self.input_size)
        if rgb is None:
            name = image if isinstance(image, (str, Path)) else f"{len(data)} bytes"
            raise ImageError(f"{name}: not an image Pillow can decode (JPEG, PNG, WebP, ...)")
        return rgb

    def probabilities(self, image: bytes | str | Path) -> np.ndarray:
        """(classes,) float32 probabilities, in the order of :attr:`labels`."""
        probabilities, _ = self.session.probabilities(self.pixels(image)[None])
        return probabilities[0]

    def predict(self, image: bytes | str | Path, top: int = 5) -> list[tuple[str, float]]:
        """The ``top`` most likely labels with their scores, best first."""
        if top < 1:
            raise ValueError(f"top must be at least 1, not {top}")
        scores = self.probabilities(image)
        order = np.argsort(-scores, kind="stable")[:top]  # stable: a tie goes to the lower output index
        return [(self.labels[i], float(scores[i])) for i in order]
