# This process's slot in the master's shared memory (layout: fastpath/master/shm.py).
#
# The process is the only writer of its slot: plain 64-bit stores, no atomics needed
# (aligned 64-bit words are single-copy atomic on x86-64 and aarch64).

from fastpath.master import shm as _shm_layout

cdef enum:
    SLOT_PID = 0
    SLOT_HEARTBEAT = 32
    SLOT_READY = 40
    SLOT_STORE_READ = 64
    SLOT_STORE_WRITE = 72
    SLOT_COUNTERS = 128

cdef unsigned char* _slot = NULL
cdef uint64_t* _counters = NULL
cdef int _nroutes = 0
cdef int _nstatus = 0
cdef object _shm_ref = None          # keeps the mmap alive while _slot points into it
cdef object _shm_view = None
cdef uint8_t _status_col[600]        # status code -> counter column


cdef metrics_attach(shm_buf, Py_ssize_t slot_offset, int nroutes):
    global _slot, _counters, _nroutes, _nstatus, _shm_ref, _shm_view
    cdef unsigned char[::1] view = shm_buf
    cdef int i
    if nroutes > _shm_layout.MAX_ROUTES:
        raise ValueError(f"{nroutes} routes exceed the shared-memory table ({_shm_layout.MAX_ROUTES})")
    assert SLOT_HEARTBEAT == _shm_layout.OFF_HEARTBEAT and SLOT_READY == _shm_layout.OFF_READY
    assert SLOT_COUNTERS == _shm_layout.COUNTERS_OFFSET
    assert SLOT_STORE_READ == _shm_layout.OFF_STORE_READ
    _shm_ref = shm_buf
    _shm_view = view
    _slot = &view[slot_offset]
    _counters = <uint64_t*>(_slot + SLOT_COUNTERS)
    _nroutes = nroutes
    _nstatus = _shm_layout.NSTATUS
    for i in range(600):
        _status_col[i] = _nstatus - 1
    for i, code in enumerate(_shm_layout.STATUSES):
        _status_col[code] = i
    (<int64_t*>(_slot + SLOT_PID))[0] = os.getpid()


cdef inline void metrics_count(int route_index, int status) noexcept:
    if status < 0 or status >= 600:
        status = 0
    _counters[route_index * _nstatus + _status_col[status]] += 1


cdef inline void metrics_store_read() noexcept:
    (<uint64_t*>(_slot + SLOT_STORE_READ))[0] += 1


cdef inline void metrics_store_write() noexcept:
    (<uint64_t*>(_slot + SLOT_STORE_WRITE))[0] += 1


cdef void metrics_heartbeat() noexcept:
    if _slot != NULL:
        (<uint64_t*>(_slot + SLOT_HEARTBEAT))[0] = monotonic_ns()


cdef void metrics_set_ready(uint64_t value) noexcept:
    if _slot != NULL:
        (<uint64_t*>(_slot + SLOT_READY))[0] = value


cdef dict metrics_snapshot():
    cdef dict out = {}
    cdef int r, c
    cdef uint64_t n
    statuses = _shm_layout.STATUSES
    for r in range(_nroutes):
        for c in range(_nstatus):
            n = _counters[r * _nstatus + c]
            if n:
                out[(r, statuses[c] if c < _nstatus - 1 else 0)] = n
    return out


cdef tuple metrics_store_txns():
    return (
        (<uint64_t*>(_slot + SLOT_STORE_READ))[0],
        (<uint64_t*>(_slot + SLOT_STORE_WRITE))[0],
    )


def sum_counters(shm_buf, int nslots, int nroutes, uint64_t role):
    """Request counters summed over every slot that served ``role``: a flat list indexed
    route * NSTATUS + status column (what /metrics renders; no store call, no messages)."""
    cdef unsigned char[::1] view = shm_buf
    cdef unsigned char* base = &view[0]
    cdef unsigned char* slot
    cdef uint64_t* c
    cdef Py_ssize_t header = _shm_layout.HEADER_SIZE
    cdef Py_ssize_t slot_size = _shm_layout.SLOT_SIZE
    cdef int nstatus = _shm_layout.NSTATUS
    cdef int s, k, total = nroutes * nstatus
    cdef uint64_t* acc = <uint64_t*>malloc(total * sizeof(uint64_t))
    if acc == NULL:
        raise MemoryError()
    try:
        for k in range(total):
            acc[k] = 0
        for s in range(nslots):
            slot = base + header + s * slot_size
            if (<uint64_t*>(slot + 8))[0] != role:
                continue
            c = <uint64_t*>(slot + SLOT_COUNTERS)
            for k in range(total):
                acc[k] += c[k]
        return [acc[k] for k in range(total)]
    finally:
        free(acc)
