# The compiled read paths of the servers API: the default list page and the plain show.
#
# Called by the Python handlers (fastpath.api.servers) inside their one read transaction
# (a py-lmdb Transaction opened with buffers=True), these answer the common requests
# without building a Python object per server:
#
# * servers_page: GET /servers[/detail] whose query is only ``limit`` and/or ``marker``
#   (digits, a canonical uuid): one cursor walk of the project's by_project index from the
#   marker's key, the default filter (live, not soft-deleted) read from the packed index
#   entry, one get of each server's view blob, and the page's JSON written straight into
#   the one bytes object returned — ``{"servers": [...]`` + next link + ``}``.
# * server_show: GET /servers/{id} with an empty query string: the frame's project compared
#   as bytes with the caller's, the view get, ``{"server": {...}}`` in one bytes object.
#
# Both return None whenever the request is not the plain case (another parameter, a
# percent-escape, an unknown or foreign marker, a server not visible, a missing view, an
# index entry of an unexpected shape, limit=0 ...): the caller then runs the general Python
# path in the same transaction, which decides the answer (and the error) exactly as before.
# So these functions never answer differently from the Python path; they only answer less.
#
# Layout facts used here (fastpath.store.layout, record):
#   by_project key  = project NUL u64be(2**64-1-created_at) ~uuid16
#   index entry     = msgpack array16 of 25 fields: project_id, user_id, created_at, name,
#                     status, vm_state, ... , deleted (the last field, a bool: one byte)
#   server frame    = u64 version | i64 created | i64 updated | u8 len(project) | project | rec
#   views key       = uuid16 + VIEW_ID (b"server")
# PERF: per entry one tp_iternext of the py-lmdb cursor (a (key, value) tuple of two
# memoryviews into the map) and one Transaction.get; the bytes are read through the
# memoryviews' buffers; pointers into the map stay valid until the transaction ends, so the
# page is sized first (pass 1) and written once into its final bytes object (pass 2).

from cpython.memoryview cimport PyMemoryView_Check, PyMemoryView_GET_BUFFER
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.ref cimport PyObject, Py_XDECREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE

cdef extern from "Python.h":
    PyObject* _sp_bytes_new "PyBytes_FromStringAndSize"(const char* s, Py_ssize_t n)
    char* _sp_bytes_data "PyBytes_AS_STRING"(PyObject* o)
    int _PyBytes_Resize(PyObject** string, Py_ssize_t newsize) except -1

DEF SP_INDEX_FIELDS = 25
DEF SP_FRAME_SIZE = 25          # u64 version, i64 created, i64 updated, u8 len(project)
DEF SP_SERVERS_HEAD = 13        # {"servers": [
DEF SP_NEXT_MAX = 1024          # the next link's bytes (href prefix + query + uuid)

cdef bytes _SP_VIEW_ID = b"server"
cdef bytes _SP_ROOT = b"/v2.1"

# Pass 1 results: the blobs of the page (pointers into the map, valid in the txn).
cdef const unsigned char** _sp_blob = NULL
cdef Py_ssize_t* _sp_blen = NULL
cdef Py_ssize_t _sp_cap = 0


cdef object _sp_done(PyObject* raw, Py_ssize_t used, Py_ssize_t size):
    """The bytes object ``raw`` (a new reference, ``size`` long) trimmed to ``used``."""
    if used != size:
        _PyBytes_Resize(&raw, used)  # on failure raw is freed and NULL, and this raises
    out = <object>raw
    Py_XDECREF(raw)
    return out


cdef inline bint _sp_buf(object o, const unsigned char** p, Py_ssize_t* n) noexcept:
    """Pointer and length of a memoryview (buffers=True) or bytes; False otherwise."""
    cdef Py_buffer* b
    if PyMemoryView_Check(o):
        b = PyMemoryView_GET_BUFFER(o)
        p[0] = <const unsigned char*>b.buf
        n[0] = b.len
        return True
    if PyBytes_Check(o):
        p[0] = <const unsigned char*>PyBytes_AS_STRING(o)
        n[0] = PyBytes_GET_SIZE(o)
        return True
    return False


