"""Durations and holder text, checked and shaped the way vmpool accepts them."""

import re

from .errors import VmpoolError

# vmpool's DURATION: a number with ms, s, m or h, several from the largest unit down (1m30s),
# or a bare 0.
_DURATION = re.compile(r"^(?:0|(?:\d+(?:\.\d+)?h)?(?:\d+(?:\.\d+)?m)?(?:\d+(?:\.\d+)?s)?(?:\d+ms)?)$")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

# A holder is 1 to 200 Unicode scalars with no control character and none that reorders text
# (vmpool's TerminalText.isUnsafe, newline and tab included); lone surrogates cannot be sent.
HOLDER_MAX = 200
_UNSAFE_HOLDER = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def duration(value, what):
    """`value` as vmpool's DURATION text: a string such as `30s` or `1m30s` is checked, a
    number is seconds. Raises VmpoolError naming `what` for anything else."""
    if isinstance(value, bool):
        raise VmpoolError(f"{what}: expected a duration such as 30s or 1h, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0 or value != value or value == float("inf"):
            raise VmpoolError(f"{what}: expected a duration of 0 or more seconds, got {value!r}")
        if value == 0:
            return "0"
        milliseconds = round(value * 1000)
        if milliseconds == 0:
            raise VmpoolError(f"{what}: {value!r} seconds is less than a millisecond")
        return f"{milliseconds}ms" if milliseconds % 1000 else f"{milliseconds // 1000}s"
    if isinstance(value, str) and value and _DURATION.match(value):
        return value
    raise VmpoolError(f"{what}: expected a duration such as 30s, 1m30s or 1h, got {value!r}")


def seconds(text):
    """The seconds a DURATION text (as `duration` returns it) stands for."""
    return sum(float(number) * _SECONDS[unit] for number, unit in _PART.findall(text))


def holder(text):
    """`text` as a lease holder: unsafe characters dropped, cut to 200 scalars."""
    cleaned = _UNSAFE_HOLDER.sub("", text)[:HOLDER_MAX]
    return cleaned or "pytest"
