"""Query strings as Nova reads them: parsing, schema-like validation, Nova's error texts.

Nova validates query strings with JSON-Schema (nova/api/validation): every parameter is a
list of strings (``?a=1&a=2``); ``additionalProperties: True`` schemas strip unknown
parameters silently, ``False`` ones (servers list from 2.75, every other API from 2.102)
answer 400.  The handlers then read a parameter as webob's ``req.GET[key]`` does: the
*last* value.  The messages here are the ones Nova's validator and helpers produce.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from urllib.parse import unquote_to_bytes, urlencode

from fastpath.errors import BadRequest

Params = list[tuple[str, str]]

# oslo_utils.strutils
TRUE_STRINGS = ("1", "t", "true", "on", "y", "yes")
FALSE_STRINGS = ("0", "f", "false", "off", "n", "no")
_ACCEPTABLE = ", ".join(f"'{s}'" for s in sorted(TRUE_STRINGS + FALSE_STRINGS))


def parse(query_string: str) -> Params:
    """``a=1&b=%C3%A9`` -> [("a", "1"), ("b", "é")], in order, blanks kept (webob's rules:
    ``+`` is a space; a piece without ``=`` is a key with an empty value)."""
    out: Params = []
    if not query_string:
        return out
    raw = query_string.encode("latin-1")
    try:
        for piece in raw.split(b"&"):
            if not piece:
                continue
            k, _, v = piece.partition(b"=")
            key = unquote_to_bytes(k.replace(b"+", b" ")).decode("utf-8")
            value = unquote_to_bytes(v.replace(b"+", b" ")).decode("utf-8")
            out.append((key, value))
    except UnicodeDecodeError:
        raise BadRequest("Query string is not UTF-8 encoded") from None
    return out


def last(params: Params, key: str) -> str | None:
    """The value webob's ``req.GET[key]`` gives: the last one."""
    found = None
    for k, v in params:
        if k == key:
            found = v
    return found


def getall(params: Params, key: str) -> list[str]:
    return [v for k, v in params if k == key]


def keys(params: Params) -> list[str]:
    """Distinct keys, in first-seen order."""
    return list(dict.fromkeys(k for k, _ in params))


# -- what the JSON-Schema validator says ----------------------------------------------------------
def invalid(param: str, value: object, message: str) -> BadRequest:
    return BadRequest(f"Invalid input for query parameters {param}. Value: {value}. {message}")


def additional_not_allowed(extra: Iterable[str]) -> BadRequest:
    names = sorted(extra)
    verb = "was" if len(names) == 1 else "were"
    listed = ", ".join(repr(x) for x in names)
    return BadRequest(f"Additional properties are not allowed ({listed} {verb} unexpected)")


def strict(params: Params, version: int, since: int = 102) -> None:
    """A query schema without properties: any parameter is an error from 2.``since``
    (``additionalProperties: False``), ignored before."""
    if version >= since and params:
        raise additional_not_allowed(keys(params))


def check_regex(param: str, value: str) -> None:
    """Nova's ``format: regex``: a non-empty string that compiles."""
    ok = bool(value)
    if ok:
        try:
            re.compile(value)
        except (re.error, RecursionError, OverflowError):
            ok = False
    if not ok:
        raise invalid(param, value, f"{value!r} is not a 'regex'")


def check_non_negative_integer(param: str, value: str) -> int:
    """parameter_types.non_negative_integer: pattern ``^[0-9]*$``, minLength 1."""
    if not re.fullmatch(r"[0-9]*", value):
        raise invalid(param, value, f"{value!r} does not match '^[0-9]*$'")
    if not value:
        raise invalid(param, value, f"{value!r} should be non-empty")
    return int(value)


# iso8601.parse_date (oslo timeutils.parse_isotime): date, optional time with optional
# fraction, optional zone; a missing zone is UTC.
_ISO = re.compile(
    r"(?P<y>[0-9]{4})-?(?P<mo>[0-9]{1,2})(?:-?(?P<d>[0-9]{1,2})"
    r"(?:[T ](?P<h>[0-9]{2})(?::?(?P<mi>[0-9]{2})(?::?(?P<s>[0-9]{2})"
    r"(?:[.,](?P<f>[0-9]+))?)?)?\s*(?P<tz>Z|[-+][0-9]{2}(?::?[0-9]{2})?)?)?)?\Z"
)


def parse_isotime(value: str) -> int | None:
    """Microseconds since the epoch (UTC) of an ISO 8601 time, or None if it is not one."""
    m = _ISO.match(value)
    if m is None:
        return None
    g = m.groupdict()
    try:
        frac = (g["f"] or "0")[:6].ljust(6, "0")
        dt = datetime(
            int(g["y"]), int(g["mo"]), int(g["d"] or 1), int(g["h"] or 0), int(g["mi"] or 0),
            int(g["s"] or 0), int(frac), tzinfo=UTC,
        )
    except ValueError:
        return None
    tz = g["tz"]
    offset = 0
    if tz and tz != "Z":
        sign = -1 if tz[0] == "-" else 1
        digits = tz[1:].replace(":", "")
        offset = sign * (int(digits[:2]) * 60 + int(digits[2:4] or 0))
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond - offset * 60_000_000


def check_datetime(param: str, value: str) -> int:
    t = parse_isotime(value)
    if t is None:
        raise invalid(param, value, f"{value!r} is not a 'date-time'")
    return t


def bool_from_string(value: str, strict: bool = False, default: bool = False) -> bool:
    """oslo_utils.strutils.bool_from_string; strict raises ValueError with oslo's text."""
    low = value.strip().lower()
    if low in TRUE_STRINGS:
        return True
    if low in FALSE_STRINGS:
        return False
    if strict:
        raise ValueError(f"Unrecognized value '{value}', acceptable values are: {_ACCEPTABLE}")
    return default


def next_link(base: str, path: str, params: Sequence[tuple[str, str]], marker: str) -> str:
    """Nova's ``ViewBuilder._get_next_link``: the request's (kept) parameters sorted, one
    value per key (the last of the sorted ones), ``marker`` set to the last id of the page."""
    ordered: dict[str, str] = {}
    for k, v in sorted(params):
        ordered[k] = v
    ordered["marker"] = marker
    return f"{base}{path}?{urlencode(ordered)}"
