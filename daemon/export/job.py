"""What one export needs of the settings: its own sections, and no more, sent to the export process as JSON.

The export process (daemon/export/child.py) reads an :class:`ExportJob` on its
stdin: the export and model sections, the registry's and the signing key's
(it publishes), and the two figures of the training section an export uses.
The broker's password, the HTTP token and the learner's knobs stay in the
daemon.

>>> from daemon.common.settings import Settings
>>> job = ExportJob.from_settings(Settings.load(None, {"model": {"name": "maize"}}))
>>> ExportJob.model_validate_json(job.model_dump_json()) == job, job.model.name
(True, 'maize')
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from daemon.common.settings import ExportSettings, ModelSettings, RegistrySettings, RolloutSettings, SigningSettings
from daemon.registry.versions import Registry
from daemon.store.location import StoreLocation

if TYPE_CHECKING:
    from daemon.common.settings import Settings


class ExportJob(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    state_dir: Path  # absolute: the export process runs in a folder of its own
    store: StoreLocation  # where the holdout and calibration images are read (the password file's path only)
    model: ModelSettings
    export: ExportSettings
    registry: RegistrySettings
    signing: SigningSettings
    rollout: RolloutSettings = RolloutSettings()  # a published version's stages (the registry starts its rollout)
    seed: int  # training.seed: a backbone without shipped weights is rebuilt as the learner built it
    checkpoint_every_s: float  # training.checkpoint_every_s, quoted while there is no checkpoint yet
    log_level: str = "INFO"  # logging.level; the export process logs JSON lines whatever the daemon's format

    @classmethod
    def from_settings(cls, settings: Settings) -> ExportJob:
        return cls(
            state_dir=settings.state_dir,
            store=StoreLocation.of_settings(settings),
            model=settings.model,
            export=settings.export,
            registry=settings.registry,
            signing=settings.signing,
            rollout=settings.rollout,
            seed=settings.training.seed,
            checkpoint_every_s=settings.training.checkpoint_every_s,
            log_level=settings.logging.level,
        )

    def open_registry(self) -> Registry:
        """The model's registry, for writing."""
        return Registry.of_model(self.state_dir, self.model.name, self.registry, self.signing)