cdef inline Py_ssize_t _sp_skip(const unsigned char* p, Py_ssize_t pos, Py_ssize_t n) noexcept nogil:
    """Position after the msgpack scalar (str, int, nil, bool) at ``pos``; -1 otherwise."""
    cdef unsigned char c
    cdef Py_ssize_t ln
    if pos >= n:
        return -1
    c = p[pos]
    if c <= 0x7f or c >= 0xe0 or c == 0xc0 or c == 0xc2 or c == 0xc3:
        return pos + 1
    if 0xa0 <= c <= 0xbf:
        ln = c & 0x1f
        pos += 1
    elif c == 0xd9:
        if pos + 2 > n:
            return -1
        ln = p[pos + 1]
        pos += 2
    elif c == 0xda:
        if pos + 3 > n:
            return -1
        ln = (p[pos + 1] << 8) | p[pos + 2]
        pos += 3
    elif c == 0xcc or c == 0xd0:
        ln = 1
        pos += 1
    elif c == 0xcd or c == 0xd1:
        ln = 2
        pos += 1
    elif c == 0xce or c == 0xd2:
        ln = 4
        pos += 1
    elif c == 0xcf or c == 0xd3:
        ln = 8
        pos += 1
    else:
        return -1
    return pos + ln if pos + ln <= n else -1


cdef inline int _sp_default_visible(const unsigned char* v, Py_ssize_t n) noexcept nogil:
    """Whether the default list shows this index entry: 1 yes, 0 no (soft-deleted),
    -1 not an entry of the expected shape (the caller falls back to Python)."""
    cdef Py_ssize_t pos = 3, i, end
    if n < 4 or v[0] != 0xdc or v[1] != 0 or v[2] != SP_INDEX_FIELDS:
        return -1
    if v[n - 1] != 0xc2:
        return -1  # deleted is not False: never in by_project; let Python decide
    for i in range(5):  # project_id, user_id, created_at, name, status
        pos = _sp_skip(v, pos, n)
        if pos < 0:
            return -1
    # vm_state: a str; "soft-delete" is what the default filter drops.
    end = _sp_skip(v, pos, n)
    if end < 0 or not (0xa0 <= v[pos] <= 0xbf or v[pos] == 0xd9):
        return -1
    if end - pos == 12 and v[pos] == 0xab and memcmp(v + pos + 1, b"soft-delete", 11) == 0:
        return 0
    return 1


cdef inline Py_ssize_t _sp_plan_size(const unsigned char* blob, Py_ssize_t blen,
                                     const uint16_t* plan, Py_ssize_t n) noexcept nogil:
    """Upper bound of the ``{...}`` that _view_write writes for ``plan`` from this blob (the
    checks of _blob_bound and _offsets_ok, summing only the planned fragments); -1 when
    the blob is not a valid one."""
    cdef Py_ssize_t head = VIEW_HEAD + 4 * (_vp_nfrag + 1)
    cdef const unsigned char* offs = blob + VIEW_HEAD
    cdef uint32_t total, start, stop
    cdef Py_ssize_t i, k, size = 2 + 2 * n
    cdef Py_ssize_t links, pre
    if blen < VIEW_HEAD or blob[0] != VIEW_BLOB_FORMAT or blob[1] != _vp_nfrag:
        return -1
    if blen < head:
        return -1
    total = _u32le(offs + 4 * _vp_nfrag)
    if head + <Py_ssize_t>total != blen:
        return -1
    for i in range(n):
        k = plan[i]
        start = _u32le(offs + 4 * k)
        stop = _u32le(offs + 4 * k + 4)
        if start > stop or stop > total:
            return -1
        size += stop - start
    links = blob[2] | (blob[3] << 8)
    pre = _vself_len if _vself_len > _vbook_len else _vbook_len
    return size + links * pre


