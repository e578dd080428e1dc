/* Native loops of the entropy stream and the lossless residual (docs/format.md).
 *
 * Why C and not numpy: grouping symbols by context takes a stable argsort, a gather, a
 * scatter and a byte-plane split or assembly, each a full pass over 8-byte integers; here it
 * is one counting pass plus one pass that moves each byte straight to its place. Why the
 * CPython C API and not ctypes: setuptools builds it with the package (no second build
 * system, no shared-library search path), and arguments cross as buffers without numpy
 * headers at build time. Every function only reads and writes caller-owned buffers and
 * releases the GIL while it loops, so blocks decode in parallel on threads.
 *
 * The pure-numpy path in entropy.py / lossless.py is the reference: both must give the same
 * bytes and the same tensors (tests/test_codecs.py runs both).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CONTEXTS 256

/* Four interleaved tables: runs of one context would otherwise serialise on one counter. */
static void count_contexts(const uint8_t *contexts, Py_ssize_t n, int64_t *counts) {
    int64_t partial[4][CONTEXTS] = {{0}};
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4) {
        partial[0][contexts[i]]++;
        partial[1][contexts[i + 1]]++;
        partial[2][contexts[i + 2]]++;
        partial[3][contexts[i + 3]]++;
    }
    for (; i < n; i++) partial[0][contexts[i]]++;
    for (int c = 0; c < CONTEXTS; c++) counts[c] = partial[0][c] + partial[1][c] + partial[2][c] + partial[3][c];
}

static uint64_t load_symbol(const char *symbols, int itemsize, Py_ssize_t i) {
    switch (itemsize) {
    case 1: return ((const uint8_t *)symbols)[i];
    case 2: return ((const uint16_t *)symbols)[i];
    case 4: return ((const uint32_t *)symbols)[i];
    default: return ((const uint64_t *)symbols)[i];
    }
}

static int check_same_length(Py_ssize_t a_items, Py_ssize_t b_items) {
    if (a_items != b_items) {
        PyErr_Format(PyExc_ValueError, "buffers hold %zd and %zd elements", a_items, b_items);
        return 0;
    }
    return 1;
}

/* histogram(contexts) -> bytes: 256 native int64 counts. */
static PyObject *histogram(PyObject *self, PyObject *args) {
    Py_buffer contexts;
    if (!PyArg_ParseTuple(args, "y*", &contexts)) return NULL;
    int64_t counts[CONTEXTS];
    Py_BEGIN_ALLOW_THREADS
    count_contexts(contexts.buf, contexts.len, counts);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&contexts);
    return PyBytes_FromStringAndSize((const char *)counts, sizeof(counts));
}

/* split_planes(symbols, itemsize, contexts) -> (counts, plane_counts, planes)
 *
 * symbols: n unsigned little-endian integers of `itemsize` bytes (1, 2, 4 or 8); contexts: n
 * uint8. counts: 256 native int64; plane_counts: 256 uint8, the bytes needed by the largest
 * symbol of each context; planes: for each context in increasing order, its planes (least
 * significant first), each the context's symbols' byte p in element order.
 *
 * Two passes after the counting one: a stable counting-sort gather into uint64 (one store per
 * symbol), then each context's planes cut from its contiguous run (sequential, no branches).
 */
