"""MIG discovery against the nvidia-smi output recorded in NVIDIA's MIG user guide
(see samples/SOURCES.md), and the profile catalog against the guide's placements."""

from __future__ import annotations

import pytest

from adapters import mig
from solver.fractions import Gpu, parse_profile
from solver.market import Offer
from tests.adapters.conftest import sample


def test_two_halves_join_their_uuids_in_instance_order() -> None:
    found = mig.instances(
        sample("nvidia/a100-40gb-mig-lgi-3g-3g.txt"), sample("nvidia/a100-40gb-mig-L.txt")
    )
    assert [(i.gi_id, i.spec, i.uuid) for i in found] == [
        (1, "3g.20gb@4", "MIG-c7384736-a75d-5afc-978f-d2f1294409fd"),
        (2, "3g.20gb@0", "MIG-a28ad590-3fda-56dd-84fc-0a0b96edc58d"),
    ]
    assert mig.creatable("a100-40gb", found) == []  # the GPU is full


@pytest.mark.parametrize(
    ("name", "specs", "free"),
    [
        ("4-2-1", ["4g.20gb@0", "2g.10gb@4", "1g.5gb@6"], []),
        ("1-1-2-3", ["1g.5gb@0", "1g.5gb@1", "2g.10gb@2", "3g.20gb@4"], []),
        # Every layout of the guide uses all 7 compute slices: nothing more can be made.
        (
            "2-1-1-1-1-1",
            ["1g.5gb@0", "1g.5gb@1", "1g.5gb@2", "1g.5gb@3", "2g.10gb@4", "1g.5gb@6"],
            [],
        ),
    ],
)
def test_layouts_from_the_guide(name: str, specs: list[str], free: list[str]) -> None:
    found = mig.parse_lgi(sample(f"nvidia/a100-40gb-mig-lgi-{name}.txt"))
    assert sorted(i.spec for i in found) == sorted(specs)
    assert mig.creatable("a100-40gb", found) == free
    offer = Offer(
        id="g",
        vendor="nvidia",
        accelerator="a100-40gb",
        platform="cuda",
        count=1,
        memory_gib=40,
        tflops_bf16=312,
        tflops_fp32=19.5,
        mem_bw_gbps=1555,
        price_per_hour=1.0,
        region="r",
        country="US",
        lat=0,
        lon=0,
        fraction_kind="mig",
        mig_profiles=mig.specs("a100-40gb"),
        mig_instances=tuple(i.spec for i in found),
    )
    assert Gpu.of(offer).idle  # nothing busy: the round may cut it again


def test_a_gpu_with_room_lists_what_could_still_be_made() -> None:
    # One half of the guide's 3g + 3g layout: the other half, or smaller ones, may be made.
    half = [i for i in mig.parse_lgi(sample("nvidia/a100-40gb-mig-lgi-3g-3g.txt")) if i.start == 4]
    free = mig.creatable("a100-40gb", half)
    assert "3g.20gb@0" in free
    assert "4g.20gb@0" in free
    assert "1g.5gb@3" in free
    assert not any(s.endswith("@4") or s.endswith("@6") for s in free)
    assert "7g.40gb@0" not in free


def test_the_catalog_has_the_placements_the_driver_prints() -> None:
    placements = mig.parse_lgipp(sample("nvidia/a100-40gb-mig-lgipp.txt"))
    # Profile IDs of the A100-40GB in the guide's -lgip listing.
    ids = {"1g.5gb": 19, "1g.10gb": 15, "2g.10gb": 14, "3g.20gb": 9, "4g.20gb": 5, "7g.40gb": 0}
    for p in mig.profiles("a100-40gb"):
        assert placements[ids[p.name]] == (p.starts, p.width), p.name
        assert parse_profile(p.spec) == p


def test_h100_placements_match_the_issue() -> None:
    starts = {p.name: p.starts for p in mig.profiles("h100-sxm")}
    assert starts["1g.10gb"] == tuple(range(7))
    assert starts["2g.20gb"] == (0, 2, 4)
    assert starts["3g.40gb"] == (0, 4)
    assert starts["4g.40gb"] == starts["7g.80gb"] == (0,)
    assert [p.name for p in mig.profiles("h200")][-1] == "7g.141gb"
