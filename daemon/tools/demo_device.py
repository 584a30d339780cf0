"""The demo's device: a phone in the field that follows the daemon's models, and its top-1 at the end."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from daemon.common.settings import Settings
from daemon.tools.datasets import arrange, fashion_mnist_samples, iter_encoded


class DemoDevice(threading.Thread):
    """A phone in the field: ``sprout-edge sync --watch`` against the daemon, told of new models by the notice."""

    def __init__(self, settings: Settings, address: str, say: Callable[[str], None]):
        super().__init__(name="sprout-demo-device", daemon=True)
        self.settings = settings
        self.say = say  # a line for the person watching
        self.url = f"http://{address}"
        self.folder = settings.state_dir / "device"
        self.public_key = settings.signing.resolved_key_file(settings.state_dir).with_suffix(".pub")
        self.stop_event = threading.Event()

    def run(self) -> None:
        from edge.sync import COMPLETED, DELTA, FAILED, FULL
        from edge.watch import watch

        said = {"waiting": False}

        def on_event(event: Any) -> None:
            if event.kind == COMPLETED:
                if event.transfer == DELTA:
                    how = f"a {event.downloaded / 1e3:.1f} kB delta for {event.total / 1e6:.2f} MB"
                elif event.transfer == FULL:
                    how = f"full file, {event.downloaded / 1e6:.2f} MB"
                else:  # kept from before (a rollback): nothing downloaded
                    how = f"{event.total / 1e6:.2f} MB, already here"
                self.say(f"device: installed version {event.version} ({how}), verified")
            elif event.kind == FAILED and event.version is None:
                if not said["waiting"]:  # before the first publish every poll fails alike: say it once
                    said["waiting"] = True
                    self.say("device: no model published yet; waiting for the notice")
            elif event.kind == FAILED:
                self.say(f"device: refused version {event.version}: {event.reason}")

        s = self.settings
        watch(
            self.url,
            s.model.name,
            self.folder,
            self.public_key,
            on_event=on_event,
            mqtt_url=s.mqtt.broker,
            topic_prefix=s.mqtt.topic_prefix,
            interval_s=30.0,
            stop=self.stop_event,
        )

    def stop(self) -> None:
        self.stop_event.set()
        self.join(15.0)


def device_summary(device: DemoDevice, photos: int = 200) -> dict[str, Any]:
    """The device's view at the end: its model (one last sync first), then its top-1 on unseen photos.

    The photos are Fashion-MNIST's test set, which the daemon never saw, encoded as an app sends them.
    """
    from edge.model import EdgeModel
    from edge.sync import sync

    device.stop()
    folder, public_key, url = device.folder, device.public_key, device.url
    result = sync(url, device.settings.model.name, folder, public_key)
    if not result.ok:
        return {"synced": False, "reason": result.reason}
    model = EdgeModel.load(folder, public_key=public_key)
    samples = arrange(fashion_mnist_samples("t10k"), "iid", None, seed=1, limit=photos)
    right = sum(
        model.predict(payload, 1)[0][0] == sample.label for sample, payload, _ in iter_encoded(samples, 224, "jpeg")
    )
    return {
        "synced_from": url,
        "folder": str(folder),
        "version": model.version,
        "quantization": model.manifest["quantization"],
        "runtime": f"{model.runtime} {model.session.version}",
        "test_photos": len(samples),
        "top1_on_device": right / len(samples),
        "try": f"sprout-edge classify --dir {folder} PHOTO.jpg",
    }
