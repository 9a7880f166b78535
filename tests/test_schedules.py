"""GloRo schedules: per-epoch values against the reference library's formulas, written out
by hand here, and the step-wise interpolation between epochs."""
import math

import pytest

from gloro_fast.schedules import Schedule


def close(values, expected):
    assert len(values) == len(expected), (values, expected)
    for v, e in zip(values, expected):
        assert v == pytest.approx(e, rel=1e-12, abs=1e-15)


def log_curve(start, end, n):
    # The reference's -log- transition: linear in exp(value).
    return [math.log((math.exp(end) - math.exp(start)) / n * i + math.exp(start)) for i in range(n)]


def test_fixed_and_linear():
    close(Schedule("fixed", 7, 0.45).values, [0.45])
    assert Schedule("fixed", 7, 0.45)[6] == 0.45
    close(Schedule("linear", 4, 2.0).values, [0.0, 0.5, 1.0, 1.5])
    close(Schedule("linear_half", 6, 3.0).values, [0.0, 1.0, 2.0, 3.0, 3.0, 3.0])
    close(Schedule("linear_decay", 4, 1.0).values, [1.0, 0.75, 0.5, 0.25])
    close(Schedule("linear_decay_after_half", 4, 1.0).values, [1.0, 1.0, 1.0, 0.5])


def test_logarithmic():
    close(Schedule("logarithmic", 5, 1.0).values, log_curve(0.01, 1.0, 5))
    # base scales the end points before the curve is taken, as in the reference
    close(Schedule("logarithmic", 5, 2.0).values, log_curve(0.02, 2.0, 5))
    close(Schedule("logarithmic_half", 8, 0.3).values, log_curve(0.003, 0.3, 4) + [0.3] * 4)
    values = Schedule("logarithmic", 50, 1.0).values
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(s > 0 for s in steps) and steps[0] > 2.5 * steps[-1]  # rises fast, then slowly


def test_cosine_and_exponential_decay():
    close(Schedule("cos", 4, 1.0).values, [0.5 * (math.cos(i / 4 * math.pi) + 1) for i in range(4)])
    close(Schedule("cos_after_half", 4, 2.0).values,
          [2.0, 2.0] + [2.0 * 0.5 * (math.cos(i / 2 * math.pi) + 1) for i in range(2)])
    lr = Schedule("decay_after_half_to_1e-6", 10, 1e-3).values
    close(lr, [1e-3] * 5 + [1e-3 * (1e-3) ** (i / 5) for i in range(5)])
    close(Schedule("decay_to_0.01", 4, 1.0).values, [0.01 ** (i / 4) for i in range(4)])


def test_compact_form():
    # [start]-log-[50%:end]: the example; the end is then held
    close(Schedule("[0.01]-log-[50%:1.1]", 6, 1.0).values, log_curve(0.01, 1.1, 3) + [1.1])
    assert Schedule("[0.01]-log-[50%:1.1]", 6, 1.0)[5] == pytest.approx(1.1)
    # absolute epochs, a linear ramp then a hold
    close(Schedule("[0.]-[2:1.]-[1.]", 5, 4.0).values, [0.0, 2.0, 4.0, 4.0, 4.0])
    # a plain hold then a jump (no transition between sections)
    close(Schedule("[1.][3:0.1]", 5, 1.0).values, [1.0, 1.0, 1.0, 0.1])
    close(Schedule("[1.]-[2:1.]-exp-[0.01]", 4, 1.0).values, [1.0, 1.0, 1.0, 0.1])
    close(Schedule("[0.]-[20:1.]-cos-[0.]", 40, 1.0).values[:21],
          [i / 20 for i in range(20)] + [1.0])


def test_interpolation_within_an_epoch():
    s = Schedule("linear", 4, 2.0)  # 0, 0.5, 1, 1.5
    assert s.at(0, 0, 10) == s.at(0, 9, 10) == 0.0  # epoch 0 holds the first value
    assert s.at(1, 0, 10) == pytest.approx(0.0)     # epoch e goes from value e-1 ...
    assert s.at(1, 5, 10) == pytest.approx(0.25)
    assert s.at(2, 9, 10) == pytest.approx(0.5 + 0.5 * 0.9)  # ... towards value e
    assert s.at(10, 3, 10) == pytest.approx(1.5)   # past the end: the last value


@pytest.mark.parametrize("spec, message", [
    ("sometimes", "neither a named schedule"),
    ("[0.]-wave-[1.]", "unknown transition '-wave-'"),
    ("[0.]-[0.5]-[1.]", "needs a time"),
    ("[0.]-[10:x]", "bad value 'x'"),
    ("[0.]-[5:1.]-[3:0.]", "must not decrease"),
    ("[1.]-exp-[0.]", "positive"),
    ("decay_to_zero", "not a number"),
    ("[0.]-[1.", "neither a named schedule"),
    ("", "non-empty"),
])
def test_bad_schedules_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        Schedule(spec, 10, 1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="epochs"):
        Schedule("fixed", 0, 1.0)
    with pytest.raises(ValueError, match="base"):
        Schedule("fixed", 3, float("nan"))
