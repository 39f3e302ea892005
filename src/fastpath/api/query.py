"""Query strings as Nova reads them: parsing, schema validation with Nova's error texts,
pagination parameters and the oslo value parsers the handlers apply to them.

Nova validates query strings with JSON-Schema (``nova/api/validation``): every parameter is
a list of strings (``?a=1&a=2``, webob's ``req.GET.dict_of_lists()``).  The ``properties``
keyword is checked first, in the schema's property order, each value in turn; then
``additionalProperties``: ``True`` schemas strip unknown parameters silently
(``_strip_additional_query_parameters``, keeping those matching ``patternProperties``),
``False`` ones (servers list from 2.75, most other APIs from 2.75 or 2.102) answer 400.
The handlers then read a parameter as webob's ``req.GET[key]`` does: the *last* value.

Every query-string rule of the read API lives here; links built from a query are in
:mod:`fastpath.api.links`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_to_bytes

from fastpath.errors import BadRequest


class Query:
    """The query string as webob's ``req.GET``: ordered (name, value) pairs, blank values kept."""

    __slots__ = ("items",)

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items = items

    @classmethod
    def of(cls, req: Any) -> Query:
        return cls.parse(req.query_string)

    @classmethod
    def parse(cls, query_string: str) -> Query:
        """``a=1&b=%C3%A9`` -> [("a", "1"), ("b", "é")], in order, blanks kept (webob's
        ``parse_qsl_text``: the raw bytes are split and percent-decoded, ``+`` is a space, a
        piece without ``=`` is a key with an empty value, then decoded as UTF-8).
        ``query_string`` is the raw query as latin-1 text (``Request.query_string``)."""
        items: list[tuple[str, str]] = []
        if not query_string:
            return cls(items)
        raw = query_string.encode("latin-1")
        try:
            for piece in raw.split(b"&"):
                if not piece:
                    continue
                k, _, v = piece.partition(b"=")
                key = unquote_to_bytes(k.replace(b"+", b" ")).decode("utf-8")
                value = unquote_to_bytes(v.replace(b"+", b" ")).decode("utf-8")
                items.append((key, value))
        except UnicodeDecodeError:
            raise BadRequest("Query string is not UTF-8 encoded") from None
        return cls(items)

    def __contains__(self, name: str) -> bool:
        return any(k == name for k, _ in self.items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The last value of ``name`` (webob's MultiDict ``get``)."""
        for k, v in reversed(self.items):
            if k == name:
                return v
        return default

    def first(self, name: str) -> str | None:
        """``req.GET.getall(name)[0]``."""
        for k, v in self.items:
            if k == name:
                return v
        return None

    def getall(self, name: str) -> list[str]:
        return [v for k, v in self.items if k == name]

    def names(self) -> list[str]:
        """Distinct names, in first-seen order."""
        return list(dict.fromkeys(k for k, _ in self.items))


# -- what the JSON-Schema validator says ------------------------------------------------------


def invalid(param: str, value: object, message: str) -> BadRequest:
    return BadRequest(f"Invalid input for query parameters {param}. Value: {value}. {message}")


def additional_not_allowed(extra: Iterable[str]) -> BadRequest:
    names = sorted(extra)
    verb = "was" if len(names) == 1 else "were"
    listed = ", ".join(repr(x) for x in names)
    return BadRequest(f"Additional properties are not allowed ({listed} {verb} unexpected)")


# Value checks of Nova's query schemas (parameter_types); each returns the jsonschema
# message of the first failing keyword, or None.
Check = Callable[[str], str | None]


def _integer(minimum: int) -> Check:
    # pattern ^[0-9]*$, minimum (Nova's validator compares the string as a number), minLength 1
    def check(v: str) -> str | None:
        if not re.fullmatch(r"[0-9]*", v):
            return f"{v!r} does not match '^[0-9]*$'"
        if v and int(v) < minimum:
            return f"{int(v)} is less than the minimum of {minimum}"
        if not v:
            return f"{v!r} should be non-empty"
        return None

    return check


NON_NEGATIVE_INT = _integer(0)
POSITIVE_INT = _integer(1)


def any_string(v: str) -> str | None:
    return None


def enum(values: Sequence[str]) -> Check:
    allowed = list(values)

    def check(v: str) -> str | None:
        return None if v in allowed else f"{v!r} is not one of {allowed!r}"

    return check


def regex(v: str) -> str | None:
    """``format: regex`` (common_query_regex_param): a non-empty string that compiles."""
    ok = bool(v)
    if ok:
        try:
            re.compile(v)
        except (re.error, RecursionError, OverflowError):
            ok = False
    return None if ok else f"{v!r} is not a 'regex'"


def date_time(v: str) -> str | None:
    """``format: date-time``."""
    return None if parse_isotime(v) is not None else f"{v!r} is not a 'date-time'"


def validate(q: Query, schema: Mapping[str, Check], additional: bool,
             patterns: Iterable[str] = ()) -> Query:
    """Nova's ``validation.query_schema``: each value of each property is checked, in schema
    order (400 ``Invalid input for query parameters ...``); then parameters neither in
    ``schema`` nor matching one of ``patterns`` (``patternProperties``) are refused when
    ``additional`` is False, else stripped.  Returns the query the handler goes on with."""
    for name, check in schema.items():
        for value in q.getall(name):
            msg = check(value)
            if msg is not None:
                raise invalid(name, value, msg)
    pats = [re.compile(p) for p in patterns]

    def known(name: str) -> bool:
        return name in schema or any(p.match(name) for p in pats)

    extra = [n for n in q.names() if not known(n)]
    if not extra:
        return q
    if not additional:
        raise additional_not_allowed(extra)
    return Query([(k, v) for k, v in q.items if known(k)])


def strict(req: Any, since: int = 102) -> None:
    """A query schema without properties (``additionalProperties: False`` from 2.``since``):
    any parameter is an error from that version, ignored before.  The query is parsed at
    every version: Nova's ``query_schema`` decodes it before looking at the version."""
    validate(Query.of(req), {}, req.version < since)


PAGINATION: dict[str, Check] = {"limit": NON_NEGATIVE_INT, "marker": any_string}


def limit_and_marker(q: Query, max_limit: int) -> tuple[int, str | None]:
    """Nova's ``common.get_limit_and_marker`` (after the schema accepted ``limit``)."""
    limit = max_limit
    v = q.get("limit")
    if v is not None:
        try:
            n = int(v)
        except ValueError:
            raise BadRequest("limit must be an integer") from None
        if n < 0:
            raise BadRequest("limit must be >= 0")
        limit = min(max_limit, n)
    return limit, q.get("marker")


def int_filter(q: Query, name: str) -> int | None:
    """An integer filter of a list (flavors' and images' ``minRam``/``minDisk``): None when
    absent, 400 ``Invalid {name} filter [{value}]`` when not an integer."""
    if name not in q:
        return None
    v = q.get(name) or ""
    try:
        return int(v)
    except ValueError:
        raise BadRequest(f"Invalid {name} filter [{v}]") from None


# -- values -------------------------------------------------------------------------------------

# oslo_utils.strutils
TRUE_STRINGS = ("1", "t", "true", "on", "y", "yes")
FALSE_STRINGS = ("0", "f", "false", "off", "n", "no")
_ACCEPTABLE = ", ".join(f"'{s}'" for s in sorted(TRUE_STRINGS + FALSE_STRINGS))


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