static PyObject *split_planes(PyObject *self, PyObject *args) {
    Py_buffer symbols, contexts;
    int itemsize;
    if (!PyArg_ParseTuple(args, "y*iy*", &symbols, &itemsize, &contexts)) return NULL;
    PyObject *result = NULL;
    uint64_t *ordered = NULL;
    if (itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8) {
        PyErr_Format(PyExc_ValueError, "symbol width must be 1, 2, 4 or 8 bytes, got %d", itemsize);
        goto done;
    }
    Py_ssize_t n = contexts.len;
    if (!check_same_length(symbols.len / itemsize, n)) goto done;
    ordered = malloc((n ? n : 1) * sizeof(uint64_t));
    if (!ordered) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t counts[CONTEXTS], first[CONTEXTS], plane_start[CONTEXTS];
    uint64_t seen[CONTEXTS] = {0};
    uint8_t plane_counts[CONTEXTS];
    const uint8_t *ctx = contexts.buf;
    const char *sym = symbols.buf;
    Py_BEGIN_ALLOW_THREADS
    count_contexts(ctx, n, counts);
    for (int c = 0; c < CONTEXTS; c++) first[c] = c ? first[c - 1] + counts[c - 1] : 0;
    int64_t cursor[CONTEXTS];
    memcpy(cursor, first, sizeof(cursor));
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t value = load_symbol(sym, itemsize, i);
        seen[ctx[i]] |= value;
        ordered[cursor[ctx[i]]++] = value;
    }
    Py_END_ALLOW_THREADS
    int64_t total = 0;
    for (int c = 0; c < CONTEXTS; c++) {
        int planes = 0;
        while (planes < 8 && (seen[c] >> (8 * planes))) planes++;
        plane_counts[c] = (uint8_t)planes;
        plane_start[c] = total;
        total += counts[c] * planes;
    }
    PyObject *planes = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (!planes) goto done;
    uint8_t *out = (uint8_t *)PyByteArray_AS_STRING(planes);
    Py_BEGIN_ALLOW_THREADS
    for (int c = 0; c < CONTEXTS; c++) {
        const uint64_t *run = ordered + first[c];
        for (int p = 0; p < plane_counts[c]; p++) {
            uint8_t *plane = out + plane_start[c] + p * counts[c];
            for (int64_t k = 0; k < counts[c]; k++) plane[k] = (uint8_t)(run[k] >> (8 * p));
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(y#y#N)", (const char *)counts, (Py_ssize_t)sizeof(counts),
                           (const char *)plane_counts, (Py_ssize_t)sizeof(plane_counts), planes);
done:
    free(ordered);
    PyBuffer_Release(&symbols);
    PyBuffer_Release(&contexts);
    return result;
}

/* Assemble each context's run from its planes (sequential), then scatter the runs back to
 * element order (a stable counting sort), in symbols of type T. */
#define JOIN(T)                                                                                  \
    {                                                                                            \
        T *run_ = (T *)ordered, *symbols_ = (T *)out.buf;                                        \
        for (int c = 0; c < CONTEXTS; c++) {                                                     \
            T *run = run_ + first[c];                                                            \
            if (!counts[c]) continue;                                                            \
            memset(run, 0, counts[c] * sizeof(T));                                               \
            for (int p = 0; p < width[c]; p++) {                                                 \
                const uint8_t *plane = plane_at[c][p];                                           \
                for (int64_t k = 0; k < counts[c]; k++) run[k] |= (T)((T)plane[k] << (8 * p));   \
            }                                                                                    \
        }                                                                                        \
        for (Py_ssize_t i = 0; i < n; i++) symbols_[i] = run_[cursor[ctx[i]]++];                 \
    }

/* join_planes(planes, counts, plane_counts, contexts, out, itemsize) -> None: inverse of split_planes.
 *
 * planes: a list of bytes, the planes in stream order (each present context's
 * `plane_counts[c]` planes of `counts[c]` bytes); counts: 256 native int64, the histogram of
 * contexts; out: n unsigned integers of `itemsize` bytes (1, 2, 4 or 8), wide enough for
 * every context's planes: narrow symbols move less memory.
 */
static PyObject *join_planes(PyObject *self, PyObject *args) {
    PyObject *plane_list;
    Py_buffer count_buffer, plane_counts, contexts, out;
    int itemsize;
    if (!PyArg_ParseTuple(args, "O!y*y*y*w*i", &PyList_Type, &plane_list, &count_buffer, &plane_counts, &contexts, &out, &itemsize))
        return NULL;
    PyObject *result = NULL;
    void *ordered = NULL;
    Py_ssize_t n = contexts.len;
    const uint8_t *ctx = contexts.buf;
    const uint8_t *width = plane_counts.buf;
    const int64_t *counts = count_buffer.buf;
    const uint8_t *plane_at[CONTEXTS][8];
    int64_t first[CONTEXTS], cursor[CONTEXTS];
    if (plane_counts.len != CONTEXTS || count_buffer.len != CONTEXTS * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "counts and plane_counts must hold 256 entries");
        goto done;
    }
    if (itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8) {
        PyErr_Format(PyExc_ValueError, "symbol width must be 1, 2, 4 or 8 bytes, got %d", itemsize);
        goto done;
    }
    if (!check_same_length(out.len / itemsize, n)) goto done;
    Py_ssize_t next = 0;
    int64_t total = 0;
    for (int c = 0; c < CONTEXTS; c++) {
        first[c] = total;
        total += counts[c];
        if (!counts[c]) continue;
        if (width[c] > itemsize) {
            PyErr_Format(PyExc_ValueError, "context %d has %d planes, symbols hold %d bytes", c, width[c], itemsize);
            goto done;
        }
        for (int p = 0; p < width[c]; p++, next++) {
            PyObject *plane = next < PyList_GET_SIZE(plane_list) ? PyList_GET_ITEM(plane_list, next) : NULL;
            if (!plane || !PyBytes_Check(plane) || PyBytes_GET_SIZE(plane) != counts[c]) {
                PyErr_Format(PyExc_ValueError, "plane %zd is missing or not %lld bytes", next, (long long)counts[c]);
                goto done;
            }
            plane_at[c][p] = (const uint8_t *)PyBytes_AS_STRING(plane);
        }
    }
    if (total != n || next != PyList_GET_SIZE(plane_list)) {
        PyErr_Format(PyExc_ValueError, "%zd planes for %lld symbols given, %zd planes for %zd expected",
                     PyList_GET_SIZE(plane_list), (long long)total, next, n);
        goto done;
    }
    ordered = malloc((n ? n : 1) * itemsize);
    if (!ordered) {
        PyErr_NoMemory();
        goto done;
    }
    memcpy(cursor, first, sizeof(cursor));
    Py_BEGIN_ALLOW_THREADS
    switch (itemsize) {
    case 1: JOIN(uint8_t) break;
    case 2: JOIN(uint16_t) break;
    case 4: JOIN(uint32_t) break;
    default: JOIN(uint64_t) break;
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(ordered);
    PyBuffer_Release(&count_buffer);
    PyBuffer_Release(&plane_counts);
    PyBuffer_Release(&contexts);
    PyBuffer_Release(&out);
    return result;
}

/* Ordered integer of a float bit pattern read as a signed integer (docs/format.md). */
static inline int64_t ordered16(int16_t bits) { return bits < 0 ? (int64_t)(bits ^ 0x7FFF) : bits; }
static inline int64_t ordered32(int32_t bits) { return bits < 0 ? (int64_t)(bits ^ 0x7FFFFFFF) : bits; }

/* residual(original, reconstruction, width, out) -> None: zigzag(ord(original) - ord(reconstruction)) as uint64. */
static PyObject *residual(PyObject *self, PyObject *args) {
    Py_buffer original, reconstruction, out;
    int width;
    if (!PyArg_ParseTuple(args, "y*y*iw*", &original, &reconstruction, &width, &out)) return NULL;
    PyObject *result = NULL;
    if (width != 2 && width != 4) {
        PyErr_Format(PyExc_ValueError, "float width must be 2 or 4 bytes, got %d", width);
        goto done;
    }
    Py_ssize_t n = original.len / width;
    if (!check_same_length(n, reconstruction.len / width)) goto done;
    if (!check_same_length(n, out.len / 8)) goto done;
    uint64_t *coded = out.buf;
    Py_BEGIN_ALLOW_THREADS
    if (width == 2) {
        const int16_t *x = original.buf, *y = reconstruction.buf;
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t d = ordered16(x[i]) - ordered16(y[i]);
            coded[i] = ((uint64_t)d << 1) ^ (uint64_t)(d >> 63);
        }
    } else {
        const int32_t *x = original.buf, *y = reconstruction.buf;
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t d = ordered32(x[i]) - ordered32(y[i]);
            coded[i] = ((uint64_t)d << 1) ^ (uint64_t)(d >> 63);
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&original);
    PyBuffer_Release(&reconstruction);
    PyBuffer_Release(&out);
    return result;
}

