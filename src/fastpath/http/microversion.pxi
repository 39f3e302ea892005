# Microversion negotiation, as Nova does it (api-guide microversions.rst; wsgi.py):
#   OpenStack-API-Version: compute X.Y   (wins when it names "compute"; may list services)
#   X-OpenStack-Nova-API-Version: X.Y    (legacy)
#   neither -> 2.1; "latest" -> 2.104; malformed -> 400; outside 2.1..2.104 -> 406.

cdef enum:
    MV_MALFORMED = -1
    MV_OTHER_MAJOR = -2

cdef str _mv_error = None        # message of the last failed negotiation


cdef inline bint _is_space(char c) noexcept:
    return c == b' ' or c == b'\t'


cdef int _parse_value(const char* s, Py_ssize_t n) noexcept:
    """Minor number for 'X.Y' with X == 2, MAX_VERSION for 'latest', or MV_* codes."""
    cdef Py_ssize_t i = 0, start
    cdef long major = 0, minor = 0
    while n > 0 and _is_space(s[n - 1]):
        n -= 1
    while i < n and _is_space(s[i]):
        i += 1
    s += i
    n -= i
    if n == 6 and (s[0] | 0x20) == b'l' and (s[1] | 0x20) == b'a' and (s[2] | 0x20) == b't' \
            and (s[3] | 0x20) == b'e' and (s[4] | 0x20) == b's' and (s[5] | 0x20) == b't':
        return MAX_VERSION
    # ^([1-9]\d*)\.([1-9]\d*|0)$  (APIVersionRequest's pattern)
    i = 0
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


cdef bint _find_compute(bytes header, const char** value, Py_ssize_t* length) noexcept:
    """Find the 'compute X.Y' entry of an OpenStack-API-Version header."""
    cdef const char* s = PyBytes_AS_STRING(header)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(header)
    cdef Py_ssize_t i = 0, a, b, item_end
    while i < n:
        item_end = i
        while item_end < n and s[item_end] != b',':
            item_end += 1
        a = i
        while a < item_end and _is_space(s[a]):
            a += 1
        b = a
        while b < item_end and not _is_space(s[b]):
            b += 1
        if b - a == 7 and (s[a] | 0x20) == b'c' and (s[a + 1] | 0x20) == b'o' \
                and (s[a + 2] | 0x20) == b'm' and (s[a + 3] | 0x20) == b'p' \
                and (s[a + 4] | 0x20) == b'u' and (s[a + 5] | 0x20) == b't' \
                and (s[a + 6] | 0x20) == b'e':
            value[0] = s + b
            length[0] = item_end - b
            return True
        i = item_end + 1
    return False


cdef int negotiate_version(Request req):
    """Set ``req.version``; return 0, or 400/406 with the message in ``_mv_error``."""
    global _mv_error
    cdef const char* value = NULL
    cdef Py_ssize_t length = 0
    cdef int minor
    cdef bytes raw
    if req.mv_new is not None and _find_compute(req.mv_new, &value, &length):
        pass
    elif req.mv_legacy is not None:
        value = PyBytes_AS_STRING(req.mv_legacy)
        length = PyBytes_GET_SIZE(req.mv_legacy)
    else:
        req.version = MIN_VERSION
        return 0
    minor = _parse_value(value, length)
    if MIN_VERSION <= minor <= MAX_VERSION:
        req.version = minor
        return 0
    raw = PyBytes_FromStringAndSize(value, length).strip()
    text = raw.decode("latin-1")
    if minor == MV_MALFORMED:
        _mv_error = (
            f"API Version String {text} is of invalid format. Must be of format MajorNum.MinorNum."
        )
        return 400
    _mv_error = (
        f"Version {text} is not supported by the API. Minimum is 2.{MIN_VERSION} "
        f"and maximum is 2.{MAX_VERSION}."
    )
    return 406
