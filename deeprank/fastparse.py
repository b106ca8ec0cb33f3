"""Compiled (numba) parser for the text embedding format, a few times faster than numpy's.

A text embedding line is path<TAB>label<TAB>v1 v2 ... vD. parse_block() parses a block of
whole lines on every core (numba prange) straight from the file's bytes. It reads plain
decimal numbers as gen_embeddings writes them (optional sign, digits, optional fraction,
optional exponent; values separated by spaces) and gives the same float32 as numpy's
parser: the decimal is converted exactly to the nearest float64 (an integer of at most 18
digits and below 2**53, times or over an exact power of ten: one IEEE rounding), then
rounded to float32, as numpy does.

Anything else (nan, inf, more digits or a larger integer than that, a huge exponent, a
wrong value count, an empty path or label, a tab in the vector, bad UTF-8) marks the line
as not handled; embedding_io.read_embeddings then reads the file with its numpy parser, which accepts
what is valid and names the bad line. numba is optional: without it available() is False.
"""

import numpy as np

_POW10 = np.array([10.0 ** i for i in range(23)])  # exact in float64 up to 1e22
_KERNEL = None


def available():
    """True when numba is installed and the kernel compiles (once; later processes load it from
    numba's on-disk cache, deeprank/__pycache__ or NUMBA_CACHE_DIR)."""
    return _kernel() is not None


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = False
        try:
            import numba  # noqa: F401  (optional: requirements.txt installs it; imported only when needed)
        except ImportError:
            return None
        for cache in (True, False):  # a cache folder we cannot write: compile uncached
            try:
                _KERNEL = _build(cache)
                break
            except Exception:
                pass
    return _KERNEL or None


def _build(cache):
    """The compiled kernel. The kernels are module-level functions (numba caches a closure under a
    new key in every process: the cache never hit and grew by a file a run); the line parser is
    bound to its module-level name before the block parser that calls it is compiled."""
    import numba

    global _parse_line, prange
    prange = numba.prange
    _parse_line = numba.njit(cache=cache, nogil=True, boundscheck=False)(_parse_line_py)
    return numba.njit(cache=cache, parallel=True, nogil=True, boundscheck=False)(_parse_lines_py)


_parse_line = None  # the compiled _parse_line_py, once _build has run
prange = range      # numba.prange, once _build has run


def _parse_line_py(buf, start, end, dim, out, row, tabs):
    """Parse one line into out[row]; tabs[row] = (first tab, second tab). False if not handled."""
    if end > start and buf[end - 1] == 13:  # CRLF
        end -= 1
    pos = start
    while pos < end and buf[pos] != 9:
        pos += 1
    if pos == start or pos >= end:
        return False
    tabs[row, 0] = pos
    pos += 1
    label = pos
    while pos < end and buf[pos] != 9:
        pos += 1
    if pos == label or pos >= end:
        return False
    tabs[row, 1] = pos
    pos += 1
    n = 0
    while True:
        while pos < end and buf[pos] == 32:
            pos += 1
        if pos >= end:
            break
        if n >= dim:
            return False
        negative = False
        c = buf[pos]
        if c == 45 or c == 43:  # - +
            negative = c == 45
            pos += 1
        mantissa = 0
        first = pos
        # the integer and fraction digit loops are written out twice on purpose: one shared
        # njit helper returning (mantissa, pos) measured 25% slower (651 -> 485 MB/s per core)
        while pos < end:
            digit = np.int64(buf[pos]) - 48
            if digit < 0 or digit > 9:
                break
            mantissa = mantissa * 10 + digit
            pos += 1
        digits = pos - first
        exponent = 0
        if pos < end and buf[pos] == 46:  # .
            pos += 1
            first = pos
            while pos < end:
                digit = np.int64(buf[pos]) - 48
                if digit < 0 or digit > 9:
                    break
                mantissa = mantissa * 10 + digit
                pos += 1
            exponent = first - pos
            digits -= exponent
        if digits == 0 or digits > 18 or mantissa > 9007199254740992:  # 2**53: exact as a float64
            return False
        if pos < end and (buf[pos] == 101 or buf[pos] == 69):  # e E
            pos += 1
            sign = 1
            if pos < end and (buf[pos] == 45 or buf[pos] == 43):
                if buf[pos] == 45:
                    sign = -1
                pos += 1
            power = 0
            power_digits = 0
            while pos < end and 48 <= buf[pos] <= 57:
                if power < 10000:
                    power = power * 10 + (buf[pos] - 48)
                power_digits += 1
                pos += 1
            if power_digits == 0:
                return False
            exponent += sign * power
        if pos < end and buf[pos] != 32:
            return False
        value = float(mantissa)
        if mantissa != 0:
            if exponent > 22 or exponent < -22:
                return False
            if exponent >= 0:
                value = value * _POW10[exponent]
            else:
                value = value / _POW10[-exponent]
        if negative:
            value = -value
        out[row, n] = np.float32(value)
        n += 1
    return n == dim


def _parse_lines_py(buf, starts, ends, dim, out, tabs):
    """Parse lines i (bytes starts[i]:ends[i] of buf) into out[i]; returns the first line not
    handled, or -1."""
    count = len(starts)
    bad = np.full(count, False)
    for i in prange(count):
        bad[i] = not _parse_line(buf, starts[i], ends[i], dim, out, i, tabs)
    for i in range(count):
        if bad[i]:
            return i
    return -1


def _line_ends(data, size):
    """Offsets of the newlines in data[:size] (find: memchr speed, one Python step per line)."""
    ends, at = [], data.find(b"\n", 0, size)
    while at >= 0:
        ends.append(at)
        at = data.find(b"\n", at + 1, size)
    return ends


def parse_block(data, size, dim, reserve=None):
    """(paths, labels, float32 (N, dim) vectors) of the whole lines in data[:size] (bytes or
    bytearray; each line ends in a newline), or None if any line is not handled here (see the
    module doc). reserve(N), if given, returns the C-contiguous (N, dim) float32 array to fill."""
    kernel = _kernel()
    if kernel is None:  # before reserve(): no rows are taken for a block that is not parsed here
        return None
    buf = np.frombuffer(data, dtype=np.uint8, count=size)
    ends = np.array(_line_ends(data, size), dtype=np.int64)
    starts = np.empty_like(ends)
    starts[:1] = 0
    starts[1:] = ends[:-1] + 1
    vectors = np.empty((len(ends), dim), np.float32) if reserve is None else reserve(len(ends))
    tabs = np.empty((len(ends), 2), np.int64)
    try:
        if kernel(buf, starts, ends, dim, vectors, tabs) >= 0:
            return None
    except Exception:  # numba compiles on the first call: a numba that fails here is not used again
        global _KERNEL
        _KERNEL = False
        return None
    try:
        paths = [data[s:t].decode("utf-8") for s, t in zip(starts.tolist(), tabs[:, 0].tolist(), strict=True)]
        labels = [data[a + 1:b].decode("utf-8") for a, b in tabs.tolist()]
    except UnicodeDecodeError:
        return None
    return paths, labels, vectors
