# The asyncio protocol: httptools callbacks, limits, keep-alive, pipelining, back-pressure.
#
# A request is answered inline in on_message_complete when its handler is synchronous (every
# query is): pipelined requests are then answered in order without a queue.  A handler that
# returns an awaitable makes the connection busy; requests completed meanwhile wait in
# ``queue`` (reading is paused) and are answered in order when it finishes.
#
# httptools contract (parser.pyx): an exception raised in a callback aborts llhttp and
# feed_data() raises HttpParserCallbackError with the original as __context__; the parser
# must not be fed again.  We raise _Stop after recording what to answer in err_status.

class _Stop(Exception):
    pass

cdef enum:
    REQUEST_LINE_FRAMING = 15       # len("GET " + " HTTP/1.1\r\n"): the shortest method

cdef bytes _CRLF = b"\r\n"


cdef bint _valid_host(bytes value) noexcept:
    """uri-host [":" port] (RFC 3986): unreserved, pct-encoded, sub-delims, ":" "[" "]"."""
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(value)
    cdef Py_ssize_t i, n = PyBytes_GET_SIZE(value)
    cdef unsigned char c
    for i in range(n):
        c = s[i]
        if (b'a' <= c <= b'z') or (b'A' <= c <= b'Z') or (b'0' <= c <= b'9'):
            continue
        if c in b"-._~%!$&'()*+,;=:[]":
            continue
        return False
    return True


cdef inline bint _ieq(bytes name, const char* lower, Py_ssize_t n) noexcept:
    """Case-insensitive compare of a header name with a lower-case literal of length n."""
    cdef const char* s = PyBytes_AS_STRING(name)
    cdef Py_ssize_t i
    for i in range(n):
        if (s[i] | 0x20) != lower[i]:
            return False
    return True


@cython.final
@cython.freelist(64)
cdef class Request:
    """One HTTP request; cold (Python) handlers receive it."""

    def __cinit__(self):
        self.content_length = -1
        self.version = 0
        self.keep_alive = True
        self.captures = ()

    @property
    def method_str(self):
        return _METHOD_NAMES.get(self.method, self.method_name.decode("latin-1") if self.method_name else "")

    @property
    def path_str(self):
        return self.path.decode("utf-8", "replace") if self.path is not None else ""

    @property
    def query_string(self):
        return self.query.decode("latin-1") if self.query is not None else ""

    @property
    def params(self):
        """Path captures, percent-decoded, as str."""
        return tuple(c.decode("utf-8", "replace") for c in self.captures)

    @property
    def body(self):
        return bytes(self._body) if self._body is not None else b""

    @property
    def base_url(self):
        return base_url_for(self).decode("utf-8", "replace")

    @property
    def request_id(self):
        """This request's id ("req-" + uuid4), the one its response carries in
        X-OpenStack-Request-ID: a command uses it as its command id (docs/commands.md)."""
        if self.rid is None:
            self.rid = new_request_id()
        return self.rid.decode("ascii")



