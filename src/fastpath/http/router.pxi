# The route tree, compiled once from the plan (fastpath.api.routes) at worker start.
#
# A path is walked segment by segment: a literal child wins over the "{id}" capture child
# (so /servers/detail is never taken for /servers/{id}).  Under the API root (/v2.1) an
# unknown segment followed by more segments is the legacy project id of
# /v2.1/{project_id}/servers (Nova serves both forms; the id must match the token's).

from urllib.parse import unquote_to_bytes as _unquote_to_bytes

cdef dict _METHOD_NAMES = {
    M_GET: "GET", M_HEAD: "HEAD", M_POST: "POST", M_PUT: "PUT",
    M_DELETE: "DELETE", M_PATCH: "PATCH", M_OPTIONS: "OPTIONS",
}

cdef dict _CORE_KINDS = {
    "core:versions": K_VERSIONS,
    "core:version_v21": K_VERSION_V21,
    "core:version_v2": K_VERSION_V2,
    "core:healthz": K_HEALTHZ,
}

cdef int _lookup_status = 0          # 404 or 405 after a failed lookup
cdef bint _lookup_auth = False       # the path lies under an API root
cdef bytes _lookup_allow = None      # the Allow line of a 405


cdef inline int method_code(bytes name) noexcept:
    """Method of an httptools method name (PERF: compared in C, no dict lookup)."""
    cdef const char* s = PyBytes_AS_STRING(name)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(name)
    if n == 3:
        if memcmp(s, b"GET", 3) == 0:
            return M_GET
        if memcmp(s, b"PUT", 3) == 0:
            return M_PUT
    elif n == 4:
        if memcmp(s, b"POST", 4) == 0:
            return M_POST
        if memcmp(s, b"HEAD", 4) == 0:
            return M_HEAD
    elif n == 6:
        if memcmp(s, b"DELETE", 6) == 0:
            return M_DELETE
    elif n == 5:
        if memcmp(s, b"PATCH", 5) == 0:
            return M_PATCH
    elif n == 7:
        if memcmp(s, b"OPTIONS", 7) == 0:
            return M_OPTIONS
    return M_OTHER


@cython.final
cdef class Route:
    pass


@cython.final
cdef class RouteNode:
    def __cinit__(self):
        self.children = {}
        self.capture = None
        self.methods = {}
        self.lit_keys = ()
        self.lit_nodes = ()
        self.by_method = (None,) * N_METHODS
        self.allow_line = None
        self.project_scope = False
        self.auth_below = False


cdef RouteNode _node_for(RouteNode root, str template, bint create):
    cdef RouteNode node = root
    cdef RouteNode child
    for seg in template.strip("/").split("/"):
        if not seg:
            continue
        if seg.startswith("{") and seg.endswith("}"):
            child = node.capture
            if child is None:
                if not create:
                    return None
                child = node.capture = RouteNode()
        else:
            key = seg.encode("utf-8")
            child = node.children.get(key)
            if child is None:
                if not create:
                    return None
                child = node.children[key] = RouteNode()
        node = child
    return node


cdef RouteNode compile_routes(plan_routes, list out):
    """Build the tree from RouteSpecs; ``out`` receives Routes in metrics-index order."""
    cdef RouteNode root = RouteNode()
    cdef RouteNode node
    cdef Route route
    cdef int m
    for spec in plan_routes:
        m = method_code(spec.method.encode("ascii"))
        if m == M_OTHER:
            raise ValueError(f"route {spec.template}: unknown method {spec.method}")
        node = _node_for(root, spec.template, True)
        if m in node.methods:
            raise ValueError(f"duplicate route {spec.method} {spec.template}")
        route = Route.__new__(Route)
        route.index = len(out) + 1
        route.name = f"{spec.method} {spec.template}"
        route.auth = spec.auth
        route.versioned = spec.versioned
        if isinstance(spec.handler, str):
            if spec.handler not in _CORE_KINDS:
                raise ValueError(f"route {route.name}: unknown core handler {spec.handler}")
            route.kind = _CORE_KINDS[spec.handler]
            route.handler = None
        else:
            route.kind = K_PYTHON
            route.handler = spec.handler
        node.methods[m] = route
        out.append(route)
    _finish(root)
    return root


