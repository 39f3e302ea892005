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

cdef bytes _CRLF = b"\r\n"


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
        self.stall_bytes = 0

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
            self._fail_connection(503, "The server is shutting down.")

    def connection_lost(self, exc):
        _conns.discard(self)
        self.state = S_CLOSED
        self.transport = None
        self._write = None
        self.queue = None
        if _worker is not None and _worker.stopping:
            _worker._check_shutdown()

    def pause_writing(self):
        self._pause(PAUSE_WRITE)

    def resume_writing(self):
        self._resume(PAUSE_WRITE)

    def eof_received(self):
        # A half-closed client still gets the answers to what it sent.
        return self.busy or (self.queue is not None and len(self.queue) > 0)

    def data_received(self, data):
        if self.state == S_CLOSED:
            return
        try:
            self.parser.feed_data(data)
        except HttpParserCallbackError as exc:
            if self.err_status > 0:
                self._fail_connection(self.err_status, self.err_message)
            elif self.err_status == 0:
                log.error("error while handling a request", exc_info=exc.__context__ or exc)
                self._fail_connection(500, "An unexpected error occurred while handling the request.")
            return
        except HttpParserUpgrade:
            # No protocol switching here: the request was answered; end the connection.
            self.closing = True
            if not self.busy:
                self._close()
            return
        except HttpParserError as exc:
            self._fail_connection(400, f"Malformed request: {exc}")
            return
        if self.state == S_HEADERS:
            # Bytes httptools holds for a header not yet reported (see on_header): bounded.
            if self.stall_bytes < 0:
                self.stall_bytes = 0
            else:
                self.stall_bytes += len(data)
            if self.req is not None and self.req.header_bytes + self.stall_bytes > _max_header_size:
                self._fail_connection(431, "Request header fields too large.")

    # -- httptools callbacks --------------------------------------------------------------
    def on_message_begin(self):
        if self.state == S_CLOSED or self.closing:
            self.err_status = -1
            raise _Stop()
        self.req = Request.__new__(Request)
        self.state = S_HEADERS
        self.stall_bytes = -1
        self.deadline = _now + _header_timeout

    def on_url(self, bytes url):
        cdef Request req = self.req
        if req.url is None:
            req.url = url
        else:
            req.url += url
        req.header_bytes += PyBytes_GET_SIZE(url) + 12
        self.stall_bytes = -1
        if req.header_bytes > _max_header_size:
            self._abort(431, "Request header fields too large.")

    def on_header(self, bytes name, bytes value):
        cdef Request req = self.req
        cdef Py_ssize_t n = PyBytes_GET_SIZE(name)
        req.header_bytes += n + PyBytes_GET_SIZE(value) + 4
        req.header_count += 1
        self.stall_bytes = -1
        if req.header_bytes > _max_header_size or req.header_count > _max_headers:
            self._abort(431, "Request header fields too large.")
        if n == 4:
            if _ieq(name, b"host", 4):
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
        elif n == 6:
            if _ieq(name, b"expect", 6):
                if value.lower() == b"100-continue":
                    req.expect_continue = True
                else:
                    self._abort(417, "Only 'Expect: 100-continue' is supported.")

    def on_headers_complete(self):
        cdef Request req = self.req
        req.method_name = self.parser.get_method()
        req.method = method_code(req.method_name)
        req.keep_alive = self.parser.should_keep_alive()
        req.http10 = self.parser.get_http_version() == "1.0"
        if req.content_length > _max_body_size:
            self._abort(413, f"Request body too large: the limit is {_max_body_size} bytes.")
        if req.expect_continue and self.transport is not None:
            self._write(_CONTINUE)
        self.state = S_BODY
        self.deadline = _now + _body_timeout

    def on_body(self, bytes body):
        cdef Request req = self.req
        if req._body is None:
            req._body = bytearray(body)
        else:
            req._body += body
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
        if self.busy or (self.queue is not None and len(self.queue) > 0):
            if self.queue is None:
                self.queue = collections.deque()
            self.queue.append(req)
            self._pause(PAUSE_QUEUE)
            return
        self._dispatch(req)
        if not self.busy:
            self._after_response(req)

    cdef _dispatch(self, Request req):
        cdef bytes url = req.url
        cdef const char* s
        cdef Py_ssize_t n, i
        cdef Route route
        cdef int status
        if url is None:
            self._respond_error(req, 400, "Malformed request: no request target.")
            return
        s = PyBytes_AS_STRING(url)
        n = PyBytes_GET_SIZE(url)
        if n > 0 and s[0] != b'/':
            # absolute-form (RFC 9112 3.2.2): drop scheme and authority
            i = url.find(b"://")
            if i < 0:
                self._respond_error(req, 400, "Malformed request: bad request target.")
                return
            i = url.find(b"/", i + 3)
            url = b"/" if i < 0 else url[i:]
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
        route = lookup(req)
        if route is None:
            if _lookup_auth and not authenticate(req):
                self._respond_error(req, 401, "The request you have made requires authentication.")
            elif _lookup_status == 405:
                self._respond_error(req, 405, "The method is not allowed for this resource.",
                                    b"Allow: " + <bytes>req.captures[0] + _CRLF)
            else:
                self._respond_error(req, 404, "The resource could not be found.")
            return
        req.route = route
        if route.auth and not authenticate(req):
            self._respond_error(req, 401, "The request you have made requires authentication.")
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
            self._respond_error(req, fault.status, fault.message,
                                b"".join(k + b": " + v + _CRLF for k, v in fault.headers) or None)
            return
        except Exception:
            log.exception("handler of %s failed", route.name)
            self._respond_error(req, 500, "An unexpected error occurred while handling the request.")
            return
        if type(result) is tuple:
            self._respond_result(req, result)
            return
        # An awaitable: the connection is busy until it resolves.
        self.busy = True
        task = _loop.create_task(result)
        task.add_done_callback(_AsyncDone(self, req))

    cdef _respond_result(self, Request req, tuple result):
        cdef Py_ssize_t n = len(result)
        extra = result[2] if n > 2 else None
        ctype = result[3] if n > 3 else _H_JSON
        self._send(req, result[0], ctype, result[1], extra)

    def _async_done(self, Request req, task):
        cdef Request nxt
        self.busy = False
        if self.state == S_CLOSED:
            return
        try:
            result = task.result()
        except HTTPFault as fault:
            self._respond_error(req, fault.status, fault.message)
        except BaseException:
            log.exception("asynchronous handler of %s failed", req.route.name if req.route else "?")
            self._respond_error(req, 500, "An unexpected error occurred while handling the request.")
        else:
            self._respond_result(req, result)
        self._after_response(req)
        # Answer the requests that queued up behind it, in order.
        while self.queue is not None and len(self.queue) > 0 and not self.busy \
                and self.state != S_CLOSED:
            nxt = self.queue.popleft()
            self._dispatch(nxt)
            if not self.busy:
                self._after_response(nxt)
        if not self.busy and self.state != S_CLOSED:
            self._resume(PAUSE_QUEUE)

    # -- responses ------------------------------------------------------------------------
    cdef _send(self, Request req, int status, bytes content_type, bytes body, bytes extra):
        cdef bint close = self.closing or not req.keep_alive
        cdef bint head = req.method == M_HEAD
        cdef bytes data
        if self.transport is None:
            return
        data = render_response(status, content_type, body, req.version, extra, close,
                               req.http10 and not close, head, True)
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
        if self.state == S_CLOSED:
            return
        if self.closing or not req.keep_alive:
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
        """A protocol-level error: answer (if the connection is not busy) and close."""
        cdef Request req
        if self.transport is not None and not self.busy:
            req = Request.__new__(Request)
            req.keep_alive = False
            req.method = M_OTHER
            self._send(req, status, _H_JSON, error_body(status, message), None)
        self._close()

    def timed_out(self):
        if self.state == S_IDLE:
            self._close()               # idle keep-alive connection: just close
        else:
            self._fail_connection(408, "The client did not send its request in time.")

    def shutdown(self):
        """Graceful stop: close when idle, else after the response in progress."""
        self.closing = True
        if self.state == S_IDLE and not self.busy:
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
        if self.state == S_CLOSED and self.transport is None:
            return
        self.state = S_CLOSED
        self.deadline = 0
        if self.transport is not None:
            self.transport.close()


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


cdef bint authenticate(Request req):
    """noauth2 (Nova's old development convention), or the plan's authenticator."""
    cdef bytes token = req.token
    cdef Py_ssize_t i
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
    i = token.find(b":")
    if i < 0:
        req.user = token.decode("utf-8", "replace")
        req.project = _default_project
    else:
        if i == 0 or i == PyBytes_GET_SIZE(token) - 1:
            return False
        req.user = token[:i].decode("utf-8", "replace")
        req.project = token[i + 1:].decode("utf-8", "replace")
    req.is_admin = req.user == _admin_user
    return True
