# Server views: assemble the JSON of a server from its pre-rendered fragment blob.
#
# The blob (fastpath.api.views.render_server, written by Store.apply beside the record):
#     u8 format | u8 count | u16 links | u32le offset[count + 1] | fragment bytes
# A view is a plan — the fragment indexes of one (kind, role, microversion), computed in
# Python from the one view table (fastpath.api.views.table) and handed over by
# views_configure at worker start.  Per request: copy the planned fragments, ", " between
# them (an empty fragment is an absent key), and replace each link placeholder
# "\x00S" / "\x00B" by the self / bookmark prefix of the request.
# PERF: no Python object per fragment or per server; one output buffer reused across calls;
# memchr finds placeholders (only link fragments hold any).

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_Check
from libc.stdint cimport uint16_t, uint32_t

DEF VIEW_BLOB_FORMAT = 1
DEF VIEW_HEAD = 4
DEF VIEW_PREFIX_MAX = 4096

cdef uint16_t* _vp_items = NULL     # every plan's fragment indexes, concatenated
cdef uint32_t* _vp_index = NULL     # (start, length) into _vp_items per (kind, admin, version)
cdef int _vp_nfrag = 0              # fragments per blob (the table's count)
cdef int _vp_nkinds = 0
cdef int _vp_mvmax = 0

cdef char* _vbuf = NULL             # output buffer, grown as needed
cdef Py_ssize_t _vcap = 0

# The two link prefixes of the current call, in one buffer: self then bookmark.
cdef char _vprefix[VIEW_PREFIX_MAX]
cdef Py_ssize_t _vself_len = 0
cdef Py_ssize_t _vbook_len = 0


def views_configure(int nfrag, int nkinds, int mvmax, bytes items not None, bytes index not None):
    """Install the view plans (fastpath.api.views.configure): ``items`` u16le fragment
    indexes, ``index`` u32le (start, length) pairs for kind, admin (0, 1), version 0..mvmax."""
    global _vp_items, _vp_index, _vp_nfrag, _vp_nkinds, _vp_mvmax
    cdef Py_ssize_t nitems = PyBytes_GET_SIZE(items) // 2
    cdef Py_ssize_t nindex = PyBytes_GET_SIZE(index) // 4
    if nindex != <Py_ssize_t>nkinds * 2 * (mvmax + 1) * 2:
        raise ValueError("views_configure: index size does not match kinds and versions")
    if nfrag < 1 or nfrag > 255:
        raise ValueError("views_configure: 1 to 255 fragments")
    cdef uint16_t* it = <uint16_t*>malloc(max(nitems, 1) * sizeof(uint16_t))
    cdef uint32_t* ix = <uint32_t*>malloc(nindex * sizeof(uint32_t))
    if it == NULL or ix == NULL:
        free(it)
        free(ix)
        raise MemoryError()
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(items)
    cdef Py_ssize_t i
    for i in range(nitems):
        it[i] = p[2 * i] | (p[2 * i + 1] << 8)
        if it[i] >= nfrag:
            free(it)
            free(ix)
            raise ValueError("views_configure: fragment index out of range")
    p = <const unsigned char*>PyBytes_AS_STRING(index)
    for i in range(nindex):
        ix[i] = _u32le(p + 4 * i)
    for i in range(0, nindex, 2):
        if <Py_ssize_t>ix[i] + ix[i + 1] > nitems:
            free(it)
            free(ix)
            raise ValueError("views_configure: plan out of range")
    free(_vp_items)
    free(_vp_index)
    _vp_items = it
    _vp_index = ix
    _vp_nfrag = nfrag
    _vp_nkinds = nkinds
    _vp_mvmax = mvmax


