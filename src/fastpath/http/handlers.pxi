# Handlers compiled into the request path: version documents and the health check.
#
# Version documents carry links built from the request's Host (or http.public_url); the
# rendered bodies are cached per base URL (bounded) since the set of hosts is small.

cdef object _plan = None
cdef bytes _public_url = None         # b"https://compute.example.com" or None
cdef list _doc_cache = None           # per document kind: Host header -> body
cdef bytes _healthz_body = None
DEF DOC_CACHE_MAX = 64


cdef handlers_init(plan):
    global _plan, _public_url, _doc_cache, _healthz_body
    _plan = plan
    url = plan.settings["http.public_url"]
    _public_url = url.rstrip("/").encode("utf-8") if url else None
    _doc_cache = [{} for _ in plan.version_docs]
    _healthz_body = json.dumps(
        {"status": "ok", "pid": os.getpid(), "core": "compiled", "source": SOURCE_HASH}
    ).encode("ascii")


cdef bytes base_url_for(Request req):
    """scheme://host[:port] of links in responses."""
    cdef bytes host
    if _public_url is not None:
        return _public_url
    host = req.host
    if host is None or PyBytes_GET_SIZE(host) == 0:
        host = _plan.default_host
    return b"http://" + host


cdef bytes _version_doc(Request req, int kind):
    # PERF: keyed by the Host header as received (no tuple, no URL built on a hit).
    cdef dict cache = <dict>_doc_cache[kind]
    cdef bytes key = req.host if req.host is not None and _public_url is None else b""
    body = cache.get(key)
    if body is None:
        render = _plan.version_docs[kind]
        body = render(base_url_for(req).decode("utf-8", "replace"))
        if type(body) is not bytes:
            raise TypeError(f"version document renderer {render!r} returned {type(body)}")
        if len(cache) < DOC_CACHE_MAX:
            cache[key] = body
    return <bytes>body


cdef dispatch_core(HttpProtocol proto, Request req, int kind):
    if kind == K_HEALTHZ:
        proto._respond(req, 200, _healthz_body, None)
    elif kind == K_VERSIONS:
        proto._respond(req, 200, _version_doc(req, 0), None)
    elif kind == K_VERSION_V21:
        proto._respond(req, 200, _version_doc(req, 1), None)
    elif kind == K_VERSION_V2:
        proto._respond(req, 200, _version_doc(req, 2), None)
    else:
        proto._respond_error(req, 500, "No handler for this route.")
