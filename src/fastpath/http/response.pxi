# Responses: one buffer, one transport.write() of head + body.
#
# PERF: the status line, the constant headers and the microversion header blocks are
# rendered once at import; per response only Content-Length and the request ids are
# formatted, into a reusable C buffer.

import http as _http

cdef list _status_lines = [None] * 600
for _code in range(100, 600):
    try:
        _reason = _http.HTTPStatus(_code).phrase
    except ValueError:
        _reason = "Unknown"
    _status_lines[_code] = f"HTTP/1.1 {_code} {_reason}\r\n".encode("ascii")
del _code, _reason

cdef bytes _H_JSON = b"Content-Type: application/json\r\n"
cdef bytes _H_TEXT = b"Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
cdef bytes _H_CLOSE = b"Connection: close\r\n"
cdef bytes _H_KEEP = b"Connection: keep-alive\r\n"
cdef bytes _CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# Index = microversion minor: the three headers Nova sends on every versioned response.
cdef list _version_headers = [None] * (MV_MAX + 1)
for _minor in range(MV_MIN, MV_MAX + 1):
    _version_headers[_minor] = (
        f"OpenStack-API-Version: compute 2.{_minor}\r\n"
        f"X-OpenStack-Nova-API-Version: 2.{_minor}\r\n"
        "Vary: OpenStack-API-Version, X-OpenStack-Nova-API-Version\r\n"
    ).encode("ascii")
del _minor

# Large bodies go out with writelines() (one vectored write) instead of a copy.
DEF COPY_LIMIT = 65536

cdef char* _wbuf = NULL
cdef Py_ssize_t _wcap = 0


cdef inline char* _wbuf_reserve(Py_ssize_t need) except NULL:
    global _wbuf, _wcap
    cdef char* p
    if need > _wcap:
        p = <char*>realloc(_wbuf, need + 4096)
        if p == NULL:
            raise MemoryError()
        _wbuf = p
        _wcap = need + 4096
    return _wbuf


cdef inline Py_ssize_t _put(char* buf, Py_ssize_t pos, bytes b) noexcept:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    memcpy(buf + pos, PyBytes_AS_STRING(b), n)
    return pos + n


cdef inline Py_ssize_t _put_uint(char* buf, Py_ssize_t pos, Py_ssize_t value) noexcept:
    cdef char tmp[24]
    cdef int i = 0
    if value == 0:
        buf[pos] = b'0'
        return pos + 1
    while value > 0:
        tmp[i] = <char>(48 + value % 10)
        value //= 10
        i += 1
    while i > 0:
        i -= 1
        buf[pos] = tmp[i]
        pos += 1
    return pos


cdef bytes render_response(int status, bytes content_type, bytes body, int version,
                           bytes extra, bint close, bint keep_alive_10, bint head_only,
                           bint with_request_id, bytes rid=None):
    """Head (+ body unless ``head_only`` or too large: the caller writes it then)."""
    cdef bytes status_line = <bytes>_status_lines[status]
    cdef bytes vh = <bytes>_version_headers[version] if version > 0 else None
    cdef Py_ssize_t blen = PyBytes_GET_SIZE(body)
    cdef bint inline_body = not head_only and blen <= COPY_LIMIT
    # 512: Date, Content-Length, request ids and Connection lines, well within it; every
    # variable-length part (handlers choose content type and extra headers) is added.
    cdef Py_ssize_t need = 512 + PyBytes_GET_SIZE(status_line) + PyBytes_GET_SIZE(content_type) \
        + (blen if inline_body else 0)
    if vh is not None:
        need += PyBytes_GET_SIZE(vh)
    if extra is not None:
        need += PyBytes_GET_SIZE(extra)
    cdef char* buf = _wbuf_reserve(need)
    cdef Py_ssize_t pos = _put(buf, 0, status_line)
    memcpy(buf + pos, _date_line, _date_len)
    pos += _date_len
    pos = _put(buf, pos, content_type)
    memcpy(buf + pos, b"Content-Length: ", 16)
    pos = _put_uint(buf, pos + 16, blen)
    buf[pos] = b'\r'
    buf[pos + 1] = b'\n'
    pos += 2
    cdef const char* idp = _reqid
    if with_request_id:
        if rid is not None and PyBytes_GET_SIZE(rid) == 40:
            idp = PyBytes_AS_STRING(rid)  # a handler took this request's id already
        else:
            next_request_id()
        memcpy(buf + pos, b"X-OpenStack-Request-ID: ", 24)
        memcpy(buf + pos + 24, idp, 40)
        memcpy(buf + pos + 64, b"\r\nX-Compute-Request-ID: ", 24)
        memcpy(buf + pos + 88, idp, 40)
        buf[pos + 128] = b'\r'
        buf[pos + 129] = b'\n'
        pos += 130
    if vh is not None:
        pos = _put(buf, pos, vh)
    if extra is not None:
        pos = _put(buf, pos, extra)
    if close:
        pos = _put(buf, pos, _H_CLOSE)
    elif keep_alive_10:
        pos = _put(buf, pos, _H_KEEP)
    buf[pos] = b'\r'
    buf[pos + 1] = b'\n'
    pos += 2
    if inline_body and blen:
        memcpy(buf + pos, PyBytes_AS_STRING(body), blen)
        pos += blen
    return PyBytes_FromStringAndSize(buf, pos)


cdef bytes json_escape_str(str text):
    return json.dumps(text).encode("utf-8")


cdef bytes error_body(int status, str message):
    """Nova's fault body: {"<faultName>": {"code": N, "message": "..."}}."""
    return (
        b'{"' + fault_name(status).encode("ascii") + b'": {"code": '
        + str(status).encode("ascii") + b', "message": ' + json_escape_str(message) + b'}}'
    )


# PERF: the router's own answers never change: rendered once.
cdef bytes _BODY_401 = error_body(401, "The request you have made requires authentication.")
cdef bytes _BODY_404 = error_body(404, "The resource could not be found.")
cdef bytes _BODY_405 = error_body(405, "The method is not allowed for this resource.")