cdef inline bint _sp_parse_uuid(const unsigned char* s, Py_ssize_t n, unsigned char* out) noexcept nogil:
    """16 bytes of a canonical (36 chars, hyphenated; either case) uuid."""
    cdef Py_ssize_t i, j = 0
    cdef int hi, lo
    cdef unsigned char c
    if n != 36 or s[8] != b'-' or s[13] != b'-' or s[18] != b'-' or s[23] != b'-':
        return False
    i = 0
    while i < 36:
        if i == 8 or i == 13 or i == 18 or i == 23:
            i += 1
            continue
        hi = _sp_hex(s[i])
        lo = _sp_hex(s[i + 1])
        if hi < 0 or lo < 0:
            return False
        out[j] = <unsigned char>((hi << 4) | lo)
        j += 1
        i += 2
    return True


cdef inline int _sp_hex(unsigned char c) noexcept nogil:
    if 48 <= c <= 57:           # 0-9
        return c - 48
    if 97 <= c <= 102:          # a-f
        return c - 87
    if 65 <= c <= 70:           # A-F
        return c - 55
    return -1


cdef inline Py_ssize_t _sp_put_uuid(char* out, const unsigned char* inv) noexcept nogil:
    """The canonical string of the uuid whose bytes are inverted in ``inv`` (an index key's
    tail); 36 bytes."""
    cdef const char* hexd = b"0123456789abcdef"
    cdef Py_ssize_t i, pos = 0
    cdef unsigned char b
    for i in range(16):
        if i == 4 or i == 6 or i == 8 or i == 10:
            out[pos] = b'-'
            pos += 1
        b = 255 - inv[i]
        out[pos] = hexd[b >> 4]
        out[pos + 1] = hexd[b & 15]
        pos += 2
    return pos


cdef inline bint _sp_link_safe(const char* s, Py_ssize_t n) noexcept nogil:
    """Bytes that JSON (orjson) and UTF-8 decoding leave as they are: printable ASCII
    without '"' and '\\'."""
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        c = <unsigned char>s[i]
        if c < 0x20 or c > 0x7e or c == b'"' or c == b'\\':
            return False
    return True


cdef inline bint _sp_project(Request req, const char** p, Py_ssize_t* n):
    """UTF-8 of the caller's project (a key-usable name); False when there is none."""
    cdef str project = req.project
    if project is None:
        return False
    try:
        p[0] = PyUnicode_AsUTF8AndSize(project, n)
    except UnicodeError:
        return False
    return 0 < n[0] <= 255 and memchr(p[0], 0, n[0]) == NULL


cdef bint _sp_grow(Py_ssize_t need) noexcept:
    global _sp_blob, _sp_blen, _sp_cap
    cdef const unsigned char** b
    cdef Py_ssize_t* l
    if need <= _sp_cap:
        return True
    b = <const unsigned char**>realloc(_sp_blob, need * sizeof(const unsigned char*))
    if b == NULL:
        return False
    _sp_blob = b
    l = <Py_ssize_t*>realloc(_sp_blen, need * sizeof(Py_ssize_t))
    if l == NULL:
        return False
    _sp_blen = l
    _sp_cap = need
    return True


