# Microversion negotiation, as Nova does it (api-guide microversions.rst; wsgi.py
# set_api_version_request, which reads the headers with microversion_parse.get_version):
#   OpenStack-API-Version: compute X.Y   (wins when it names "compute"; may list services;
#                                         the last compute entry counts)
#   X-OpenStack-Nova-API-Version: X.Y    (legacy; its last comma-separated item counts)
#   neither -> 2.1; "latest" -> 2.104; malformed -> 400; outside 2.1..2.104 -> 406.
# PERF: all in C on the header bytes; only a refusal builds a Python string.

cdef enum:
    MV_MALFORMED = -1
    MV_OTHER_MAJOR = -2

cdef str _mv_error = None        # message of the last failed negotiation


cdef inline bint _is_space(char c) noexcept:
    return c == b' ' or c == b'\t'


cdef int _parse_value(const char* s, Py_ssize_t n) noexcept:
    """Minor number for 'X.Y' with X == 2, MV_MAX for 'latest', or MV_* codes.

    ``s[:n]`` is already stripped of surrounding whitespace.
    """
    cdef Py_ssize_t i = 0, start
    cdef long major = 0, minor = 0
    # Nova compares with 'latest' exactly (wsgi.py set_api_version_request): 'LATEST' is
    # a malformed version there, and here.
    if n == 6 and memcmp(s, b"latest", 6) == 0:
        return MV_MAX
    # ^([1-9]\d*)\.([1-9]\d*|0)$  (APIVersionRequest's pattern)
    if i >= n or s[i] < b'1' or s[i] > b'9':
        return MV_MALFORMED
    start = i
    while i < n and b'0' <= s[i] <= b'9':
        if i - start < 9:
            major = major * 10 + (s[i] - 48)
        i += 1
    if i - start > 9:
        major = 1000000000
    if i >= n or s[i] != b'.':
        return MV_MALFORMED
    i += 1
    if i >= n:
        return MV_MALFORMED
    start = i
    if s[i] == b'0':
        if i + 1 != n:
            return MV_MALFORMED
        i += 1
    else:
        while i < n and b'0' <= s[i] <= b'9':
            if i - start < 9:
                minor = minor * 10 + (s[i] - 48)
            i += 1
        if i != n:
            return MV_MALFORMED
        if i - start > 9:
            minor = 1000000000
    if major != 2:
        return MV_OTHER_MAJOR
    return <int>minor


cdef inline void _strip(const char* s, Py_ssize_t* a, Py_ssize_t* b) noexcept:
    """Narrow s[a:b] to exclude surrounding spaces and tabs."""
    while a[0] < b[0] and _is_space(s[a[0]]):
        a[0] += 1
    while b[0] > a[0] and _is_space(s[b[0] - 1]):
        b[0] -= 1


cdef bint _find_compute(bytes header, const char** value, Py_ssize_t* length) noexcept:
    """The version of the 'compute' entry of an OpenStack-API-Version header.

    As microversion_parse.check_standard_header: the comma-separated entries are
    "<service> <version>"; the last entry naming compute (case-insensitively) wins; an
    entry without a version is skipped.
    """
    cdef const char* s = PyBytes_AS_STRING(header)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(header)
    cdef Py_ssize_t item_start = n, item_end = n, a, b, c
    while item_end >= 0:
        # entries from the last to the first
        item_start = item_end
        while item_start > 0 and s[item_start - 1] != b',':
            item_start -= 1
        a = item_start
        b = item_end
        _strip(s, &a, &b)
        c = a
        while c < b and not _is_space(s[c]):
            c += 1
        if c - a == 7 and c < b and (s[a] | 0x20) == b'c' and (s[a + 1] | 0x20) == b'o' \
                and (s[a + 2] | 0x20) == b'm' and (s[a + 3] | 0x20) == b'p' \
                and (s[a + 4] | 0x20) == b'u' and (s[a + 5] | 0x20) == b't' \
                and (s[a + 6] | 0x20) == b'e':
            _strip(s, &c, &b)
            value[0] = s + c
            length[0] = b - c
            return True
        item_end = item_start - 1
    return False


cdef void _last_item(bytes header, const char** value, Py_ssize_t* length) noexcept:
    """The last comma-separated item, stripped (microversion_parse.check_legacy_headers)."""
    cdef const char* s = PyBytes_AS_STRING(header)
    cdef Py_ssize_t a = PyBytes_GET_SIZE(header), b = a
    while a > 0 and s[a - 1] != b',':
        a -= 1
    _strip(s, &a, &b)
    value[0] = s + a
    length[0] = b - a


cdef int negotiate_version(Request req):
    """Set ``req.version``; return 0, or 400/406 with the message in ``_mv_error``."""
    global _mv_error
    cdef const char* value = NULL
    cdef Py_ssize_t length = 0
    cdef int minor
    if req.mv_new is not None and _find_compute(req.mv_new, &value, &length):
        pass
    elif req.mv_legacy is not None:
        _last_item(req.mv_legacy, &value, &length)
    else:
        req.version = MV_MIN
        return 0
    minor = _parse_value(value, length)
    if MV_MIN <= minor <= MV_MAX:
        req.version = minor
        return 0
    text = PyBytes_FromStringAndSize(value, length).decode("latin-1")
    if minor == MV_MALFORMED:
        _mv_error = (
            f"API Version String {text} is of invalid format. Must be of format MajorNum.MinorNum."
        )
        return 400
    _mv_error = (
        f"Version {text} is not supported by the API. Minimum is 2.{MV_MIN} "
        f"and maximum is 2.{MV_MAX}."
    )
    return 406
