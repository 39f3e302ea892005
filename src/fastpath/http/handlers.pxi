# Handlers compiled into the request path: version documents and the health check.
#
# Version documents carry links built from the request's Host (or http.public_url); the
# rendered bodies are cached per base URL (bounded) since the set of hosts is small.

cdef object _plan = None
cdef bytes _public_url = None         # b"https://compute.example.com" or None
cdef dict _doc_cache = {}             # (kind, base url) -> body
cdef bytes _healthz_body = None
DEF DOC_CACHE_MAX = 64


cdef handlers_init(plan):
    global _plan, _public_url, _doc_cache, _healthz_body
    _plan = plan
    url = plan.settings["http.public_url"]
    _public_url = url.rstrip("/").encode("utf-8") if url else None
    _doc_cache = {}
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
    cdef bytes base = base_url_for(req)
    key = (kind, base)
    body = _doc_cache.get(key)
    if body is None:
        render = _plan.version_docs[kind]
        body = render(base.decode("utf-8", "replace"))
        if len(_doc_cache) < DOC_CACHE_MAX:
            _doc_cache[key] = body
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