def servers_page(Request req not None, txn, dbs, bint detail, int max_limit):
    """The body of ``GET /servers[/detail]`` when the query holds only ``limit`` and/or
    ``marker`` (each at most once, plain digits / a canonical uuid) — Nova's default list of
    the caller's project — assembled in one pass; None when the request is anything else
    (the Python path answers it)."""
    cdef const unsigned char* q = NULL
    cdef Py_ssize_t qn = 0, i, j, klen
    cdef const unsigned char* lim = NULL
    cdef Py_ssize_t lim_n = 0
    cdef const unsigned char* mk = NULL
    cdef Py_ssize_t mk_n = 0
    cdef Py_ssize_t limit
    cdef bytes query = req.query
    if query is not None:
        q = <const unsigned char*>PyBytes_AS_STRING(query)
        qn = PyBytes_GET_SIZE(query)
    # -- the query: "limit=D+" and/or "marker=UUID", '&'-separated, each once --------------
    i = 0
    while i < qn:
        j = i
        while j < qn and q[j] != b'&':
            j += 1
        if j - i > 6 and memcmp(q + i, b"limit=", 6) == 0 and lim == NULL:
            lim = q + i + 6
            lim_n = j - i - 6
            if lim_n > 9:
                return None
            for klen in range(lim_n):
                if not (48 <= lim[klen] <= 57):  # 0-9
                    return None
        elif j - i == 43 and memcmp(q + i, b"marker=", 7) == 0 and mk == NULL:
            mk = q + i + 7
            mk_n = 36
        else:
            return None  # another parameter, a repeat, an empty piece, an escape
        i = j + 1
    if qn and q[qn - 1] == b'&':
        return None
    limit = max_limit
    if lim != NULL:
        limit = 0
        for i in range(lim_n):
            limit = limit * 10 + (lim[i] - 48)
        if limit > max_limit:
            limit = max_limit
    if limit <= 0:
        return None

    # -- the scope: the caller's project ---------------------------------------------------
    cdef const char* proj
    cdef Py_ssize_t plen
    if not _sp_project(req, &proj, &plen):
        return None
    cdef bytes base_url = base_url_for(req)
    cdef bytes lp = req.url_project if req.url_project is not None else b""
    cdef Py_ssize_t nb = PyBytes_GET_SIZE(base_url)
    if not _sp_link_safe(PyBytes_AS_STRING(base_url), nb) \
            or not _sp_link_safe(PyBytes_AS_STRING(lp), PyBytes_GET_SIZE(lp)):
        return None
    cdef Py_ssize_t nplan
    cdef const uint16_t* plan = _plan_of(VK_DETAIL if detail else VK_SUMMARY, req.is_admin,
                                         req.version, &nplan)
    _set_prefixes(base_url, lp, _SP_ROOT)

    # -- the start key: after the marker, or the project's first entry ---------------------
    cdef unsigned char u16[16]
    cdef const unsigned char* fp
    cdef Py_ssize_t fn
    cdef uint64_t created
    cdef Py_ssize_t skn = plen + 1 + (24 if mk != NULL else 0)
    cdef bytes start = PyBytes_FromStringAndSize(NULL, skn)
    cdef unsigned char* sk = <unsigned char*>PyBytes_AS_STRING(start)
    memcpy(sk, proj, plen)
    sk[plen] = 0
    tget = txn.get
    if mk != NULL:
        if not _sp_parse_uuid(mk, mk_n, u16):
            return None
        ukey = PyBytes_FromStringAndSize(<char*>u16, 16)
        frame = tget(ukey, None, dbs.servers)
        if frame is None:
            frame = tget(ukey, None, dbs.tombstones)
        if frame is None or not _sp_buf(frame, &fp, &fn) or fn < SP_FRAME_SIZE \
                or fn < SP_FRAME_SIZE + fp[24] or fp[24] != plen \
                or memcmp(fp + SP_FRAME_SIZE, proj, plen) != 0:
            return None  # not found, or another project's: the Python path answers 400
        created = 0
        for i in range(8, 16):
            created = (created << 8) | fp[i]
        if created >> 63:
            return None
        created = ~created  # 2**64 - 1 - created
        for i in range(8):
            sk[plen + 1 + i] = <unsigned char>(created >> (56 - 8 * i))
        for i in range(16):
            sk[plen + 9 + i] = 255 - u16[i]
    cur = txn.cursor(dbs.by_project)
    if not cur.set_range(start):
        return _sp_finish(0, 0, NULL, detail, lim, lim_n, limit, base_url, lp, plan, nplan)

    # -- pass 1: walk, filter, get the views, size the page --------------------------------
    if not _sp_grow(limit):
        raise MemoryError()
    vdb = dbs.views
    cdef bytearray vkey = bytearray(16 + PyBytes_GET_SIZE(_SP_VIEW_ID))
    cdef unsigned char* vk = <unsigned char*>PyByteArray_AS_STRING(vkey)
    memcpy(vk + 16, PyBytes_AS_STRING(_SP_VIEW_ID), PyBytes_GET_SIZE(_SP_VIEW_ID))
    cdef Py_ssize_t count = 0, size = 0, sz
    cdef unsigned char last[16]
    cdef const unsigned char* kp
    cdef const unsigned char* vp
    cdef Py_ssize_t kn, vn
    cdef int shown
    cdef bint first = True
    for item in cur:
        if type(item) is not tuple or PyTuple_GET_SIZE(item) != 2:
            return None
        if not _sp_buf(<object>PyTuple_GET_ITEM(item, 0), &kp, &kn) \
                or not _sp_buf(<object>PyTuple_GET_ITEM(item, 1), &vp, &vn):
            return None
        if kn != plen + 25 or memcmp(kp, proj, plen + 1) != 0:
            break  # past the project's entries
        if first:
            first = False
            if skn == kn and memcmp(kp, sk, kn) == 0:
                continue  # the marker itself (a live one): start after it
        shown = _sp_default_visible(vp, vn)
        if shown < 0:
            return None
        if not shown:
            continue
        for i in range(16):
            vk[i] = 255 - kp[kn - 16 + i]
        blob = tget(vkey, None, vdb)
        if blob is None or not _sp_buf(blob, &_sp_blob[count], &_sp_blen[count]):
            return None  # no views (a record stored without render): the Python path
        sz = _sp_plan_size(_sp_blob[count], _sp_blen[count], plan, nplan)
        if sz < 0:
            return None
        size += sz
        count += 1
        if count >= limit:
            memcpy(last, kp + kn - 16, 16)
            break
    return _sp_finish(count, size, last if count >= limit else NULL, detail, lim, lim_n, limit,
                      base_url, lp, plan, nplan)