cdef void _finish(RouteNode node) except *:
    """Compile a node's dicts into what lookup() reads: tuples and the Allow line."""
    cdef list names = sorted(_METHOD_NAMES[m] for m in node.methods)
    cdef list by_method = [None] * N_METHODS
    if M_GET in node.methods and M_HEAD not in node.methods:
        names.append("HEAD")
        names.sort()
    for m, route in node.methods.items():
        by_method[m] = route
    node.by_method = tuple(by_method)
    node.allow_line = ("Allow: " + ", ".join(names) + "\r\n").encode("ascii") if names else None
    # Longer keys first is arbitrary; any order works (keys are distinct).
    node.lit_keys = tuple(node.children.keys())
    node.lit_nodes = tuple(node.children.values())
    for child in node.children.values():
        _finish(<RouteNode>child)
    if node.capture is not None:
        _finish(node.capture)


def mark_api_root(str template):
    """Declare /v2.1 an API root: deeper paths need a token; legacy project ids allowed."""
    cdef RouteNode node = _node_for(_root, template, False)
    if node is None:
        raise ValueError(f"no route below {template}")
    node.project_scope = True
    node.auth_below = True


cdef inline RouteNode _literal_child(RouteNode node, const char* s, Py_ssize_t n):
    """The child for segment s[:n], or None.  PERF: a memcmp scan of a few keys instead of
    a bytes object and a dict lookup per segment."""
    cdef tuple keys = node.lit_keys
    cdef Py_ssize_t k
    cdef bytes key
    for k in range(len(keys)):
        key = <bytes>keys[k]
        if PyBytes_GET_SIZE(key) == n and memcmp(PyBytes_AS_STRING(key), s, n) == 0:
            return <RouteNode>node.lit_nodes[k]
    return None


cdef Route lookup(Request req):
    """Route for ``req.path`` and method; None with _lookup_status 404/405 otherwise.

    Sets req.captures (tuple of bytes), req.url_project, _lookup_auth, _lookup_allow.
    """
    global _lookup_status, _lookup_auth, _lookup_allow
    cdef bytes path = req.path
    cdef const char* s = PyBytes_AS_STRING(path)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(path)
    cdef Py_ssize_t i = 1, j
    cdef RouteNode node = _root
    cdef RouteNode child
    cdef list captures = None
    cdef bytes seg
    cdef object route
    cdef int m = req.method
    # One branch point: the last segment where a literal child was taken although a
    # "{capture}" child exists too.  If the literal branch leads nowhere, the walk resumes
    # there through the capture: /servers/detail/ips is server "detail"'s ips, as in Nova.
    cdef RouteNode bt_node = None
    cdef Py_ssize_t bt_i = 0, bt_j = 0, bt_ncap = 0
    _lookup_auth = False
    _lookup_status = 404
    req.url_project = None
    if n == 0 or s[0] != b'/':
        return None
    # One trailing slash is optional ("/v2.1/servers/"); an empty segment never matches.
    if n > 1 and s[n - 1] == b'/' and s[n - 2] != b'/':
        n -= 1
    while True:
        while i < n:
            j = i
            while j < n and s[j] != b'/':
                j += 1
            if j == i:
                return None
            if node.auth_below:
                _lookup_auth = True
            child = _literal_child(node, s + i, j - i)
            if child is not None and node.capture is not None:
                bt_node = node
                bt_i = i
                bt_j = j
                bt_ncap = 0 if captures is None else len(captures)
            if child is None:
                if node.project_scope and j < n and req.url_project is None:
                    req.url_project = PyBytes_FromStringAndSize(s + i, j - i)
                    i = j + 1
                    continue
                child = node.capture
                if child is None:
                    break
                seg = PyBytes_FromStringAndSize(s + i, j - i)
                if memchr(s + i, b'%', j - i) != NULL:
                    seg = _unquote_to_bytes(seg)
                if captures is None:
                    captures = []
                captures.append(seg)
            node = child
            i = j + 1
        else:
            route = node.by_method[m] if 0 < m < N_METHODS else None
            if route is None and m == M_HEAD:
                route = node.by_method[M_GET]
            if route is not None:
                break
            if node.allow_line is not None:
                _lookup_status = 405
                _lookup_allow = node.allow_line
                return None
        # Dead end: resume at the branch point through its capture, once.
        if bt_node is None:
            return None
        node = bt_node.capture
        bt_node = None
        seg = PyBytes_FromStringAndSize(s + bt_i, bt_j - bt_i)
        if memchr(s + bt_i, b'%', bt_j - bt_i) != NULL:
            seg = _unquote_to_bytes(seg)
        if captures is None:
            captures = []
        del captures[bt_ncap:]
        captures.append(seg)
        i = bt_j + 1
        route = None
    req.captures = () if captures is None else tuple(captures)
    return <Route>route
