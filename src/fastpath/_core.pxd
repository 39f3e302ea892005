# The object model of the request path: read this page first.
#
# _core.pyx holds behaviour and pulls in the pieces by concern (http/*.pxi) so that every
# call between them is a direct C call in one translation unit (the uvloop layout).
# Python builds a route plan at start-up (fastpath.api.routes); Worker compiles it into the
# RouteNode tree below; per request only this compiled plan runs.

from libc.stdint cimport uint64_t, int64_t


# Nova's microversion range: 2.MV_MIN .. 2.MV_MAX (nova/api/openstack/api_version_request.py).
cdef enum:
    MV_MIN = 1
    MV_MAX = 104
    N_METHODS = 8        # Method values are 0 .. N_METHODS - 1


cdef enum Method:
    M_OTHER = 0
    M_GET = 1
    M_HEAD = 2
    M_POST = 3
    M_PUT = 4
    M_DELETE = 5
    M_PATCH = 6
    M_OPTIONS = 7


# What answers a route: a handler compiled into _core (hot) or a Python callable (cold).
cdef enum Kind:
    K_PYTHON = 0
    K_VERSIONS = 1       # GET /            version list (not microversioned, no auth)
    K_VERSION_V21 = 2    # GET /v2.1/       version document
    K_VERSION_V2 = 3     # GET /v2/         legacy version document
    K_HEALTHZ = 4        # GET /healthz


# Kinds of server view (fastpath.api.views.table SHOW..SUMMARY): index of the view plans.
cdef enum ViewKind:
    VK_SHOW = 0          # GET /servers/{id}
    VK_DETAIL = 1        # each server of GET /servers/detail
    VK_UPDATE = 2        # PUT /servers/{id}
    VK_REBUILD = 3       # rebuild action (the caller adds adminPass)
    VK_SUMMARY = 4       # each server of GET /servers


cdef enum ConnState:
    S_IDLE = 0           # between requests (keep-alive timer runs)
    S_HEADERS = 1        # reading a request line and headers (header timer runs)
    S_BODY = 2           # reading a body (body timer runs, refreshed by each chunk)
    S_CLOSED = 3
    S_FAILED = 4         # the parser failed behind an asynchronous response: answer what
                         # came before, then the error, then close (read nothing more)


cdef enum PauseReason:
    PAUSE_WRITE = 1      # the transport's write buffer is over its high-water mark
    PAUSE_QUEUE = 2      # pipelined requests wait behind an asynchronous response


cdef class Route:
    cdef readonly int index          # metrics row; 0 is "no route"
    cdef readonly int kind
    cdef readonly object handler     # Python callable for K_PYTHON
    cdef readonly bint auth          # needs a token
    cdef readonly bint versioned     # microversion negotiated, version headers sent
    cdef readonly str name           # "GET /v2.1/servers/{server_id}"


cdef class RouteNode:
    cdef dict children               # literal segment (bytes) -> RouteNode (built at start)
    cdef RouteNode capture           # "{name}" child, or None
    cdef dict methods                # Method -> Route (built at start)
    # What lookup() reads, compiled from the above by _finish():
    cdef tuple lit_keys              # literal segments (bytes), compared with memcmp
    cdef tuple lit_nodes             # the RouteNode of each literal segment
    cdef tuple by_method             # Route (or None) indexed by Method
    cdef bytes allow_line            # "Allow: GET, HEAD\r\n" for a 405
    cdef bint project_scope          # an unknown segment here may be a legacy project id
    cdef bint auth_below             # paths below this node need a token even if unmatched


cdef class Request:
    # Filled by the parser callbacks.
    cdef public int method
    cdef public bytes method_name
    cdef bytes url
    cdef readonly bytes host
    cdef bytes token
    cdef bytes mv_new                # OpenStack-API-Version
    cdef bytes mv_legacy             # X-OpenStack-Nova-API-Version
    cdef readonly bytes content_type
    cdef Py_ssize_t content_length   # -1 when absent
    cdef bint expect_continue
    cdef bytearray _body
    cdef bint keep_alive
    cdef bint http10                 # HTTP/1.0: keep-alive must be announced
    cdef bint has_connection         # a Connection header was sent
    cdef bint upgrade                # an Upgrade header was sent
    cdef Py_ssize_t header_bytes
    cdef int header_count
    # Filled by dispatch.
    cdef readonly bytes path
    cdef readonly bytes query
    cdef readonly tuple captures
    cdef readonly int version        # microversion minor (2.x); 0 when not negotiated
    cdef readonly str user
    cdef readonly str project
    cdef readonly bint is_admin
    cdef readonly bytes url_project  # /v2.1/{project_id}/... legacy form, else None
    cdef readonly Route route
    cdef bytes rid                   # the request id, once a handler asked for it


cdef class HttpProtocol:
    cdef object transport
    cdef object _write
    cdef object parser
    cdef Request req                 # the request being parsed
    cdef object queue                # collections.deque of complete Requests waiting
    cdef bint busy                   # an asynchronous response is in progress
    cdef int state
    cdef int paused
    cdef double deadline             # coarse monotonic seconds; 0 = none
    cdef int err_status              # set by a callback before it aborts the parser
    cdef str err_message
    cdef int fail_status             # S_FAILED: the error to answer once the queue drained
    cdef str fail_message
    cdef bint closing                # close after the response in progress
    cdef bint eof                    # the client half-closed: close after the last answer
    cdef bint used                   # a request has begun on this connection
    cdef signed char http10          # the connection speaks HTTP/1.0: 1, 1.1: 0, not asked: -1
    # Header-size accounting of data_received (httptools has no limit of its own):
    cdef Py_ssize_t pending          # bytes received that no callback has reported yet
    cdef Py_ssize_t url_in_feed      # target bytes reported during the current feed
    cdef bint reported               # a callback ran during the current feed
    cdef Py_ssize_t body_in_feed     # body bytes reported during the current feed

    cdef _message_complete(self)
    cdef int _split_target(self, Request req)
    cdef _check_before_continue(self, Request req)
    cdef _dispatch(self, Request req)
    cdef _call_python(self, Request req, Route route)
    cdef _respond_result(self, Request req, object result)
    cdef _respond_fault(self, Request req, object fault)
    cdef _send(self, Request req, int status, bytes content_type, bytes body, bytes extra)
    cdef _respond(self, Request req, int status, bytes body, bytes extra)
    cdef _respond_error(self, Request req, int status, str message, bytes extra=*)
    cdef _abort(self, int status, str message)
    cdef _fail_connection(self, int status, str message)
    cdef _after_response(self, Request req)
    cdef _pause(self, int reason)
    cdef _resume(self, int reason)
    cdef _close(self)