cdef object _sp_finish(Py_ssize_t count, Py_ssize_t size, const unsigned char* last,
                       bint detail, const unsigned char* lim, Py_ssize_t lim_n, Py_ssize_t limit,
                       bytes base_url, bytes lp, const uint16_t* plan, Py_ssize_t nplan):
    """Pass 2: ``{"servers": [obj, ...]`` + the next link (a full page) + ``}`` into one
    bytes object, sized by pass 1 and trimmed to what was written."""
    cdef char nxt[SP_NEXT_MAX]
    cdef Py_ssize_t nn = 0, nb, np, i
    cdef const char* b
    if last != NULL:
        # , "servers_links": [{"href":"BASE/v2.1[/P]/servers[/detail]?[limit=N&]marker=U","rel":"next"}]
        b = PyBytes_AS_STRING(base_url)
        nb = PyBytes_GET_SIZE(base_url)
        while nb > 0 and b[nb - 1] == b'/':
            nb -= 1  # Links.base: base_url.rstrip("/")
        np = PyBytes_GET_SIZE(lp)
        if nb + np + lim_n + 160 > SP_NEXT_MAX:
            return None
        memcpy(nxt, b', "servers_links": [{"href":"', 29)
        nn = 29
        memcpy(nxt + nn, b, nb)
        nn += nb
        memcpy(nxt + nn, b"/v2.1", 5)
        nn += 5
        if np:
            nxt[nn] = b'/'
            memcpy(nxt + nn + 1, PyBytes_AS_STRING(lp), np)
            nn += np + 1
        if detail:
            memcpy(nxt + nn, b"/servers/detail?", 16)
            nn += 16
        else:
            memcpy(nxt + nn, b"/servers?", 9)
            nn += 9
        if lim != NULL:
            memcpy(nxt + nn, b"limit=", 6)
            memcpy(nxt + nn + 6, lim, lim_n)
            nxt[nn + 6 + lim_n] = b'&'
            nn += 7 + lim_n
        memcpy(nxt + nn, b"marker=", 7)
        nn += 7
        nn += _sp_put_uuid(nxt + nn, last)
        memcpy(nxt + nn, b'","rel":"next"}]', 16)
        nn += 16
    cdef Py_ssize_t total = SP_SERVERS_HEAD + size + 2 * count + 1 + nn + 1
    cdef PyObject* raw = _sp_bytes_new(NULL, total)
    if raw == NULL:
        raise MemoryError()
    cdef char* o = _sp_bytes_data(raw)
    cdef Py_ssize_t pos = SP_SERVERS_HEAD
    memcpy(o, b'{"servers": [', SP_SERVERS_HEAD)
    for i in range(count):
        if i:
            o[pos] = b','
            o[pos + 1] = b' '
            pos += 2
        pos += _view_write(o + pos, _sp_blob[i], plan, nplan)
    o[pos] = b']'
    pos += 1
    if nn:
        memcpy(o + pos, nxt, nn)
        pos += nn
    o[pos] = b'}'
    pos += 1
    return _sp_done(raw, pos, total)