@cython.final
cdef class HttpProtocol:

    def __cinit__(self):
        self.transport = None
        self.req = None
        self.queue = None
        self.busy = False
        self.state = S_IDLE
        self.paused = 0
        self.deadline = 0
        self.err_status = 0
        self.err_message = None
        self.closing = False
        self.eof = False
        self.pending = 0
        self.fail_status = 0
        self.fail_message = None
        self.http10 = -1

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        self._write = transport.write
        self.parser = httptools.HttpRequestParser(self)
        self.state = S_IDLE
        # A new connection must send its first request within the header timeout.
        self.deadline = _now + _header_timeout
        _conns.add(self)
        if len(_conns) > _max_connections:
            self._fail_connection(503, "This worker has reached its connection limit; try again.")
        elif _worker is not None and _worker.stopping:
            # Accepted just before the listener closed: serve its first request, then close.
            self.closing = True

    def connection_lost(self, exc):
        _conns.discard(self)
        self.state = S_CLOSED
        self.transport = None
        self._write = None
        self.queue = None
        # PERF: the parser holds this protocol (its callbacks) and we hold the parser: break
        # the cycle so a closed connection is freed by refcounting, not by the cycle GC.
        self.parser = None
        self.req = None
        if _worker is not None and _worker.stopping:
            _worker._check_shutdown()

    def pause_writing(self):
        self._pause(PAUSE_WRITE)

    def resume_writing(self):
        self._resume(PAUSE_WRITE)

    def eof_received(self):
        # asyncio: returning True keeps the transport open.  A half-closed client still
        # gets the answers to what it sent; the connection closes after the last of them.
        if self.busy:
            self.eof = True
            return True
        return False

    def data_received(self, data):
        cdef Py_ssize_t tail
        if self.state == S_CLOSED or self.state == S_FAILED:
            return       # the parser is done with; what was received is answered, not read
        self.reported = False
        self.body_in_feed = 0
        self.url_in_feed = 0
        try:
            self.parser.feed_data(data)
        except HttpParserCallbackError as exc:
            if self.state == S_CLOSED:
                return
            if self.err_status > 0:
                self._fail_connection(self.err_status, self.err_message)
            elif self.err_status == 0:
                log.error("error while handling a request", exc_info=exc.__context__ or exc)
                self._fail_connection(500, "An unexpected error occurred while handling the request.")
            return
        except HttpParserUpgrade:
            # No protocol switching here: the request was answered (with Connection: close,
            # see on_headers_complete); end the connection.
            self.closing = True
            if not self.busy:
                self._close()
            return
        except HttpParserError as exc:
            # llhttp also refuses data after a "Connection: close" request: already closed.
            if self.state != S_CLOSED:
                self._fail_connection(400, f"Malformed request: {exc}")
            return
        if self.state != S_HEADERS and self.state != S_BODY:
            return
        # Bytes httptools holds without having reported them (a header line in progress,
        # a chunk extension, a trailer): it has no limit of its own, so bound them here.
        # Without a callback in this read, every byte of it is such a byte; otherwise the
        # line in progress is: the bytes after the last LF, less what callbacks reported
        # during this read (target, body) -- a lower bound, never a false 431.
        if not self.reported:
            self.pending += len(data)
        else:
            tail = _tail_after_lf(data) - self.url_in_feed - self.body_in_feed
            if tail > 0:
                self.pending = tail
        if self.pending + (self.req.header_bytes if self.state == S_HEADERS else 0) \
                > _max_header_size:
            self._fail_connection(431, "Request header fields too large.")

    # -- httptools callbacks --------------------------------------------------------------
    # Each callback marks ``reported``/resets ``pending`` (see data_received).

    def on_message_begin(self):
        # closing (after the answer in progress) refuses further requests -- except the
        # first request of a connection accepted just before a graceful stop.
        if (self.closing and self.used) or self.state == S_CLOSED:
            self.err_status = -1
            raise _Stop()
        self.used = True
        self.req = Request.__new__(Request)
        # The request line less its target (which on_url counts): "GET " + " HTTP/1.1\r\n".
        self.req.header_bytes = REQUEST_LINE_FRAMING
        self.state = S_HEADERS
        self.reported = True
        self.pending = 0
        self.deadline = _now + _header_timeout

    def on_url(self, bytes url):
        # Called once per fragment of the target (a split read gives several, some empty).
        cdef Request req = self.req
        cdef Py_ssize_t n = PyBytes_GET_SIZE(url)
        if n == 0:
            return
        if req.url is None:
            req.url = url
        else:
            req.url += url
        req.header_bytes += n
        self.url_in_feed += n
        self.reported = True
        self.pending = 0
        if req.header_bytes > _max_header_size:
            self._abort(431, "Request header fields too large.")

    def on_header(self, bytes name, bytes value):
        cdef Request req = self.req
        cdef Py_ssize_t n = PyBytes_GET_SIZE(name)
        # name ":" value CRLF (optional whitespace around the value is not counted)
        req.header_bytes += n + PyBytes_GET_SIZE(value) + 3
        req.header_count += 1
        self.reported = True
        self.pending = 0
        if req.header_bytes > _max_header_size or req.header_count > _max_headers:
            self._abort(431, "Request header fields too large.")
        if self.state != S_HEADERS:
            return       # a trailer (after a chunked body): counted, never interpreted
        if n == 4:
            if _ieq(name, b"host", 4):
                # RFC 9112 3.2: a request with more than one Host, or an invalid one, gets
                # 400.  The Host goes verbatim into the links of JSON bodies, so only the
                # characters of uri-host [":" port] are let through (no quote, backslash,
                # space or control character can reach a body).
                if req.host is not None or not _valid_host(value):
                    self._abort(400, "Bad request: invalid or repeated Host header.")
                req.host = value
        elif n == 12:
            if _ieq(name, b"x-auth-token", 12):
                req.token = value
            elif _ieq(name, b"content-type", 12):
                req.content_type = value
        elif n == 21:
            if _ieq(name, b"openstack-api-version", 21):
                req.mv_new = value if req.mv_new is None else req.mv_new + b"," + value
        elif n == 28:
            if _ieq(name, b"x-openstack-nova-api-version", 28):
                req.mv_legacy = value
        elif n == 14:
            if _ieq(name, b"content-length", 14):
                try:
                    req.content_length = int(value)
                except ValueError:
                    req.content_length = -1   # llhttp rejects it itself
        elif n == 10:
            if _ieq(name, b"connection", 10):
                req.has_connection = True
        elif n == 7:
            if _ieq(name, b"upgrade", 7):
                req.upgrade = True
        elif n == 6:
            if _ieq(name, b"expect", 6):
                if value.lower() == b"100-continue":
                    req.expect_continue = True
                else:
                    self._abort(417, "Only 'Expect: 100-continue' is supported.")

    def on_headers_complete(self):
        cdef Request req = self.req
        # PERF: get_method() allocates a bytes per request (httptools has no cheaper API);
        # the HTTP version is asked only when it matters (a kept HTTP/1.0 connection must be
        # announced, and HTTP/1.0 keeps a connection only when its Connection header says so).
        req.method_name = self.parser.get_method()
        req.method = method_code(req.method_name)
        req.keep_alive = self.parser.should_keep_alive()
        if req.keep_alive and req.has_connection:
            # PERF: get_http_version() formats a str; a connection keeps its HTTP version,
            # so ask once (were a client to switch, the worst is one keep-alive header too
            # many or too few -- both harmless).
            if self.http10 < 0:
                self.http10 = self.parser.get_http_version() == "1.0"
            req.http10 = self.http10 == 1
        if req.upgrade or req.method == M_OTHER:
            # llhttp treats "Upgrade" (with Connection: upgrade) and CONNECT as a switch of
            # protocols and stops parsing after this request: answer it, then close.
            if self.parser.should_upgrade():
                req.keep_alive = False
        self.reported = True
        self.pending = 0
        if req.content_length > _max_body_size:
            self._abort(413, f"Request body too large: the limit is {_max_body_size} bytes.")
        if req.expect_continue and self.transport is not None:
            self._check_before_continue(req)
            self._write(_CONTINUE)
        self.state = S_BODY
        self.deadline = _now + _body_timeout

    def on_body(self, bytes body):
        cdef Request req = self.req
        if req._body is None:
            req._body = bytearray(body)
        else:
            req._body += body
        self.reported = True
        self.body_in_feed += PyBytes_GET_SIZE(body)
        self.pending = 0
        if len(req._body) > _max_body_size:
            self._abort(413, f"Request body too large: the limit is {_max_body_size} bytes.")
        self.deadline = _now + _body_timeout

    def on_message_complete(self):
        self._message_complete()

    # -- requests -------------------------------------------------------------------------
    cdef _message_complete(self):
        cdef Request req = self.req
        self.req = None
        self.state = S_IDLE
        self.deadline = 0
        self.reported = True
        self.pending = 0
        if self.busy:
            # An asynchronous response is in progress: wait in line, stop reading more.
            if self.queue is None:
                self.queue = collections.deque()
            self.queue.append(req)
            self._pause(PAUSE_QUEUE)
            return
        self._dispatch(req)
        if not self.busy:
            self._after_response(req)

    cdef int _split_target(self, Request req):
        """Set req.path and req.query from the request target; 400 when it is unusable."""
        cdef bytes url = req.url
        cdef const char* s
        cdef Py_ssize_t n, i
        if url is None:
            return 400
        s = PyBytes_AS_STRING(url)
        n = PyBytes_GET_SIZE(url)
        if s[0] != b'/':
            url = _origin_form(req, url)
            if url is None:
                return 400
            s = PyBytes_AS_STRING(url)
            n = PyBytes_GET_SIZE(url)
        i = 0
        while i < n and s[i] != b'?':
            i += 1
        if i < n:
            req.path = PyBytes_FromStringAndSize(s, i)
            req.query = PyBytes_FromStringAndSize(s + i + 1, n - i - 1)
        else:
            req.path = url
            req.query = None
        return 0

    cdef _check_before_continue(self, Request req):
        """Expect: 100-continue: refuse at once what would be refused after the body (bad
        target, no route, no token), so the client does not send a body for nothing (RFC
        9110 10.1.1: the server may answer with the final status instead of 100)."""
        cdef Route route
        if self._split_target(req) != 0:
            self._abort(400, "Malformed request: bad request target.")
        route = lookup(req)
        if route is None:
            if _lookup_auth and not authenticate(req):
                self._abort(401, "The request you have made requires authentication.")
            elif _lookup_status == 405:
                self._abort(405, "The method is not allowed for this resource.")
            self._abort(404, "The resource could not be found.")
        if route.auth and not authenticate(req):
            self._abort(401, "The request you have made requires authentication.")

    cdef _dispatch(self, Request req):
        cdef Route route
        cdef int status
        if self._split_target(req) != 0:
            self._respond_error(req, 400, "Malformed request: bad request target.")
            return
        route = lookup(req)
        if route is None:
            if _lookup_auth and not authenticate(req):
                self._respond(req, 401, _BODY_401, None)
            elif _lookup_status == 405:
                self._respond(req, 405, _BODY_405, _lookup_allow)
            else:
                self._respond(req, 404, _BODY_404, None)
            return
        req.route = route
        if route.auth and not authenticate(req):
            self._respond(req, 401, _BODY_401, None)
            return
        if route.versioned:
            status = negotiate_version(req)
            if status != 0:
                self._respond_error(req, status, _mv_error)
                return
        if req.url_project is not None and req.project is not None \
                and req.url_project.decode("utf-8", "replace") != req.project:
            self._respond_error(
                req, 400,
                f"Malformed request URL: URL's project_id '{req.url_project.decode('utf-8', 'replace')}'"
                f" doesn't match Context's project_id '{req.project}'")
            return
        if route.kind == K_PYTHON:
            self._call_python(req, route)
        else:
            dispatch_core(self, req, route.kind)

    cdef _call_python(self, Request req, Route route):
        try:
            result = route.handler(req)
        except HTTPFault as fault:
            self._respond_fault(req, fault)
            return
        except Exception:
            log.exception("handler of %s failed", route.name)
            self._respond_error(req, 500, "An unexpected error occurred while handling the request.")
            return
        if type(result) is tuple:
            self._respond_result(req, result)
            return
        # An awaitable: the connection is busy until it resolves.
        try:
            task = _loop.create_task(result)
        except Exception:
            log.exception("handler of %s returned neither a tuple nor an awaitable: %r",
                          route.name, result)
            self._respond_error(req, 500, "An unexpected error occurred while handling the request.")
            return
        self.busy = True
        task.add_done_callback(_AsyncDone(self, req))

    cdef _respond_result(self, Request req, object result):
        """Send a handler's (status, body[, extra headers[, content-type line]])."""
        cdef Py_ssize_t n = len(result) if type(result) is tuple else 0
        status = result[0] if n >= 2 else None
        body = result[1] if n >= 2 else None
        extra = result[2] if n > 2 else None
        ctype = result[3] if n > 3 else _H_JSON
        # A malformed result is a handler bug: a logged 500, never a crash of the connection.
        if n < 2 or n > 4 or type(status) is not int or not (100 <= status <= 599) \
                or type(body) is not bytes or (extra is not None and type(extra) is not bytes) \
                or type(ctype) is not bytes:
            log.error("handler of %s returned an invalid result: %.200r",
                      req.route.name if req.route is not None else "?", result)
            self._respond_error(req, 500, "An unexpected error occurred while handling the request.")
            return
        self._send(req, <int>status, <bytes>ctype, <bytes>body, <bytes>extra)

    cdef _respond_fault(self, Request req, object fault):
        """An HTTPFault raised by a handler: Nova's fault body, with the fault's headers."""
        cdef bytes extra = None
        status = fault.status
        try:
            if fault.headers:
                extra = b"".join(<bytes>k + b": " + <bytes>v + _CRLF for k, v in fault.headers)
            if type(status) is not int or not (400 <= status <= 599):
                raise TypeError(f"bad status {status!r}")
            message = str(fault.message)
        except Exception:
            log.exception("invalid HTTPFault from %s", req.route.name if req.route else "?")
            self._respond_error(req, 500, "An unexpected error occurred while handling the request.")
            return
        self._respond_error(req, status, message, extra)

    def _async_done(self, Request req, task):
        cdef Request nxt
        self.busy = False
        try:
            # Retrieved even when the client is gone: a task whose exception is never
            # retrieved is reported by asyncio as an error of its own.
            result = task.result()
        except HTTPFault as fault:
            if self.state != S_CLOSED:
                self._respond_fault(req, fault)
        except BaseException:
            log.exception("asynchronous handler of %s failed", req.route.name if req.route else "?")
            if self.state != S_CLOSED:
                self._respond_error(req, 500, "An unexpected error occurred while handling the request.")
        else:
            if self.state != S_CLOSED:
                self._respond_result(req, result)
        if self.state == S_CLOSED:
            return
        self._after_response(req)
        # Answer the requests that queued up behind it, in order.
        while self.queue is not None and len(self.queue) > 0 and not self.busy \
                and self.state != S_CLOSED:
            nxt = self.queue.popleft()
            self._dispatch(nxt)
            if not self.busy:
                self._after_response(nxt)
        if self.busy or self.state == S_CLOSED:
            return
        if self.state == S_FAILED:
            self._fail_connection(self.fail_status, self.fail_message)
        else:
            self._resume(PAUSE_QUEUE)

    # -- responses ------------------------------------------------------------------------
    cdef _send(self, Request req, int status, bytes content_type, bytes body, bytes extra):
        cdef bint close = self.closing or not req.keep_alive or self.state == S_FAILED
        cdef bint head = req.method == M_HEAD
        cdef bytes data
        if self.transport is None or self.state == S_CLOSED:
            return
        data = render_response(status, content_type, body, req.version, extra, close,
                               req.http10 and not close, head, True, req.rid)
        if head or PyBytes_GET_SIZE(body) <= COPY_LIMIT:
            self._write(data)
        else:
            self.transport.writelines((data, body))
        metrics_count(req.route.index if req.route is not None else 0, status)

    cdef _respond(self, Request req, int status, bytes body, bytes extra):
        self._send(req, status, _H_JSON, body, extra)

    cdef _respond_error(self, Request req, int status, str message, bytes extra=None):
        self._send(req, status, _H_JSON, error_body(status, message), extra)

    cdef _after_response(self, Request req):
        if self.state == S_CLOSED or self.state == S_FAILED:
            return
        if self.closing or not req.keep_alive \
                or (self.eof and not self.busy and (self.queue is None or len(self.queue) == 0)):
            self._close()
            return
        if self.state == S_IDLE:
            self.deadline = _now + _keepalive_timeout

    cdef _abort(self, int status, str message):
        """From a parser callback: answer ``status`` and close, after feed_data returns."""
        self.err_status = status
        self.err_message = message
        raise _Stop()

    cdef _fail_connection(self, int status, str message):
        """A protocol-level error: answer it and close.  Behind an asynchronous response the
        answer waits its turn (requests before it are answered first, in order)."""
        cdef Request req
        if self.state == S_CLOSED:
            return
        if self.busy:
            self.state = S_FAILED
            self.fail_status = status
            self.fail_message = message
            self.deadline = 0
            self._pause(PAUSE_QUEUE)
            return
        if self.transport is not None:
            req = Request.__new__(Request)
            req.keep_alive = False
            req.method = M_OTHER
            self._send(req, status, _H_JSON, error_body(status, message), None)
        self._close()

    def timed_out(self):
        if self.busy:
            return                      # our turn, not the client's: no timeout runs
        if self.state == S_IDLE:
            self._close()               # idle keep-alive connection: just close
        else:
            self._fail_connection(408, "The client did not send its request in time.")

    def shutdown(self):
        """Graceful stop: close when idle, else after the response in progress."""
        self.closing = True
        # A connection that has not begun its first request yet is not idle:
        # it was accepted just before the listener closed and its request is on the way.
        # It is answered (with Connection: close) or times out under the header timeout.
        if self.state == S_IDLE and not self.busy and self.used:
            self._close()

    cdef _pause(self, int reason):
        if self.paused == 0 and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    cdef _resume(self, int reason):
        if self.paused & reason:
            self.paused &= ~reason
            if self.paused == 0 and self.transport is not None and self.state != S_CLOSED:
                self.transport.resume_reading()

    cdef _close(self):
        if self.state == S_CLOSED:
            return
        self.state = S_CLOSED
        self.deadline = 0
        if self.transport is not None:
            self.transport.close()


