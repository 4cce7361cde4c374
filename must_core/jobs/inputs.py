"""What every request value must satisfy before anything is stored: one rule for all strings, keys and
numbers of a JSON body, so no input can reach a database (or a response encoder) it would break.

- strings and keys: no NUL (PostgreSQL text/JSONB refuse ``\\u0000``), no unpaired surrogate (not
  encodable as UTF-8: SQLite, psycopg and the JSON response would fail), at most ``MAX_TEXT`` chars;
- integers: inside the signed 64-bit range (SQL ``BIGINT``, torch seeds);
- floats: finite (Python's JSON parser accepts ``NaN``/``Infinity``; JSONB does not);
- nesting: at most ``MAX_DEPTH`` levels.
"""

from __future__ import annotations

import math
from typing import Any

MAX_TEXT = 4096
MAX_DEPTH = 16
INT64_MAX = 2**63 - 1
# seeds feed torch generators as seed * 1_000_003 + epoch, which must stay inside 64 bits
MAX_SEED = 2**32 - 1


def text_problem(s: str) -> str | None:
    """Why ``s`` cannot be stored, or None."""
    if len(s) > MAX_TEXT:
        return f"longer than {MAX_TEXT} characters"
    if "\x00" in s:
        return "contains a NUL character"
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate (not valid Unicode text)"
    return None


def check_json_value(value: Any, where: str = "body", depth: int = 0) -> None:
    """Raise ``ValueError`` naming the first value that could not be stored (never echoing it)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            raise ValueError(f"{where}: {problem}")
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise ValueError(f"{where}: integer outside the signed 64-bit range")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: numbers must be finite")
    elif isinstance(value, dict):
        for key, item in value.items():
            name = ascii(key)[1:-1][:64] if isinstance(key, str) else "?"
            check_json_value(key, f"{where}.<key {name}>", depth + 1)
            check_json_value(item, f"{where}.{name}", depth + 1)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_json_value(item, f"{where}[{i}]", depth + 1)