def server_show(Request req not None, txn, dbs):
    """The body of ``GET /servers/{id}`` (``{"server": {...}}``) when the server exists and
    the caller may see it; None otherwise (the Python path answers, 404 included).  The
    caller checks the query string is empty."""
    cdef unsigned char u16[16]
    cdef const unsigned char* fp
    cdef const unsigned char* bp
    cdef Py_ssize_t fn, bn, n, sz
    cdef const char* proj
    cdef Py_ssize_t plen
    cdef bytes cap
    if len(req.captures) < 1:
        return None
    cap = <bytes>req.captures[0]
    if not _sp_parse_uuid(<const unsigned char*>PyBytes_AS_STRING(cap), PyBytes_GET_SIZE(cap), u16):
        return None
    ukey = PyBytes_FromStringAndSize(<char*>u16, 16)
    tget = txn.get
    frame = tget(ukey, None, dbs.servers)
    if frame is None or not _sp_buf(frame, &fp, &fn) or fn < SP_FRAME_SIZE \
            or fn < SP_FRAME_SIZE + fp[24]:
        return None
    if not req.is_admin:
        if not _sp_project(req, &proj, &plen):
            return None
        if fp[24] != plen or memcmp(fp + SP_FRAME_SIZE, proj, plen) != 0:
            return None
    blob = tget(ukey + _SP_VIEW_ID, None, dbs.views)
    if blob is None or not _sp_buf(blob, &bp, &bn):
        return None
    cdef bytes base_url = base_url_for(req)
    cdef bytes lp = req.url_project if req.url_project is not None else b""
    if not _sp_link_safe(PyBytes_AS_STRING(base_url), PyBytes_GET_SIZE(base_url)) \
            or not _sp_link_safe(PyBytes_AS_STRING(lp), PyBytes_GET_SIZE(lp)):
        return None
    cdef const uint16_t* plan = _plan_of(VK_SHOW, req.is_admin, req.version, &n)
    _set_prefixes(base_url, lp, _SP_ROOT)
    sz = _sp_plan_size(bp, bn, plan, n)
    if sz < 0:
        return None  # the Python path raises the same error as before
    cdef PyObject* raw = _sp_bytes_new(NULL, 11 + sz + 1)
    if raw == NULL:
        raise MemoryError()
    cdef char* o = _sp_bytes_data(raw)
    memcpy(o, b'{"server": ', 11)
    cdef Py_ssize_t pos = 11 + _view_write(o + 11, bp, plan, n)
    o[pos] = b'}'
    return _sp_done(raw, pos + 1, 11 + sz + 1)