cdef Py_ssize_t _tail_after_lf(object data):
    """Bytes after the last LF of ``data`` (all of it when there is none)."""
    cdef bytes b = data if type(data) is bytes else bytes(data)
    cdef const char* s = PyBytes_AS_STRING(b)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    cdef Py_ssize_t i = n
    while i > 0 and s[i - 1] != b'\n':
        i -= 1
    return n - i


cdef bytes _origin_form(Request req, bytes url):
    """Path and query of an absolute-form target (RFC 9112 3.2.2); its authority replaces
    the Host header.  None for anything else (asterisk-form: no OPTIONS * here)."""
    cdef Py_ssize_t i = url.find(b"://")
    cdef Py_ssize_t j, k
    if i <= 0:
        return None
    i += 3
    j = url.find(b"/", i)
    k = url.find(b"?", i)
    if j < 0 or (0 <= k < j):
        j = k
    authority = url[i:] if j < 0 else url[i:j]
    if not authority or b"@" in authority:
        return None
    req.host = authority
    if j < 0:
        return b"/"
    return url[j:] if url[j] == 0x2F else b"/" + url[j:]


@cython.final
cdef class _AsyncDone:
    """Done-callback of an asynchronous handler (bound to its connection and request)."""
    cdef HttpProtocol proto
    cdef Request req

    def __cinit__(self, HttpProtocol proto, Request req):
        self.proto = proto
        self.req = req

    def __call__(self, task):
        self.proto._async_done(self.req, task)


