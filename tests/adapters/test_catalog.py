from __future__ import annotations

import pytest

from adapters import catalog


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("h100-sxm", "h100-sxm"),
        ("H100-SXM", "h100-sxm"),
        ("h100", "h100-sxm"),
        ("NVIDIA H100 SXM5 80GB", "h100-sxm"),
        ("mi300x", "mi300x"),
        ("tpu-v5e", "tpu-v5e"),
        ("v5litepod", "tpu-v5e"),
        ("jetson-agx-orin", "jetson-agx-orin"),
        ("Jetson-AGX-Orin-64GB", "jetson-agx-orin"),
    ],
)
def test_lookup_by_key_alias_or_name(name: str, key: str) -> None:
    spec = catalog.lookup(name)
    assert spec is not None
    assert spec.key == key


def test_unknown_model_is_none() -> None:
    assert catalog.lookup("quantum-9000") is None


def test_figures_come_from_the_datasheets() -> None:
    h100 = catalog.lookup("h100-sxm")
    assert h100 is not None
    assert (h100.vendor, h100.platform, h100.memory_gib) == ("nvidia", "cuda", 80)
    assert (h100.tflops_bf16, h100.tflops_fp32, h100.mem_bw_gbps) == (989, 67, 3350)
    mi300x = catalog.lookup("mi300x")
    assert mi300x is not None
    assert (mi300x.vendor, mi300x.platform, mi300x.memory_gib) == ("amd", "rocm", 192)
    v5e = catalog.lookup("tpu-v5e")
    assert v5e is not None
    assert (v5e.vendor, v5e.platform, v5e.tflops_bf16, v5e.mem_bw_gbps) == (
        "google",
        "tpu",
        197,
        819,
    )


def test_every_row_is_usable_by_the_roofline() -> None:
    specs = catalog.all_specs()
    assert len({s.key for s in specs}) == len(specs) >= 20
    for spec in specs:
        assert spec.platform in catalog.PLATFORMS
        assert spec.vendor in catalog.VENDORS
        assert spec.memory_gib > 0
        assert spec.mem_bw_gbps > 0
        assert spec.tflops_bf16 > 0
        assert spec.tflops_fp32 > 0
        assert catalog.lookup(spec.key) == spec