/* restore(reconstruction, coded, coded_itemsize, width, out) -> None: inverse of residual, float bit
 * patterns into out; coded: unsigned integers of `coded_itemsize` bytes (1, 2, 4 or 8).
 *
 * Like the numpy path (int64 sum, then a cast to the float width), the sum wraps to the width.
 */
static PyObject *restore(PyObject *self, PyObject *args) {
    Py_buffer reconstruction, coded, out;
    int coded_itemsize, width;
    if (!PyArg_ParseTuple(args, "y*y*iiw*", &reconstruction, &coded, &coded_itemsize, &width, &out)) return NULL;
    PyObject *result = NULL;
    if (width != 2 && width != 4) {
        PyErr_Format(PyExc_ValueError, "float width must be 2 or 4 bytes, got %d", width);
        goto done;
    }
    if (coded_itemsize != 1 && coded_itemsize != 2 && coded_itemsize != 4 && coded_itemsize != 8) {
        PyErr_Format(PyExc_ValueError, "symbol width must be 1, 2, 4 or 8 bytes, got %d", coded_itemsize);
        goto done;
    }
    Py_ssize_t n = reconstruction.len / width;
    if (!check_same_length(n, coded.len / coded_itemsize)) goto done;
    if (!check_same_length(n, out.len / width)) goto done;
    const char *z = coded.buf;
    Py_BEGIN_ALLOW_THREADS
    if (width == 2) {
        const int16_t *y = reconstruction.buf;
        int16_t *x = out.buf;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t zi = load_symbol(z, coded_itemsize, i);
            int64_t d = (int64_t)(zi >> 1) ^ -(int64_t)(zi & 1);
            int16_t bits = (int16_t)(uint16_t)(uint64_t)(ordered16(y[i]) + d);
            x[i] = bits < 0 ? (int16_t)(bits ^ 0x7FFF) : bits;
        }
    } else {
        const int32_t *y = reconstruction.buf;
        int32_t *x = out.buf;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t zi = load_symbol(z, coded_itemsize, i);
            int64_t d = (int64_t)(zi >> 1) ^ -(int64_t)(zi & 1);
            int32_t bits = (int32_t)(uint32_t)(uint64_t)(ordered32(y[i]) + d);
            x[i] = bits < 0 ? (int32_t)(bits ^ 0x7FFFFFFF) : bits;
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&reconstruction);
    PyBuffer_Release(&coded);
    PyBuffer_Release(&out);
    return result;
}

