"""Helpers for the adapter tests: the recorded samples, and fake vendor tools.

A fake tool is a small executable Python script in ``tmp_path`` that answers as
the real tool would: it prints a recorded sample for the arguments it is given,
or exits with an error, or hangs. The adapters run it exactly as they run the
real tool, through a subprocess.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

SAMPLES = Path(__file__).parent / "samples"


def sample(name: str) -> str:
    """The text of a recorded sample, by its path under ``samples/``."""
    return (SAMPLES / name).read_text()


def fake_tool(
    directory: Path,
    name: str,
    outputs: dict[str, str] | None = None,
    *,
    exit_code: int = 0,
    stderr: str = "",
    hang: bool = False,
    repeat_every: float | None = None,
) -> Path:
    """Write an executable ``name`` that prints ``outputs[key]`` (a sample path) for
    the first ``key`` found in its joined arguments ("" matches anything).

    ``hang`` sleeps instead of answering; ``repeat_every`` prints the answer again
    every so many seconds, forever, as tegrastats does.
    """
    path = directory / name
    texts = {key: sample(value) for key, value in (outputs or {}).items()}
    path.write_text(
        f"#!{sys.executable}\n"
        "import json, sys, time\n"
        f"texts = json.loads({json.dumps(json.dumps(texts))})\n"
        "args = ' '.join(sys.argv[1:])\n"
        f"if {hang!r}:\n"
        "    time.sleep(60)\n"
        f"sys.stderr.write({stderr!r})\n"
        f"if {exit_code!r}:\n"
        f"    sys.exit({exit_code!r})\n"
        "text = next((t for key, t in texts.items() if key in args), None)\n"
        "if text is None:\n"
        "    sys.exit('fake tool: no answer for ' + args)\n"
        f"every = {repeat_every!r}\n"
        "while True:\n"
        "    sys.stdout.write(text)\n"
        "    sys.stdout.flush()\n"
        "    if every is None:\n"
        "        break\n"
        "    time.sleep(every)\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path
