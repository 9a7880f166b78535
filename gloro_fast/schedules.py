"""GloRo's training schedules for ε, the TRADES weight λ and the learning rate.

A schedule is a string; it gives one value per epoch, as a multiple of a base value (the
configured ε, λ or learning rate), with the semantics of the reference GloRo library
(``gloro.training.schedules`` in Leino et al.'s TensorFlow code):

``fixed``
    the base value throughout.
``linear`` / ``linear_half``
    0 → base over all epochs / over the first half, then base.
``linear_decay`` / ``linear_decay_after_half``
    base → 0 over all epochs / over the second half.
``logarithmic`` / ``logarithmic_half``
    0.01·base → base along a log curve (fast at first) over all epochs / the first half.
``cos`` / ``cos_after_half``
    base → 0 along a half cosine over all epochs / over the second half.
``decay_to_V`` / ``decay_after_half_to_V``
    base → V (an absolute value, e.g. ``decay_after_half_to_1e-6`` for a learning rate)
    exponentially over all epochs / over the second half.
compact form, e.g. ``[0.01]-log-[50%:1.]-[1.]``
    sections ``[time:value]`` (value a multiple of base; time an epoch or a percentage of
    the epochs; the first section starts at 0 and the last ends at the last epoch, so they
    may omit it) joined by a transition: ``-`` linear, ``-exp-`` exponential, ``-log-``
    logarithmic, ``-cos-`` half cosine, or nothing (hold the value, then jump).

Between epochs the value moves linearly, step by step, from the previous epoch's value to
the current one (the reference's ``interpolate=True``): epoch 0 holds the first value and
epoch e goes from value e−1 to value e. Past the end of the list the value stays at its
last entry. One departure from the reference: a last section with an explicit time before
the last epoch (``[0.01]-log-[50%:1.1]``) is reached and then held after any transition,
where the reference holds it only after a plain hold and otherwise stops one step short.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Dict, List, Tuple

__all__ = ["Schedule", "NAMED_SCHEDULES"]

NAMED_SCHEDULES: Dict[str, str] = {
    "fixed": "[1.]",
    "linear": "[0.]-[1.]",
    "linear_half": "[0.]-[50%:1.]-[1.]",
    "linear_decay": "[1.]-[0.]",
    "linear_decay_after_half": "[1.]-[50%:1.]-[0.]",
    "logarithmic": "[0.01]-log-[1.]",
    "logarithmic_half": "[0.01]-log-[50%:1.]-[1.]",
    "cos": "[1.]-cos-[0.]",
    "cos_after_half": "[1.]-[50%:1.]-cos-[0.]",
}


def _linear(start: float, end: float, n: int) -> List[float]:
    return [start + (end - start) * i / n for i in range(n)]


def _exponential(start: float, end: float, n: int) -> List[float]:
    if start <= 0 or end <= 0:
        raise ValueError(f"an -exp- transition needs positive values, got {start} and {end}")
    rate = math.log(end / start) / n
    return [start * math.exp(rate * i) for i in range(n)]


def _logarithmic(start: float, end: float, n: int) -> List[float]:
    # Interpolates linearly in exp(value), so it rises fast at first (the reference's curve).
    a, b = math.exp(start), math.exp(end)
    return [math.log((b - a) / n * i + a) for i in range(n)]


def _cosine(start: float, end: float, n: int) -> List[float]:
    return [end + (start - end) * 0.5 * (math.cos(i / n * math.pi) + 1) for i in range(n)]


_TRANSITIONS: Dict[str, Callable[[float, float, int], List[float]]] = {
    "-": _linear, "-exp-": _exponential, "-log-": _logarithmic, "-cos-": _cosine,
}


def _parse_section(spec: str, section: str, epochs: int, first: bool, last: bool) -> Tuple[int, float]:
    body = section[1:-1]
    if ":" in body:
        when, value = body.split(":", 1)
        try:
            time = int(float(when[:-1]) / 100.0 * epochs) if when.endswith("%") else int(when)
        except ValueError:
            raise ValueError(f"schedule {spec!r}: bad time {when!r} in section {section}") from None
    elif first or last:
        time, value = (0 if first else epochs), body
    else:
        raise ValueError(f"schedule {spec!r}: inner section {section} needs a time, as [time:value]")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"schedule {spec!r}: bad value {value!r} in section {section}") from None
    if not math.isfinite(number):
        raise ValueError(f"schedule {spec!r}: value {value!r} is not finite")
    return time, number


def _compact(spec: str, epochs: int, base: float) -> List[float]:
    sections = re.findall(r"\[[^\[\]]*\]", spec)
    between = re.split(r"\[[^\[\]]*\]", spec)
    if not sections or between[0] or between[-1]:
        raise ValueError(
            f"schedule {spec!r} is neither a named schedule ({', '.join(NAMED_SCHEDULES)}, "
            "decay_to_V, decay_after_half_to_V) nor of the form [value]-[time:value]-..."
        )
    transitions = between[1:-1]
    for t in transitions:
        if t not in _TRANSITIONS and t != "":
            raise ValueError(f"schedule {spec!r}: unknown transition {t!r} "
                             "(use '-', '-exp-', '-log-', '-cos-' or none)")
    if len(sections) == 1:
        return [base * _parse_section(spec, sections[0], epochs, True, False)[1]]
    values: List[float] = []
    n = len(sections)
    for i in range(n - 1):
        start_time, start = _parse_section(spec, sections[i], epochs, i == 0, False)
        end_time, end = _parse_section(spec, sections[i + 1], epochs, False, i + 1 == n - 1)
        if not 0 <= start_time <= end_time:
            raise ValueError(f"schedule {spec!r}: section times must not decrease "
                             f"({sections[i]} then {sections[i + 1]})")
        start, end = start * base, end * base
        length = end_time - start_time
        transition = transitions[i]
        if transition:
            values += _TRANSITIONS[transition](start, end, length) if length else []
        else:
            values += [start] * length
        if i + 1 == n - 1 and end_time < epochs - 1:
            # The last section ends before the last epoch: hold its value from then on (the
            # reference does so only after a hold; an interpolation would stop short of it).
            values.append(end)
    return values or [base * _parse_section(spec, sections[-1], epochs, False, True)[1]]


class Schedule:
    """One value per epoch from a schedule string (see the module docstring).

    ``Schedule(spec, epochs, base)``; ``values`` is the per-epoch list and
    ``at(epoch, step, steps)`` the value used at ``step`` of ``steps`` within ``epoch``.
    """

    def __init__(self, spec: str, epochs: int, base: float) -> None:
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"schedule must be a non-empty string, got {spec!r}")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        if not (isinstance(base, (int, float)) and math.isfinite(base)):
            raise ValueError(f"base must be a finite number, got {base!r}")
        self.spec = spec = spec.strip()
        self.epochs, self.base = epochs, float(base)
        decay = re.fullmatch(r"decay(_after_half)?_to_(.+)", spec)
        if spec in NAMED_SCHEDULES:
            values = _compact(NAMED_SCHEDULES[spec], epochs, self.base)
        elif decay:
            try:
                end = float(decay.group(2))
            except ValueError:
                raise ValueError(f"schedule {spec!r}: {decay.group(2)!r} is not a number") from None
            if self.base <= 0 or not end > 0:
                raise ValueError(f"schedule {spec!r} needs a positive base and end value")
            middle = "[50%:1.]-" if decay.group(1) else ""
            values = _compact(f"[1.]-{middle}exp-[{end / self.base!r}]", epochs, self.base)
        else:
            values = _compact(spec, epochs, self.base)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"schedule {spec!r} gives non-finite values")
        self.values: List[float] = values

    def __getitem__(self, epoch: int) -> float:
        return self.values[min(epoch, len(self.values) - 1)]

    def at(self, epoch: int, step: int = 0, steps: int = 1) -> float:
        current = self[epoch]
        previous = self[epoch - 1] if epoch > 0 else current
        return previous + (current - previous) * (step / steps)

    def minimum(self) -> float:
        return min(self.values)

    def __repr__(self) -> str:
        return f"Schedule({self.spec!r}, epochs={self.epochs}, base={self.base})"
