import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from indexer.vectors import MIN_NORM, is_unit_rows, normalize_rows


def test_good_rows_become_unit_vectors():
    raw = np.array([[3, 4], [0, 2]], np.float32)
    out, reasons = normalize_rows(raw, 2)
    assert reasons == [None, None]
    np.testing.assert_allclose(out, [[0.6, 0.8], [0, 1]], atol=1e-6)


def test_nan_inf_zero_and_tiny_rows_are_refused_and_zeroed():
    raw = np.array([[np.nan, 1], [np.inf, 0], [0, 0], [MIN_NORM / 10, 0], [1, 0]], np.float32)
    out, reasons = normalize_rows(raw, 2)
    assert [r is None for r in reasons] == [False, False, False, False, True]
    assert "non-finite" in reasons[0] and "below" in reasons[2]
    assert np.isfinite(out).all()
    assert not out[:4].any()


def test_wrong_dimension_refuses_every_row():
    out, reasons = normalize_rows(np.ones((3, 5), np.float32), 4)
    assert all(r and "wrong shape" in r for r in reasons)
    assert out.shape == (3, 4)


@given(arrays(np.float32, st.tuples(st.integers(1, 8), st.just(6)),
              elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
def test_property_output_is_unit_or_refused(raw):
    out, reasons = normalize_rows(raw, 6)
    assert np.isfinite(out).all()
    ok = np.array([r is None for r in reasons])
    assert is_unit_rows(out[ok])
    assert not out[~ok].any()
