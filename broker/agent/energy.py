"""The energy a run really used, from the hardware's own power readings.

While a run goes, a thread samples the node's power (``adapters.power``) every
``EVERY_S`` seconds and integrates it; at the end the agent reports the run's
energy in kWh with its finish, and the broker bills that instead of the
estimate. A reading covers the devices, not the site: the broker multiplies by
the offer's PUE.

Readings are per device (or per CPU package), not per run, so a run is
measured only while it has the node to itself: a run that shares the node
with another at any moment reports nothing, and its bill keeps the estimate,
labelled so. So does a run on hardware the agent cannot read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from adapters.power import EnergyMeter

log = logging.getLogger(__name__)

EVERY_S = 1.0


class RunEnergy:
    """The sampling of one run: ``start``, then ``kwh`` once it ended."""

    def __init__(self, reader: dict[str, Callable[[], Any]], devices: int) -> None:
        self._reader, self._devices = reader, devices
        self._meter: EnergyMeter | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.shared = False  # set when another run overlapped it: nothing is reported

    def start(self) -> None:
        try:
            self._meter = EnergyMeter(self._devices, **self._reader)
        except Exception as e:  # a reader that fails must not fail the run
            log.warning("cannot read this machine's power: %s", e)
            return
        self._thread = threading.Thread(target=self._sample, name="energy", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        assert self._meter is not None
        while not self._stop.wait(EVERY_S):
            try:
                self._meter.sample()
            except Exception as e:  # keep the run; the coverage check drops the figure
                log.debug("a power reading failed: %s", e)

    def kwh(self) -> float | None:
        """The run's measured energy (its devices, kWh), or None when it cannot be
        told apart from another run's or the readings did not cover it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._meter is None or self.shared:
            return None
        try:
            return self._meter.kwh()
        except Exception as e:
            log.debug("the last power reading failed: %s", e)
            return None
