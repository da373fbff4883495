"""Memory sizes as people write them (192GB, 384GiB, 1.5TB) and as people read them."""

from __future__ import annotations

import re

# Decimal units as the paper and server vendors use them (1 GB = 1e9 bytes); binary ones as the OS reports.
UNITS = {
    "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]+)\s*$")


def parse_size(text: str) -> int:
    """Bytes in `text` such as '192GB', '384 GiB', '1.5TB'; ValueError with the accepted units otherwise."""
    match = _SIZE.match(text)
    accepted = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
    if not match:
        if text.strip().startswith("-"):
            raise ValueError(f"{text!r} is negative: a memory size must be positive")
        raise ValueError(f"{text!r} is not a memory size: write a number and a unit ({accepted}), e.g. 192GB")
    number, unit = float(match.group(1)), match.group(2).upper()
    if unit not in UNITS:
        raise ValueError(f"unknown unit {match.group(2)!r} in {text!r}: use one of {accepted}")
    if not number * UNITS[unit] < 2**63:  # inf too: past any machine, and past what an int64 holds
        raise ValueError(f"{text!r} is too large: a memory size must be below 8 EiB")
    size = round(number * UNITS[unit])
    if size <= 0:
        raise ValueError(f"{text!r} is zero: a memory size must be positive")
    return size


def format_bytes(size: float) -> str:
    """'914.8 GB (852.0 GiB)': decimal as the paper writes it, binary as `free -h` shows it."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(size) >= scale:
            break
    else:
        return f"{size:.0f} B"
    binary_unit = unit[0] + "iB"
    binary = size / UNITS[binary_unit.upper()]
    return f"{size / scale:,.1f} {unit} ({binary:,.1f} {binary_unit})"
