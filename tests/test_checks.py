"""checks: the shared argument checks, on what their callers in the library do not reach (a spatial divisor other
than 1, NumPy integers); the callers' own tests cover the rest through their messages."""
import re

import numpy as np
import pytest

from gaussiantoken_jax import checks


def test_nhwc_spatial_divisor_applies_to_the_height_and_the_width():
  checks.check_nhwc("f", "x", np.zeros((1, 8, 12, 3), np.float32), channels=3, spatial_divisor=4)
  for shape in ((1, 10, 8, 3), (1, 8, 10, 3)):
    message = f"f: the height and width of `x` must be multiples of 4, got shape {shape}"
    with pytest.raises(ValueError, match=re.escape(message)):
      checks.check_nhwc("f", "x", np.zeros(shape, np.float32), channels=3, spatial_divisor=4)


def test_integer_checks_take_numpy_integers_and_refuse_bools_and_floats():
  """A count read from an array (np.int64) is an int like any other (the docstrings); True and 2.0 are not."""
  for value in (0, 5, np.int64(0), np.int32(3), np.uint8(1)):
    checks.check_non_negative_int("f", "n", value)
  for value in (1, np.int64(1), np.int32(3)):
    checks.check_positive_int("f", "n", value)
  for check, bad_values in ((checks.check_non_negative_int, (-1, np.int64(-1), True, 2.0)),
                            (checks.check_positive_int, (0, np.int64(0), True, 2.0))):
    for bad in bad_values:
      with pytest.raises(ValueError, match=r"f: `n` must be a (positive|non-negative) int, got "):
        check("f", "n", bad)
