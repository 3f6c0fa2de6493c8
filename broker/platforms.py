"""The backends a program is exported for and a job runs on.

A module of its own, with no dependency, so that the client install (the SDK and
the developer CLI, without the server's libraries) can import it.
"""

from __future__ import annotations

from typing import Literal

Platform = Literal["cuda", "rocm", "tpu", "cpu"]
