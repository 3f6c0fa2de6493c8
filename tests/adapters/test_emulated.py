from __future__ import annotations

import pytest

from adapters.base import AdapterError
from adapters.emulated import EmulatedAdapter, parse_emulate
from adapters.registry import Options, detect


def test_it_lists_catalog_models_marked_as_emulated_on_the_cpu() -> None:
    devices = EmulatedAdapter(parse_emulate(["tpu-v5e=4", "H100=8"])).discover()
    by_model = {d.model: d for d in devices}
    h100 = by_model["h100-sxm"]
    assert (h100.platform, h100.count, h100.emulated_on) == ("cuda", 8, "cpu")
    assert "emulated" in h100.name
    assert by_model["tpu-v5e"].platform == "tpu"
    assert by_model["tpu-v5e"].memory_gib == 16


@pytest.mark.parametrize(
    ("item", "message"),
    [("h100-sxm", "MODEL=COUNT"), ("h100-sxm=0", "MODEL=COUNT"), ("warp-drive=2", "catalog")],
)
def test_bad_emulate_options_say_what_is_wrong(item: str, message: str) -> None:
    with pytest.raises(AdapterError, match=message):
        parse_emulate([item])


def test_it_is_never_picked_by_auto_and_needs_models() -> None:
    options = Options(emulate=(("h100-sxm", 2),))
    assert all(a.name != "emulated" for a in detect("auto", options))
    with pytest.raises(AdapterError, match="nothing to emulate"):
        EmulatedAdapter().discover()