cdef inline uint32_t _u32le(const unsigned char* p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline bint _vbuf_reserve(Py_ssize_t need) noexcept:
    """Grow ``_vbuf`` to hold ``need`` bytes (content kept); False when out of memory."""
    global _vbuf, _vcap
    cdef char* p
    if need > _vcap:
        p = <char*>realloc(_vbuf, need + (need >> 1) + 4096)
        if p == NULL:
            return False
        _vbuf = p
        _vcap = need + (need >> 1) + 4096
    return True


cdef int _set_prefixes(bytes base_url, bytes link_project, bytes root) except -1:
    """self = base_url + root [+ "/" + project]; bookmark = base_url [+ "/" + project]."""
    global _vself_len, _vbook_len
    cdef Py_ssize_t nb = PyBytes_GET_SIZE(base_url)
    cdef Py_ssize_t nr = PyBytes_GET_SIZE(root) if root is not None else 0
    cdef Py_ssize_t np = PyBytes_GET_SIZE(link_project) if link_project is not None else 0
    cdef Py_ssize_t n
    if 2 * (nb + np + 1) + nr > VIEW_PREFIX_MAX:
        raise ValueError("link prefix too long")
    memcpy(_vprefix, PyBytes_AS_STRING(base_url), nb)
    n = nb
    if nr:
        memcpy(_vprefix + n, PyBytes_AS_STRING(root), nr)
        n += nr
    if np:
        _vprefix[n] = b'/'
        memcpy(_vprefix + n + 1, PyBytes_AS_STRING(link_project), np)
        n += np + 1
    _vself_len = n
    memcpy(_vprefix + n, PyBytes_AS_STRING(base_url), nb)
    if np:
        _vprefix[n + nb] = b'/'
        memcpy(_vprefix + n + nb + 1, PyBytes_AS_STRING(link_project), np)
    _vbook_len = nb + (np + 1 if np else 0)
    return 0


cdef inline const uint16_t* _plan_of(int kind, int admin, int version, Py_ssize_t* n) except NULL:
    if _vp_index == NULL:
        raise RuntimeError("server views are not configured (fastpath.api.views.configure)")
    if kind < 0 or kind >= _vp_nkinds:
        raise ValueError(f"unknown view kind {kind}")
    if version < MV_MIN or version > _vp_mvmax:
        raise ValueError(f"microversion 2.{version} is outside 2.{MV_MIN}..2.{_vp_mvmax}")
    cdef Py_ssize_t slot = ((<Py_ssize_t>kind * 2 + admin) * (_vp_mvmax + 1) + version) * 2
    n[0] = _vp_index[slot + 1]
    return _vp_items + _vp_index[slot]


cdef Py_ssize_t _blob_bound(const unsigned char* blob, Py_ssize_t blen) noexcept nogil:
    """Largest output of any view of this blob; -1 when the blob is not a valid one."""
    if blen < VIEW_HEAD or blob[0] != VIEW_BLOB_FORMAT or blob[1] != _vp_nfrag:
        return -1
    cdef Py_ssize_t head = VIEW_HEAD + 4 * (_vp_nfrag + 1)
    if blen < head or head + <Py_ssize_t>_u32le(blob + head - 4) != blen:
        return -1
    cdef Py_ssize_t links = blob[2] | (blob[3] << 8)
    cdef Py_ssize_t pre = _vself_len if _vself_len > _vbook_len else _vbook_len
    return blen + links * pre + 2 * _vp_nfrag + 2


cdef Py_ssize_t _view_write(char* out, const unsigned char* blob, const uint16_t* plan,
                            Py_ssize_t n) noexcept nogil:
    """Write ``{frag, frag, ...}`` of ``plan`` into ``out`` (sized by _blob_bound);
    return the length written."""
    cdef const unsigned char* offs = blob + VIEW_HEAD
    cdef const unsigned char* data = blob + VIEW_HEAD + 4 * (_vp_nfrag + 1)
    cdef const unsigned char* p
    cdef const unsigned char* end
    cdef const unsigned char* q
    cdef Py_ssize_t pos = 1, i, k
    cdef uint32_t start, stop
    cdef bint first = True
    out[0] = b'{'
    for i in range(n):
        k = plan[i]
        start = _u32le(offs + 4 * k)
        stop = _u32le(offs + 4 * k + 4)
        if stop <= start:
            continue  # empty fragment: a key this server does not show
        if not first:
            out[pos] = b','
            out[pos + 1] = b' '
            pos += 2
        first = False
        p = data + start
        end = data + stop
        while True:
            q = <const unsigned char*>memchr(p, 0, end - p)
            if q == NULL or q + 1 >= end:
                memcpy(out + pos, p, end - p)
                pos += end - p
                break
            memcpy(out + pos, p, q - p)
            pos += q - p
            if q[1] == b'S':
                memcpy(out + pos, _vprefix, _vself_len)
                pos += _vself_len
            else:
                memcpy(out + pos, _vprefix + _vself_len, _vbook_len)
                pos += _vbook_len
            p = q + 2
    out[pos] = b'}'
    return pos + 1


cdef inline bint _offsets_ok(const unsigned char* blob, const uint16_t* plan,
                             Py_ssize_t n) noexcept nogil:
    """Every planned fragment lies inside the blob (offsets never decrease)."""
    cdef const unsigned char* offs = blob + VIEW_HEAD
    cdef uint32_t total = _u32le(offs + 4 * _vp_nfrag)
    cdef Py_ssize_t i, k
    for i in range(n):
        k = plan[i]
        if _u32le(offs + 4 * k) > _u32le(offs + 4 * k + 4) or _u32le(offs + 4 * k + 4) > total:
            return False
    return True


cdef Py_ssize_t _append_view(Py_ssize_t pos, object blob, const uint16_t* plan,
                             Py_ssize_t n) except -1:
    """Append the view of ``blob`` at ``_vbuf + pos``; return the new end."""
    cdef Py_buffer view
    cdef const unsigned char* b
    cdef Py_ssize_t blen, bound
    cdef bint release = False
    if PyBytes_Check(blob):
        b = <const unsigned char*>PyBytes_AS_STRING(blob)
        blen = PyBytes_GET_SIZE(blob)
    else:
        PyObject_GetBuffer(blob, &view, PyBUF_SIMPLE)
        release = True
        b = <const unsigned char*>view.buf
        blen = view.len
    # No try/finally: nothing below raises before the buffer is released.
    bound = _blob_bound(b, blen)
    if bound >= 0 and _offsets_ok(b, plan, n):
        if _vbuf_reserve(pos + bound):
            pos += _view_write(_vbuf + pos, b, plan, n)
        else:
            bound = -2
    else:
        bound = -1
    if release:
        PyBuffer_Release(&view)
    if bound == -2:
        raise MemoryError()
    if bound == -1:
        raise ValueError("not a server view blob of this table (re-render the views)")
    return pos


cdef bytes view_json(object blob, int kind, int version, bint is_admin, bytes base_url,
                     bytes link_project, bytes root):
    cdef Py_ssize_t n
    cdef const uint16_t* plan = _plan_of(kind, is_admin, version, &n)
    _set_prefixes(base_url, link_project, root)
    cdef Py_ssize_t end = _append_view(0, blob, plan, n)
    return PyBytes_FromStringAndSize(_vbuf, end)


def server_json(blob, int version, bint is_admin, bytes base_url not None,
                bytes link_project=b"", int kind=VK_SHOW, bytes root=b"/v2.1"):
    """The ``{...}`` of one server for a microversion minor and role (kind: 0 show,
    1 detail, 2 update, 3 rebuild, 4 index entry; fastpath.api.views)."""
    return view_json(blob, kind, version, is_admin, base_url, link_project, root)


def server_summary_json(blob, bytes base_url not None, bytes link_project=b"", bytes root=b"/v2.1"):
    """The ``{"id", "links", "name"}`` of one server (GET /servers)."""
    return view_json(blob, VK_SUMMARY, MV_MIN, False, base_url, link_project, root)


def servers_json_join(list blobs not None, int version, bint is_admin, bytes base_url not None, bint summary,
                      bytes link_project=b"", bytes root=b"/v2.1"):
    """``obj, obj, ...`` for N servers (detail, or index with ``summary``) in one buffer."""
    cdef Py_ssize_t n, i, pos = 0
    cdef const uint16_t* plan = _plan_of(VK_SUMMARY if summary else VK_DETAIL, is_admin, version, &n)
    _set_prefixes(base_url, link_project, root)
    for i in range(len(blobs)):
        if i:
            if not _vbuf_reserve(pos + 2):
                raise MemoryError()
            _vbuf[pos] = b','
            _vbuf[pos + 1] = b' '
            pos += 2
        pos = _append_view(pos, blobs[i], plan, n)
    if pos == 0:
        return b""
    return PyBytes_FromStringAndSize(_vbuf, pos)