cdef bint authenticate(Request req) except -1:
    """noauth2 (Nova's old development convention), or the plan's authenticator.

    noauth2: X-Auth-Token is "user:project"; a token without ':' (openstacksdk's
    auth_type none sends "notused") is a user of the default project; ":x" and "x:" are
    refused.  The admin user has the admin role.
    """
    cdef bytes token = req.token
    cdef const char* s
    cdef const char* colon
    cdef Py_ssize_t n, i
    if req.user is not None:
        return True
    if token is None or PyBytes_GET_SIZE(token) == 0:
        return False
    if _authenticator is not None:
        ident = _authenticator(token)
        if ident is None:
            return False
        req.user, req.project, req.is_admin = ident
        return True
    # PERF: split and decode in C (no slices, no find() call).
    s = PyBytes_AS_STRING(token)
    n = PyBytes_GET_SIZE(token)
    # User and project names end up in URLs and JSON bodies: visible ASCII only, and none
    # of the characters that would need escaping there (quote, backslash, slash, percent).
    for i in range(n):
        if s[i] <= 32 or s[i] >= 127 or s[i] == b'"' or s[i] == b'\\' or s[i] == b'/' \
                or s[i] == b'%':
            return False
    colon = <const char*>memchr(s, b':', n)
    if colon == NULL:
        req.user = PyUnicode_DecodeUTF8(s, n, "replace")
        req.project = _default_project
    else:
        i = colon - s
        if i == 0 or i == n - 1:
            return False
        req.user = PyUnicode_DecodeUTF8(s, i, "replace")
        req.project = PyUnicode_DecodeUTF8(s + i + 1, n - i - 1, "replace")
    req.is_admin = req.user == _admin_user
    return True
