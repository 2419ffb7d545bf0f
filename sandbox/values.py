"""Values crossing the jail's boundary: type-tagged JSON built only from exact builtin types
(`type(x) is int`, ...), so that an object whose `__eq__` always succeeds cannot even be reported.

`encode` runs inside the jail; `decode` runs on the other side (the supervisor, or the checker
process of an assert-format grading) on text the candidate controls, so it bounds nesting and raises
only ValueError, whatever it is given."""

import json

MAX_DEPTH = 100


def encode(value, depth: int = 0):
    if depth > MAX_DEPTH:
        raise ValueError(f"value nested deeper than {MAX_DEPTH} levels")
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        return value if value == value and abs(value) != float("inf") else {"float": repr(value)}
    if kind is list:
        return [encode(v, depth + 1) for v in value]
    if kind is tuple:
        return {"tuple": [encode(v, depth + 1) for v in value]}
    if kind in (set, frozenset):
        return {"set": [encode(v, depth + 1) for v in value]}
    if kind is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [repr(value.real), repr(value.imag)]}
    raise TypeError(f"cannot report a value of type {kind.__name__}; return builtin types only")


def loads(line):
    """json.loads for text from the jail: any failure (bad JSON, nesting past the parser's recursion
    limit, bad UTF-8) is a ValueError."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError, TypeError) as exc:
        raise ValueError(f"malformed record: {type(exc).__name__}") from None


def decode(value, depth: int = 0):
    """Type-tagged JSON back to plain builtins; anything malformed raises ValueError."""
    if depth > MAX_DEPTH:
        raise ValueError(f"value nested deeper than {MAX_DEPTH} levels")
    if value is None or type(value) in (bool, int, float, str):
        return value
    if type(value) is list:
        return [decode(v, depth + 1) for v in value]
    if type(value) is not dict or len(value) != 1:
        raise ValueError(f"malformed value {str(value)[:100]!r}")
    (tag, payload), = value.items()
    try:
        if tag == "float" and type(payload) is str:
            return float(payload)
        if tag in ("tuple", "set", "dict") and type(payload) is not list:
            raise ValueError(f"{tag} payload is not a list")
        if tag == "tuple":
            return tuple(decode(v, depth + 1) for v in payload)
        if tag == "set":
            return frozenset(decode(v, depth + 1) for v in payload)
        if tag == "dict":
            pairs = [_pair(item) for item in payload]
            return {decode(k, depth + 1): decode(v, depth + 1) for k, v in pairs}
        if tag == "bytes" and type(payload) is str:
            return bytes.fromhex(payload)
        if tag == "complex" and type(payload) is list and len(payload) == 2 and all(type(p) is str for p in payload):
            return complex(float(payload[0]), float(payload[1]))
    except (TypeError, ValueError, OverflowError) as exc:  # unhashable keys, bad hex, bad floats
        raise ValueError(f"malformed {tag} value: {exc}") from None
    raise ValueError(f"malformed value with tag {str(tag)[:40]!r}")


def _pair(item):
    if type(item) is not list or len(item) != 2:
        raise ValueError("dict items must be [key, value] pairs")
    return item
