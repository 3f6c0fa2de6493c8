from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from broker.portable import arrays

DTYPES = st.sampled_from(
    [
        "bool",
        "int8",
        "int32",
        "int64",
        "uint16",
        "float16",
        "float32",
        "float64",
        "complex64",
        "bfloat16",
    ]
)


@given(
    st.lists(
        st.tuples(DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)),
        max_size=5,
    ),
    st.data(),
)
@settings(deadline=None)  # a check of exactness, not of speed: a busy machine is no failure
def test_bundles_round_trip_exactly(
    specs: list[tuple[str, tuple[int, ...]]], data: st.DataObject
) -> None:
    leaves = []
    for dtype, shape in specs:
        # bfloat16 has no hypothesis strategy: draw float32 values and round them.
        draw_as = "float32" if dtype == "bfloat16" else dtype
        values = data.draw(hnp.arrays(arrays.DTYPES[draw_as], shape))
        leaves.append(values.astype(arrays.DTYPES[dtype]))
    decoded = arrays.decode(arrays.encode(leaves))
    assert len(decoded) == len(leaves)
    for got, want in zip(decoded, leaves, strict=True):
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        assert got.tobytes() == want.tobytes()  # bit for bit, NaNs included


def test_header_alone_describes_the_leaves() -> None:
    data = arrays.encode([np.zeros((2, 3), np.float32), np.ones(4, ml_dtypes.bfloat16)])
    leaves = arrays.read_header(data[:200], len(data))
    assert [(leaf.dtype, leaf.shape) for leaf in leaves] == [
        ("float32", (2, 3)),
        ("bfloat16", (4,)),
    ]
    assert all(leaf.offset % 64 == 0 for leaf in leaves)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b"not a bundle at all", "bad magic"),
        (lambda b: b[:-4], "outside the bundle"),
        (lambda b: b[:20], "truncated"),
        (lambda b: b.replace(b'"float32"', b'"object!"'), "unsupported dtype"),
        (lambda b: b.replace(b'"nbytes":24', b'"nbytes":20'), "must hold 24 bytes"),
        (lambda b: b.replace(b'"shape":[2,3]', b'"shape":"2,3"'), "bad shape"),
    ],
)
def test_malformed_bundles_are_refused_with_the_reason(mangle, message: str) -> None:
    data = arrays.encode([np.zeros((2, 3), np.float32)])
    with pytest.raises(arrays.BundleError, match=message):
        arrays.decode(mangle(data))


def test_object_arrays_cannot_be_sent() -> None:
    with pytest.raises(arrays.BundleError, match="cannot be sent"):
        arrays.encode([np.array(["a", "b"])])