/* contexts(reconstruction, width, mantissa_bits, bias, step, low, high, out) -> None
 *
 * out[i] = clamp(e(reconstruction[i]) - e(step[i]), low, high) - low, where e() is the biased
 * exponent field minus the bias: of a float of `width` bytes with `mantissa_bits`, `bias` for
 * the reconstruction, of a float32 for the step.
 */
static PyObject *contexts(PyObject *self, PyObject *args) {
    Py_buffer reconstruction, step, out;
    int width, mantissa_bits, bias, low, high;
    if (!PyArg_ParseTuple(args, "y*iiiy*iiw*", &reconstruction, &width, &mantissa_bits, &bias, &step, &low, &high, &out))
        return NULL;
    PyObject *result = NULL;
    if ((width != 2 && width != 4) || mantissa_bits < 1 || mantissa_bits >= 8 * width - 1) {
        PyErr_Format(PyExc_ValueError, "no float layout of %d bytes with %d mantissa bits", width, mantissa_bits);
        goto done;
    }
    Py_ssize_t n = reconstruction.len / width;
    if (!check_same_length(n, step.len / 4)) goto done;
    if (!check_same_length(n, out.len)) goto done;
    const uint32_t *s = step.buf;
    uint8_t *c = out.buf;
    uint32_t field_mask = (1u << (8 * width - 1 - mantissa_bits)) - 1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t bits = width == 2 ? ((const uint16_t *)reconstruction.buf)[i] : ((const uint32_t *)reconstruction.buf)[i];
        int relative = ((int)((bits >> mantissa_bits) & field_mask) - bias) - ((int)((s[i] >> 23) & 0xFF) - 127);
        relative = relative < low ? low : relative > high ? high : relative;
        c[i] = (uint8_t)(relative - low);
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&reconstruction);
    PyBuffer_Release(&step);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"histogram", histogram, METH_VARARGS, "Counts of each uint8 context: bytes of 256 native int64."},
    {"split_planes", split_planes, METH_VARARGS, "Group symbols by context and split them into byte planes."},
    {"join_planes", join_planes, METH_VARARGS, "Inverse of split_planes, into a uint64 buffer."},
    {"residual", residual, METH_VARARGS, "Zigzag-coded ordered-integer residual of float bit patterns."},
    {"restore", restore, METH_VARARGS, "Inverse of residual: the original float bit patterns."},
    {"contexts", contexts, METH_VARARGS, "Lossless coding context: relative exponent of reconstruction and step, clamped."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "Native loops of the p2u codec.", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
