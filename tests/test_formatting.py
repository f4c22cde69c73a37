"""A figure with an error bar is rounded to the digit its error resolves, the same everywhere."""

import math

import pytest

from curvscope.analysis.formatting import rounded_to_error, with_error


@pytest.mark.parametrize("value,error,told", [
    (49.55, 11.0, "50 +- 11"),              # the error's 2nd digit is the units: no decimals
    (16.1283, 0.0021, "16.1283 +- 0.0021"),
    (16.13, 2.1, "16.1 +- 2.1"),
    (4955.0, 123.0, "4960 +- 120"),          # rounded to the tens
    (-3.2, 11.0, "-3 +- 11"),                # wider than the value: still rounded to the error
    (0.0, 0.05, "0.000 +- 0.050"),
    (1.5e-7, 2.3e-9, "1.500e-07 +- 2.3e-09"),  # scientific outside [1e-3, 1e5)
    (3.2e6, 1.1e4, "3.200e+06 +- 1.1e+04"),
    (0.97207, 6.2e-4, "0.97207 +- 0.00062"),  # a fraction with a small error stays fixed
    (0.5, 3e-7, "5.0000000e-01 +- 3.0e-07"),  # more than 6 decimals: scientific
])
def test_value_stops_at_the_errors_second_significant_digit(value, error, told):
    assert with_error(value, error) == told


@pytest.mark.parametrize("error", [None, 0.0, math.nan, math.inf])
def test_without_a_usable_error_the_value_keeps_four_digits(error):
    assert rounded_to_error(16.1283, error) == ("16.13", "")
    assert with_error(16.1283, error) == "16.13"


def test_the_shown_value_is_within_half_a_last_digit_of_the_true_one():
    for value, error in [(49.55, 11.0), (16.1283, 0.0021), (4955.0, 123.0), (0.123456, 0.0789)]:
        shown, err = rounded_to_error(value, error)
        last = 10.0 ** (math.floor(math.log10(error)) - 1)
        assert abs(float(shown) - value) <= last / 2 + 1e-12
        assert abs(float(err) - error) <= last / 2 + 1e-12
