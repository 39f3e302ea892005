# Coarse clock, the Date header and request ids.
#
# PERF: nothing here runs a system call per request.  The tick (once a second, aligned to the
# wall-clock second) refreshes ``_now`` (monotonic seconds, used for connection deadlines)
# and the pre-rendered ``Date:`` header line.

from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC, CLOCK_REALTIME
from libc.time cimport time_t, tm, gmtime_r, strftime

cdef double _now = 0.0
cdef double _clock_offset = 0.0   # added to _now; only clock_skew() (tests) changes it
cdef char _date_line[64]          # "Date: Tue, 25 Nov 2026 00:12:00 GMT\r\n"
cdef Py_ssize_t _date_len = 0
cdef time_t _date_second = 0

# Request ids look like Nova's ("req-" + a version-4 UUID).  Per process: 64 random bits
# fill the first 16 hex digits; a counter fills the last 12.  Unique per process start.
cdef char _reqid[40]              # "req-xxxxxxxx-xxxx-4xxx-axxx-xxxxxxxxxxxx"
cdef uint64_t _reqid_counter = 0
cdef const char* _HEX = b"0123456789abcdef"


cdef inline double monotonic_now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline uint64_t monotonic_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec


cdef void clock_tick() noexcept:
    global _now, _date_len, _date_second
    cdef timespec ts
    cdef tm t
    cdef time_t sec
    cdef size_t n
    _now = monotonic_now() + _clock_offset
    clock_gettime(CLOCK_REALTIME, &ts)
    sec = ts.tv_sec
    if sec != _date_second:
        _date_second = sec
        gmtime_r(&sec, &t)
        n = strftime(_date_line, 64, b"Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &t)
        _date_len = <Py_ssize_t>n


cdef double clock_next_tick_delay() noexcept:
    """Seconds until just after the next wall-clock second (keeps Date exact)."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return 1.0 - <double>ts.tv_nsec * 1e-9 + 0.001


cdef void _hex_into(char* out, uint64_t value, int digits) noexcept:
    cdef int i
    for i in range(digits - 1, -1, -1):
        out[i] = _HEX[value & 0xF]
        value >>= 4


cdef clock_init():
    global _reqid_counter, _clock_offset
    cdef bytes seed = os.urandom(8)
    cdef uint64_t r = 0
    cdef int i
    for i in range(8):
        r = (r << 8) | <uint8_t>PyBytes_AS_STRING(seed)[i]
    memcpy(_reqid, b"req-", 4)
    _hex_into(_reqid + 4, r >> 32, 8)
    _reqid[12] = b'-'
    _hex_into(_reqid + 13, (r >> 16) & 0xFFFF, 4)
    _reqid[17] = b'-'
    _reqid[18] = b'4'
    _hex_into(_reqid + 19, (r >> 4) & 0xFFF, 3)
    _reqid[22] = b'-'
    _reqid[23] = _HEX[8 + (r & 0x3)]
    _hex_into(_reqid + 24, 0, 3)
    _reqid[27] = b'-'
    _hex_into(_reqid + 28, 0, 12)
    _reqid_counter = 0
    _clock_offset = 0.0
    clock_tick()


def clock_skew(double seconds):
    """Move this process's coarse clock ``seconds`` forward (reset by each new Worker).

    For tests: connection deadlines are then swept by the real tick (``Worker.tick``)
    instead of by sleeping through the timeouts.
    """
    global _clock_offset
    _clock_offset += seconds
    clock_tick()


cdef inline void next_request_id() noexcept:
    """Advance the counter part of ``_reqid`` (15 hex digits: 3 + 12)."""
    global _reqid_counter
    _reqid_counter += 1
    _hex_into(_reqid + 24, (_reqid_counter >> 48) & 0xFFF, 3)
    _hex_into(_reqid + 28, _reqid_counter & 0xFFFFFFFFFFFFULL, 12)


cdef bytes new_request_id():
    next_request_id()
    return PyBytes_FromStringAndSize(_reqid, 40)
