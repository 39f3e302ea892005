# The route tree, compiled once from the plan (fastpath.api.routes) at worker start.
#
# A path is walked segment by segment: a literal child wins over the "{id}" capture child
# (so /servers/detail is never taken for /servers/{id}).  Under the API root (/v2.1) an
# unknown segment followed by more segments is the legacy project id of
# /v2.1/{project_id}/servers (Nova serves both forms; the id must match the token's).

from urllib.parse import unquote_to_bytes as _unquote_to_bytes

cdef dict _METHODS = {
    b"GET": M_GET, b"HEAD": M_HEAD, b"POST": M_POST, b"PUT": M_PUT,
    b"DELETE": M_DELETE, b"PATCH": M_PATCH, b"OPTIONS": M_OPTIONS,
}
cdef dict _METHOD_NAMES = {v: k.decode() for k, v in _METHODS.items()}

cdef dict _CORE_KINDS = {
    "core:versions": K_VERSIONS,
    "core:version_v21": K_VERSION_V21,
    "core:version_v2": K_VERSION_V2,
    "core:healthz": K_HEALTHZ,
}

cdef int _lookup_status = 0          # 404 or 405 after a failed lookup
cdef bint _lookup_auth = False       # the path lies under an API root


cdef inline int method_code(bytes name) noexcept:
    cdef object m = _METHODS.get(name)
    return 0 if m is None else <int>m


@cython.final
cdef class Route:
    pass


@cython.final
cdef class RouteNode:
    def __cinit__(self):
        self.children = {}
        self.capture = None
        self.methods = {}
        self.allow = b""
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
        if m == 0:
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


cdef void _finish(RouteNode node):
    cdef list names = sorted(_METHOD_NAMES[m] for m in node.methods)
    if M_GET in node.methods and M_HEAD not in node.methods:
        names.append("HEAD")
        names.sort()
    node.allow = ", ".join(names).encode("ascii")
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


cdef Route lookup(Request req):
    """Route for ``req.path`` and method; None with _lookup_status 404/405 otherwise.

    Sets req.captures (tuple of bytes), req.url_project, and _lookup_auth.
    """
    global _lookup_status, _lookup_auth
    cdef bytes path = req.path
    cdef const char* s = PyBytes_AS_STRING(path)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(path)
    cdef Py_ssize_t i = 1, j
    cdef RouteNode node = _root
    cdef RouteNode child
    cdef list captures = None
    cdef bytes seg
    cdef object route
    _lookup_auth = False
    _lookup_status = 404
    req.url_project = None
    if n == 0 or s[0] != b'/':
        return None
    # One trailing slash is optional ("/v2.1/servers/"); an empty segment never matches.
    if n > 1 and s[n - 1] == b'/' and s[n - 2] != b'/':
        n -= 1
    while i < n:
        j = i
        while j < n and s[j] != b'/':
            j += 1
        if j == i:
            return None
        if node.auth_below:
            _lookup_auth = True
        seg = PyBytes_FromStringAndSize(s + i, j - i)
        child = node.children.get(seg)
        if child is None:
            if node.project_scope and j < n and req.url_project is None:
                req.url_project = seg
                i = j + 1
                continue
            child = node.capture
            if child is None:
                return None
            if captures is None:
                captures = []
            if b"%" in seg:
                seg = _unquote_to_bytes(seg)
            captures.append(seg)
        node = child
        i = j + 1
    route = node.methods.get(req.method)
    if route is None and req.method == M_HEAD:
        route = node.methods.get(M_GET)
    if route is None:
        if node.methods:
            _lookup_status = 405
            req.captures = (node.allow,)   # the 405 handler reads Allow from here
        return None
    req.captures = () if captures is None else tuple(captures)
    return <Route>route
