"""The part that moves a staged rollout on, or halts it, from the devices' reports (rollout.auto).

Every ``rollout.check_every_s`` it reads the registry's rollout (daemon/registry/rollout.py) and, while
a version is rolling out, the field figures of it and of the version it replaces (daemon/store/field.py),
judges them (daemon/distribution/rollout_gates.py) and acts: the registry logs each step with the
figures it was taken on. Only the process that publishes runs it (the one node, or the elected
exporter: ``may_act``), so two never judge one rollout. A decision is made for the version it was
judged on: one promoted or halted by hand in between is left alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from daemon.common.lifecycle import left
from daemon.common.settings import RolloutSettings
from daemon.distribution.rollout_gates import Verdict, judge
from daemon.registry.layout import RegistryError
from daemon.registry.versions import Registry
from daemon.store.database import Database
from daemon.store.errors import StoreError, is_database_error
from daemon.store.field import versions_in_field
from daemon.store.location import StoreLocation
from daemon.store.reader import open_reader

log = logging.getLogger("sprout.rollout")


class RolloutWatch:
    name = "rollout"

    def __init__(
        self,
        registry: Callable[[], Registry],
        store: StoreLocation,
        settings: RolloutSettings,
        may_act: Callable[[], bool] = lambda: True,
    ):
        self._thread = threading.Thread(target=self.run, name="sprout-rollout", daemon=True)
        self._registry_of = registry
        self._registry: Registry | None = None
        self.store = store
        self.settings = settings
        self.may_act = may_act
        self.last: Verdict | None = None  # the last verdict, for the status page
        self.judged = 0
        self.error: BaseException | None = None
        self._db: Database | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, deadline: float) -> bool:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(left(deadline))
        if not self.alive() and self._db is not None:
            self._db.close()
        return not self.alive()

    def run(self) -> None:
        try:
            while not self._stop.wait(self.settings.check_every_s):
                if self.may_act():
                    self.check()
        except Exception as err:
            self.error = err
            log.exception("the rollout watch failed")

    def check(self) -> Verdict | None:
        """Judge the version rolling out and act on the verdict; None when none is rolling out."""
        if self._registry is None:
            self._registry = self._registry_of()
        registry = self._registry
        try:
            rollout = registry.rollout()
        except RegistryError as err:
            log.warning("%s; looked at again in %.0f s", err, self.settings.check_every_s)
            return None
        if rollout is None or not rollout.rolling:
            return None
        try:
            if self._db is None:
                self._db = open_reader(self.store, "sprout-rollout")
            found = {v.version: v for v in versions_in_field(self._db, only=(rollout.version, rollout.replaces))}
        except Exception as err:  # the store's server away: judged at the next look, nothing decided meanwhile
            if not (is_database_error(err) or isinstance(err, StoreError)):
                raise
            log.warning("rollout: cannot read the devices' reports (%s); looked at again later", err)
            if self._db is not None:
                self._db.close()
                self._db = None
            return None
        verdict = judge(
            found.get(rollout.version),
            found.get(rollout.replaces),
            self.settings,
            time.time() - rollout.stage_started_at,
        )
        self.last, self.judged = verdict, self.judged + 1
        try:
            if verdict.action == "advance":
                registry.advance_rollout(f"automatic: {verdict.reason}", expect=rollout.version)
            elif verdict.action == "halt":
                registry.halt_rollout(f"automatic: {verdict.reason}", verdict.figures, expect=rollout.version)
        except RegistryError as err:  # changed by hand since it was read: the next look sees the new state
            log.info("rollout: %s; left as it is", err)
        return verdict
