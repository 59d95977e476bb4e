"""The shared argument checks: accepted values come back checked, others raise UsageError."""

import numpy as np
import pytest

from cliplab.errors import UsageError
from cliplab.validation import check_backbone, check_choice, check_labels, check_number, check_positive_int


def test_check_positive_int():
    assert check_positive_int("batch_size", 3) == 3
    assert type(check_positive_int("batch_size", np.int64(3))) is int
    assert check_positive_int("workers", 0, minimum=0) == 0
    assert check_positive_int("max_pixels", None, allow_none=True) is None
    for bad in (0, -1, 2.0, True, "4", None):
        with pytest.raises(UsageError, match=r"^batch_size must be a positive integer, got "):
            check_positive_int("batch_size", bad)
    with pytest.raises(UsageError, match=r"workers must be an integer >= 0 \(0: decode in this thread\), got -1"):
        check_positive_int("workers", -1, minimum=0, hint="0: decode in this thread")
    with pytest.raises(UsageError, match="a positive integer or None, got 0"):
        check_positive_int("draft_size", 0, allow_none=True)


def test_check_number():
    assert check_number("lr", 1e-3, minimum=0, strict_minimum=True) == 1e-3
    assert type(check_number("alpha", np.float32(0.5), minimum=0, maximum=1)) is float
    assert check_number("alpha", 1, minimum=0, maximum=1) == 1.0
    for bad in (0, -1.0, float("nan"), float("inf"), True, "0.1", None):
        with pytest.raises(UsageError, match=r"^lr must be a finite number > 0, got "):
            check_number("lr", bad, minimum=0, strict_minimum=True)
    with pytest.raises(UsageError, match=r"grain_weight must be a finite number in \[0, 1\], got 1.5"):
        check_number("grain_weight", 1.5, minimum=0, maximum=1)
    with pytest.raises(UsageError, match=r"rho must be a finite number >= 0 \(relative box radius\), got -1"):
        check_number("rho", -1, minimum=0, hint="relative box radius")


def test_check_choice():
    assert check_choice("on_error", "skip", ("raise", "skip")) == "skip"
    with pytest.raises(UsageError, match=r"on_error must be one of 'raise', 'skip'; got 'ignore'"):
        check_choice("on_error", "ignore", ("raise", "skip"))
    with pytest.raises(UsageError):
        check_choice("flag", 1, (True, False))        # 1 == True, but not the same choice
    assert check_choice("towers", "text", ("visual", "text"), many=True) == ("text",)
    assert check_choice("towers", ["visual", "text"], ("visual", "text"), many=True) == ("visual", "text")
    for bad in ((), ("audio",), ["text", "audio"]):
        with pytest.raises(UsageError, match=r"towers must be a non-empty subset of \['visual', 'text'\]"):
            check_choice("towers", bad, ("visual", "text"), many=True)


def test_check_backbone(tiny):
    assert check_backbone("backbone", tiny) is tiny
    with pytest.raises(UsageError, match=r"zero_shot must be a Backbone \(cliplab.load\(...\)\), got str"):
        check_backbone("zero_shot", "shapes-tiny")


def test_check_labels():
    y = check_labels([0, 2, 1], 3)
    assert y.dtype == np.int64 and y.tolist() == [0, 2, 1]
    assert check_labels(np.array([], dtype=np.int32), 3).shape == (0,)
    with pytest.raises(UsageError, match=r"must lie in \[0, 3\).*got 3"):
        check_labels([0, 3], 3)
    with pytest.raises(UsageError, match="got -1"):
        check_labels([-1], 3)
    with pytest.raises(UsageError, match="integer class indices, got dtype float64"):
        check_labels([0.0, 1.0], 3)
    with pytest.raises(UsageError, match="one integer per sample: 3 samples but labels of shape \\(2,\\)"):
        check_labels([0, 1], 3, n_samples=3)
    with pytest.raises(UsageError, match="one integer per sample"):
        check_labels([[0, 1]], 3)
