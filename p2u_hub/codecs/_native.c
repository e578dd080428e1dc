/* Native loops of the entropy stream, the lossless residual (docs/format.md) and split's base grid search.
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

/* ---- Encoding: byte planes coded as Huffman-only raw DEFLATE (RFC 1951) ----
 *
 * entropy.py's numpy path (_deflate and its helpers) is the reference and spells the algorithm
 * out; this is the same algorithm, so both write the same bytes. Why not zlib: in Huffman-only
 * mode it still runs its LZ77 machinery per byte (~7 ns/byte); a histogram, a code and one
 * table lookup per byte is ~1 ns. Decoding is any inflater's job: the streams are plain DEFLATE.
 */

#define LITERALS 257 /* the byte values and end-of-block: Huffman-only blocks use no length codes */
#define END_OF_BLOCK 256
#define MAX_CODE_BITS 15
#define LENGTH_CODES 19
#define MAX_LENGTH_CODE_BITS 7
#define FIXED_LITERALS 288 /* the fixed code spans the length codes too */
#define MAX_BLOCK_SYMBOLS 65535 /* a stored block holds at most this many bytes */

static const uint8_t length_code_order[LENGTH_CODES] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};

/* Code lengths of symbols 0..m-1 (m <= LITERALS) of frequencies `freq`, none longer than `limit`
 * (entropy._code_lengths): Huffman's merge of the used symbols sorted by (frequency, symbol) on
 * two queues (a leaf wins ties), depths past `limit` cut to it and Kraft's sum restored by
 * splitting the deepest shorter code, then the lengths dealt out shortest first to the most
 * frequent symbols. */
static void code_lengths(const uint32_t *freq, int m, int limit, uint8_t *lengths) {
    uint16_t order[LITERALS], spare[LITERALS]; /* the used symbols by (frequency, symbol): a stable radix sort */
    int n = 0, high = 0;
    for (int s = 0; s < m; s++) {
        lengths[s] = 0;
        if (freq[s]) order[n++] = (uint16_t)s, high |= (int)freq[s];
    }
    for (int shift = 0; shift < 16 && high >> shift; shift += 8) { /* frequencies < 2^16: blocks hold <= 65535 bytes */
        int start[257] = {0};
        for (int i = 0; i < n; i++) start[((freq[order[i]] >> shift) & 255) + 1]++;
        for (int d = 1; d < 257; d++) start[d] += start[d - 1];
        for (int i = 0; i < n; i++) spare[start[(freq[order[i]] >> shift) & 255]++] = order[i];
        memcpy(order, spare, n * sizeof(uint16_t));
    }
    if (n == 1) lengths[order[0]] = 1;
    if (n < 2) return;
    uint64_t weight[LITERALS];
    int leaf_parent[LITERALS], node_parent[LITERALS], depth[LITERALS], count[LITERALS + 1] = {0};
    int leaf = 0, node = 0;
    for (int k = 0; k < n - 1; k++) {
        uint64_t sum = 0;
        for (int pick = 0; pick < 2; pick++) {
            if (leaf < n && (node >= k || freq[order[leaf]] <= weight[node])) {
                sum += freq[order[leaf]];
                leaf_parent[leaf++] = k;
            } else {
                sum += weight[node];
                node_parent[node++] = k;
            }
        }
        weight[k] = sum;
    }
    depth[n - 2] = 0;
    for (int k = n - 3; k >= 0; k--) depth[k] = depth[node_parent[k]] + 1;
    for (int i = 0; i < n; i++) {
        int d = depth[leaf_parent[i]] + 1;
        count[d < limit ? d : limit]++;
    }
    uint32_t kraft = 0;
    for (int d = 1; d <= limit; d++) kraft += (uint32_t)count[d] << (limit - d);
    for (; kraft != 1u << limit; kraft--) {
        count[limit]--;
        for (int d = limit - 1; d > 0; d--)
            if (count[d]) {
                count[d]--;
                count[d + 1] += 2;
                break;
            }
    }
    for (int d = 1, j = n; d <= limit; d++)
        for (int c = 0; c < count[d]; c++) lengths[order[--j]] = (uint8_t)d;
}

/* Canonical codes of `lengths` (RFC 1951 3.2.2), bit-reversed: DEFLATE sends a code's first bit
 * first, and the bit writer fills bytes from their least significant bit. */
static void canonical_codes(const uint8_t *lengths, int m, uint16_t *codes) {
    int count[MAX_CODE_BITS + 1] = {0};
    uint32_t next[MAX_CODE_BITS + 1];
    for (int s = 0; s < m; s++) count[lengths[s]]++;
    count[0] = 0;
    uint32_t code = 0;
    for (int bits = 1; bits <= MAX_CODE_BITS; bits++) next[bits] = code = (code + (uint32_t)count[bits - 1]) << 1;
    for (int s = 0; s < m; s++) {
        uint32_t value = lengths[s] ? next[lengths[s]]++ : 0, reversed = 0;
        for (int b = 0; b < lengths[s]; b++) reversed |= ((value >> b) & 1) << (lengths[s] - 1 - b);
        codes[s] = (uint16_t)reversed;
    }
}

/* `value` as 8 little-endian bytes (compilers make it one store on little-endian machines). */
static inline void store_le64(uint8_t *out, uint64_t value) {
    for (int b = 0; b < 8; b++) out[b] = (uint8_t)(value >> (8 * b));
}

/* Writes bits least significant first, storing 8 bytes at a time: the output needs 8 bytes of slack. */
typedef struct {
    uint8_t *out;
    uint64_t bits;
    int used; /* bits of `bits` not yet whole bytes past `out`, 0..7 */
} bit_writer;

static inline void put_bits(bit_writer *w, uint64_t value, int count) {
    w->bits |= value << w->used;
    w->used += count;
    store_le64(w->out, w->bits);
    w->out += w->used >> 3;
    w->bits >>= w->used & ~7;
    w->used &= 7;
}

/* One block's code-length header (RFC 1951 3.2.7): the 257 literal lengths then the 2 distance
 * lengths, each sequence run-length coded on its own (entropy._run_length_code): a run of zeros as
 * 18 (11-138) and 17 (3-10) codes, a run of one length as the length then 16 codes (3-6 repeats),
 * leftovers written plainly. */
typedef struct {
    uint8_t symbol[LITERALS + 2], extra_bits[LITERALS + 2];
    uint8_t extra[LITERALS + 2];
    int count;
    uint32_t freq[LENGTH_CODES];
} length_header;

static void run_length_code(const uint8_t *lengths, int m, length_header *h) {
    for (int i = 0; i < m;) {
        int value = lengths[i], run = 1;
        while (i + run < m && lengths[i + run] == value) run++;
        i += run;
#define EMIT(SYMBOL, BITS, EXTRA) (h->symbol[h->count] = (SYMBOL), h->extra_bits[h->count] = (BITS), h->extra[h->count++] = (EXTRA), h->freq[SYMBOL]++)
        if (value == 0) {
            for (; run >= 11; run -= run < 138 ? run : 138) EMIT(18, 7, (run < 138 ? run : 138) - 11);
            if (run >= 3) EMIT(17, 3, run - 3), run = 0;
        } else {
            EMIT(value, 0, 0), run--;
            for (; run >= 3; run -= run < 6 ? run : 6) EMIT(16, 2, (run < 6 ? run : 6) - 3);
        }
        for (; run > 0; run--) EMIT(value, 0, 0);
#undef EMIT
    }
}

/* One block of a plane, its byte i at data[i * stride] (entropy._block_bits): the cheapest of a
 * stored, a fixed-code and a dynamic-code block, ties going to stored, then fixed (the faster ones
 * to inflate). */
static void deflate_block(bit_writer *w, const uint8_t *data, Py_ssize_t n, Py_ssize_t stride, int final,
                          const uint16_t *fixed_codes, const uint8_t *fixed_lengths) {
    uint32_t part[4][256] = {{0}}, freq[LITERALS];
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4) {
        part[0][data[i * stride]]++;
        part[1][data[(i + 1) * stride]]++;
        part[2][data[(i + 2) * stride]]++;
        part[3][data[(i + 3) * stride]]++;
    }
    for (; i < n; i++) part[0][data[i * stride]]++;
    for (int s = 0; s < 256; s++) freq[s] = part[0][s] + part[1][s] + part[2][s] + part[3][s];
    freq[END_OF_BLOCK] = 1;
    uint8_t lengths[LITERALS], length_lengths[LENGTH_CODES], distance_lengths[2] = {1, 1};
    uint16_t codes[LITERALS], length_codes[LENGTH_CODES];
    code_lengths(freq, LITERALS, MAX_CODE_BITS, lengths);
    length_header h = {.count = 0};
    run_length_code(lengths, LITERALS, &h);
    run_length_code(distance_lengths, 2, &h);
    code_lengths(h.freq, LENGTH_CODES, MAX_LENGTH_CODE_BITS, length_lengths);
    int hclen = LENGTH_CODES;
    while (hclen > 4 && !length_lengths[length_code_order[hclen - 1]]) hclen--;
    uint64_t dynamic = 3 + 5 + 5 + 4 + 3 * (uint64_t)hclen, fixed = 3, stored = 3 + ((8 - (w->used + 3) % 8) % 8) + 32 + 8 * (uint64_t)n;
    for (int k = 0; k < h.count; k++) dynamic += length_lengths[h.symbol[k]] + h.extra_bits[k];
    for (int s = 0; s < LITERALS; s++) {
        dynamic += (uint64_t)freq[s] * lengths[s];
        fixed += (uint64_t)freq[s] * fixed_lengths[s];
    }
    const uint16_t *code = codes;
    const uint8_t *length = lengths;
    if (stored <= fixed && stored <= dynamic) {
        put_bits(w, (uint64_t)final, 3);
        if (w->used) put_bits(w, 0, 8 - w->used);
        put_bits(w, (uint64_t)n | (uint64_t)(~n & 0xFFFF) << 16, 32);
        uint8_t *out = w->out;
        for (i = 0; i < n; i++) out[i] = data[i * stride];
        w->out = out + n;
        return;
    }
    if (fixed <= dynamic) {
        put_bits(w, (uint64_t)final | 1 << 1, 3);
        code = fixed_codes, length = fixed_lengths;
    } else {
        canonical_codes(lengths, LITERALS, codes);
        canonical_codes(length_lengths, LENGTH_CODES, length_codes);
        put_bits(w, (uint64_t)final | 2 << 1, 3);
        put_bits(w, 0 | 1 << 5 | (uint64_t)(hclen - 4) << 10, 14); /* HLIT 257, HDIST 2, HCLEN */
        for (int k = 0; k < hclen; k++) put_bits(w, length_lengths[length_code_order[k]], 3);
        for (int k = 0; k < h.count; k++) {
            put_bits(w, length_codes[h.symbol[k]], length_lengths[h.symbol[k]]);
            put_bits(w, h.extra[k], h.extra_bits[k]);
        }
    }
    uint32_t table[256]; /* code << 4 | length: one load per byte */
    for (int s = 0; s < 256; s++) table[s] = (uint32_t)code[s] << 4 | length[s];
    uint64_t bits = w->bits;
    int used = w->used;
    uint8_t *out = w->out;
    i = 0;
    for (; i + 3 <= n; i += 3) { /* 3 codes of <= 15 bits fit the 64-bit buffer beside <= 7 bits left */
        uint32_t a = table[data[i * stride]], b = table[data[(i + 1) * stride]], c = table[data[(i + 2) * stride]];
        bits |= (uint64_t)(a >> 4) << used;
        used += a & 15;
        bits |= (uint64_t)(b >> 4) << used;
        used += b & 15;
        bits |= (uint64_t)(c >> 4) << used;
        used += c & 15;
        store_le64(out, bits);
        out += used >> 3;
        bits >>= used & ~7;
        used &= 7;
    }
    w->bits = bits, w->used = used, w->out = out;
    for (; i < n; i++) put_bits(w, table[data[i * stride]] >> 4, table[data[i * stride]] & 15);
    put_bits(w, code[END_OF_BLOCK], length[END_OF_BLOCK]);
}

/* The fixed literal code (RFC 1951 3.2.6) for the 256 bytes and end-of-block, bit-reversed. */
static void fixed_literal_code(uint16_t *codes, uint8_t *lengths) {
    uint8_t all_lengths[FIXED_LITERALS];
    uint16_t all_codes[FIXED_LITERALS];
    for (int s = 0; s < FIXED_LITERALS; s++) all_lengths[s] = s < 144 ? 8 : s < 256 ? 9 : s < 280 ? 7 : 8;
    canonical_codes(all_lengths, FIXED_LITERALS, all_codes);
    memcpy(codes, all_codes, LITERALS * sizeof(uint16_t));
    memcpy(lengths, all_lengths, LITERALS);
}

/* Upper bound of a coded plane of n bytes: no block codes larger than stored (n + 5.25 bytes each). */
static size_t deflated_bound(size_t n, size_t block_symbols) { return n + 6 * ((n + block_symbols - 1) / block_symbols) + 1; }

/* Code one plane of n >= 1 bytes, its byte i at data[i * stride], as raw DEFLATE in blocks of
 * block_symbols bytes (the last one final); returns the coded length. */
static size_t deflate_plane(uint8_t *out, const uint8_t *data, size_t n, size_t stride, size_t block_symbols,
                            const uint16_t *fixed_codes, const uint8_t *fixed_lengths) {
    bit_writer w = {out, 0, 0};
    for (size_t start = 0; start < n; start += block_symbols) {
        size_t size = n - start < block_symbols ? n - start : block_symbols;
        deflate_block(&w, data + start * stride, (Py_ssize_t)size, (Py_ssize_t)stride, start + size == n, fixed_codes,
                      fixed_lengths);
    }
    return (size_t)(w.out - out) + (w.used > 0);
}

/* Bytes needed by `value`: 0 for 0. */
static int byte_width(uint64_t value) {
    int width = 0;
    while (width < 8 && value >> (8 * width)) width++;
    return width;
}

/* The bytes of the narrowest integer holding `width` bytes: 1, 2, 4 or 8. */
static int stride_of(int width) { return width <= 1 ? 1 : width <= 2 ? 2 : width <= 4 ? 4 : 8; }

/* The OR of all symbols: its byte width bounds every context's (one pass the compiler vectorises). */
#define OR_ALL(T)                                                                                \
    {                                                                                            \
        const T *s_ = (const T *)sym;                                                            \
        T all_ = 0;                                                                              \
        for (Py_ssize_t i = 0; i < n; i++) all_ |= s_[i];                                        \
        all = all_;                                                                              \
    }

static uint64_t or_all(const char *sym, int itemsize, Py_ssize_t n) {
    uint64_t all = 0;
    switch (itemsize) {
    case 1: OR_ALL(uint8_t) break;
    case 2: OR_ALL(uint16_t) break;
    case 4: OR_ALL(uint32_t) break;
    default: OR_ALL(uint64_t) break;
    }
    return all;
}

/* A stable counting sort of the symbols by context into `ordered`, as integers of T; its two halves
 * run side by side, each with its own cursors: a context's cursor is a load-increment-store, and
 * two independent chains keep close repeats of one context from stalling the loop. */
#define SORT_BY_CONTEXT(T)                                                                       \
    {                                                                                            \
        T *out_ = (T *)ordered;                                                                  \
        for (Py_ssize_t i = 0; i < half; i++) {                                                  \
            out_[cursor[0][ctx[i]]++] = (T)load_symbol(sym, itemsize, i);                        \
            out_[cursor[1][ctx[half + i]]++] = (T)load_symbol(sym, itemsize, half + i);          \
        }                                                                                        \
        if (n % 2) out_[cursor[1][ctx[n - 1]]++] = (T)load_symbol(sym, itemsize, n - 1);         \
    }

/* Sort the symbols by context into `ordered`, each as `stride` bytes (stride_of the widest):
 * context c's plane p is then byte p of each symbol of its run, which deflate_plane reads strided,
 * so no pass moves bytes into planes. `first`: each context's count in the first n / 2 symbols. */
static void sort_by_context(const char *sym, int itemsize, const uint8_t *ctx, Py_ssize_t n, const int64_t *first,
                            const int64_t *counts, int stride, uint8_t *ordered) {
    int64_t cursor[2][CONTEXTS], start = 0;
    Py_ssize_t half = n / 2;
    for (int c = 0; c < CONTEXTS; start += counts[c++]) {
        cursor[0][c] = start;
        cursor[1][c] = start + first[c];
    }
    switch (stride) {
    case 1: SORT_BY_CONTEXT(uint8_t) break;
    case 2: SORT_BY_CONTEXT(uint16_t) break;
    case 4: SORT_BY_CONTEXT(uint32_t) break;
    default: SORT_BY_CONTEXT(uint64_t) break;
    }
}

/* Each context's plane count: the byte width of the OR of its run in `ordered`. */
#define RUN_WIDTHS(T)                                                                            \
    {                                                                                            \
        const T *run_ = (const T *)ordered;                                                      \
        for (int c = 0; c < CONTEXTS; run_ += counts[c++]) {                                     \
            T all_ = 0;                                                                          \
            for (int64_t k = 0; k < counts[c]; k++) all_ |= run_[k];                             \
            width[c] = byte_width(all_);                                                         \
        }                                                                                        \
    }

static void run_widths(const uint8_t *ordered, int stride, const int64_t *counts, int *width) {
    switch (stride) {
    case 1: RUN_WIDTHS(uint8_t) break;
    case 2: RUN_WIDTHS(uint16_t) break;
    case 4: RUN_WIDTHS(uint32_t) break;
    default: RUN_WIDTHS(uint64_t) break;
    }
}

/* encode_stream(symbols, itemsize, contexts, block_symbols) -> bytes: entropy.encode's stream.
 *
 * symbols: n unsigned little-endian integers of `itemsize` bytes (1, 2, 4 or 8); contexts: n uint8;
 * block_symbols: the bytes per DEFLATE block (entropy.BLOCK_SYMBOLS). Passes: the contexts' counts
 * (each half's) and the OR of all symbols; the counting sort; each context's OR (its plane count);
 * then every plane deflated straight into the stream. Reading the symbols twice and sorting them
 * whole beats splitting bytes into planes: one store per symbol, and ~1 ns per plane byte to code.
 */
static PyObject *encode_stream(PyObject *self, PyObject *args) {
    Py_buffer symbols, contexts;
    int itemsize;
    Py_ssize_t block_symbols;
    if (!PyArg_ParseTuple(args, "y*iy*n", &symbols, &itemsize, &contexts, &block_symbols)) return NULL;
    PyObject *result = NULL;
    uint8_t *ordered = NULL;
    if (itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8) {
        PyErr_Format(PyExc_ValueError, "symbol width must be 1, 2, 4 or 8 bytes, got %d", itemsize);
        goto done;
    }
    if (block_symbols < 1 || block_symbols > MAX_BLOCK_SYMBOLS) {
        PyErr_Format(PyExc_ValueError, "blocks hold 1 to %d symbols, got %zd", MAX_BLOCK_SYMBOLS, block_symbols);
        goto done;
    }
    Py_ssize_t n = contexts.len;
    if (!check_same_length(symbols.len / itemsize, n)) goto done;
    const uint8_t *ctx = contexts.buf;
    const char *sym = symbols.buf;
    int64_t first[CONTEXTS], second[CONTEXTS], counts[CONTEXTS];
    int width[CONTEXTS], widest;
    Py_BEGIN_ALLOW_THREADS
    count_contexts(ctx, n / 2, first);
    count_contexts(ctx + n / 2, n - n / 2, second);
    widest = byte_width(or_all(sym, itemsize, n));
    Py_END_ALLOW_THREADS
    size_t bound = 0, stride = stride_of(widest);
    for (int c = 0; c < CONTEXTS; c++) {
        counts[c] = first[c] + second[c];
        if (counts[c]) bound += 1 + 4 * widest + widest * deflated_bound(counts[c], block_symbols);
    }
    ordered = malloc(n ? n * stride : 1);
    /* coded straight into the result, shrunk at the end: pages never written cost nothing */
    result = ordered ? PyBytes_FromStringAndSize(NULL, bound + 8) : PyErr_NoMemory();
    if (!result) goto done;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
    Py_BEGIN_ALLOW_THREADS
    sort_by_context(sym, itemsize, ctx, n, first, counts, stride, ordered);
    run_widths(ordered, stride, counts, width);
    uint16_t fixed_codes[LITERALS];
    uint8_t fixed_lengths[LITERALS];
    fixed_literal_code(fixed_codes, fixed_lengths);
    const uint16_t one = 1;
    int big_endian = *(const uint8_t *)&one == 0; /* then byte p of a symbol is at offset stride - 1 - p */
    const uint8_t *run = ordered;
    for (int c = 0; c < CONTEXTS; run += counts[c++] * stride) {
        if (!counts[c]) continue;
        uint8_t *lengths = out + 1;
        *out = (uint8_t)width[c];
        out += 1 + 4 * width[c];
        for (int p = 0; p < width[c]; p++) {
            const uint8_t *plane = run + (big_endian ? (int)stride - 1 - p : p);
            size_t length = deflate_plane(out, plane, counts[c], stride, block_symbols, fixed_codes, fixed_lengths);
            for (int b = 0; b < 4; b++) lengths[4 * p + b] = (uint8_t)(length >> (8 * b));
            out += length;
        }
    }
    Py_END_ALLOW_THREADS
    _PyBytes_Resize(&result, (Py_ssize_t)(out - (uint8_t *)PyBytes_AS_STRING(result)));
done:
    free(ordered);
    PyBuffer_Release(&symbols);
    PyBuffer_Release(&contexts);
    return result;
}

/* Collect each present context's plane pointers from a list of bytes (stream order), checking
 * that there are exactly as many planes as plane_counts says, each of counts[c] bytes. */
static int collect_planes(PyObject *plane_list, const int64_t *counts, const uint8_t *width, int max_width,
                          Py_ssize_t n, const uint8_t *plane_at[CONTEXTS][8]) {
    Py_ssize_t next = 0;
    int64_t total = 0;
    for (int c = 0; c < CONTEXTS; c++) {
        total += counts[c];
        if (!counts[c]) continue;
        if (width[c] > max_width) {
            PyErr_Format(PyExc_ValueError, "context %d has %d planes, symbols hold %d bytes", c, width[c], max_width);
            return 0;
        }
        for (int p = 0; p < width[c]; p++, next++) {
            PyObject *plane = next < PyList_GET_SIZE(plane_list) ? PyList_GET_ITEM(plane_list, next) : NULL;
            if (!plane || !PyBytes_Check(plane) || PyBytes_GET_SIZE(plane) != counts[c]) {
                PyErr_Format(PyExc_ValueError, "plane %zd is missing or not %lld bytes", next, (long long)counts[c]);
                return 0;
            }
            plane_at[c][p] = (const uint8_t *)PyBytes_AS_STRING(plane);
        }
    }
    if (total != n || next != PyList_GET_SIZE(plane_list)) {
        PyErr_Format(PyExc_ValueError, "%zd planes for %lld symbols given, %zd planes for %zd expected",
                     PyList_GET_SIZE(plane_list), (long long)total, next, n);
        return 0;
    }
    return 1;
}

static int check_counts(Py_buffer *counts, Py_buffer *plane_counts) {
    if (plane_counts->len != CONTEXTS || counts->len != CONTEXTS * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "counts and plane_counts must hold 256 entries");
        return 0;
    }
    return 1;
}

/* Reading symbols straight from their byte planes in element order, for the fused decoders:
 * element i takes the next symbol of its context's run. A symbol is assembled from a fixed
 * number of planes (the block's widest context, a constant per loop), narrower contexts reading
 * a zero byte for the planes they lack (index mask 0), so the loop has no branch on the data:
 * with a branch on each context's width it mispredicts, ~1.5x slower on float32 residuals.
 * (Cutting the block into stretches read side by side, to overlap the per-context cursor
 * updates, measured slower: twice the plane streams for the caches to follow.) */
typedef struct {
    const uint8_t *plane[CONTEXTS][8];
    int64_t mask[CONTEXTS][8];
    int64_t cursor[CONTEXTS];
    int max_width;
} symbol_reader;

static const uint8_t zero_byte = 0;

/* A reader of the planes for `items` elements of `contexts` (a new one, for free()); NULL with an
 * exception set when the buffers do not fit: the planes are checked (collect_planes), and the
 * contexts' histogram must be `counts`, so that no cursor leaves its run. */
static symbol_reader *open_reader(PyObject *plane_list, Py_buffer *count_buffer, Py_buffer *plane_counts, Py_buffer *contexts,
                                  Py_ssize_t items) {
    const uint8_t *plane_at[CONTEXTS][8];
    const int64_t *counts = count_buffer->buf;
    const uint8_t *width = plane_counts->buf, *ctx = contexts->buf;
    Py_ssize_t n = contexts->len;
    if (!check_counts(count_buffer, plane_counts) || !check_same_length(items, n) ||
        !collect_planes(plane_list, counts, width, 8, n, plane_at))
        return NULL;
    symbol_reader *reader = malloc(sizeof(symbol_reader));
    if (!reader) return (symbol_reader *)PyErr_NoMemory();
    reader->max_width = 0;
    for (int c = 0; c < CONTEXTS; c++) {
        int present = counts[c] ? width[c] : 0;
        if (present > reader->max_width) reader->max_width = present;
        for (int p = 0; p < 8; p++) {
            reader->plane[c][p] = p < present ? plane_at[c][p] : &zero_byte;
            reader->mask[c][p] = p < present ? -1 : 0;
        }
    }
    int64_t seen[CONTEXTS];
    Py_BEGIN_ALLOW_THREADS
    count_contexts(ctx, n, seen);
    Py_END_ALLOW_THREADS
    memset(reader->cursor, 0, sizeof(reader->cursor));
    if (memcmp(seen, counts, sizeof(seen))) {
        free(reader);
        PyErr_SetString(PyExc_ValueError, "the contexts' histogram is not the counts given");
        return NULL;
    }
    return reader;
}

static void release_planes_call(symbol_reader *reader, Py_buffer *target, Py_buffer *contexts, Py_buffer *count_buffer,
                                Py_buffer *plane_counts) {
    free(reader);
    PyBuffer_Release(target);
    PyBuffer_Release(contexts);
    PyBuffer_Release(count_buffer);
    PyBuffer_Release(plane_counts);
}

static inline uint64_t read_symbol(symbol_reader *reader, int c, int width) {
    int64_t k = reader->cursor[c]++;
    uint64_t symbol = 0;
    for (int p = 0; p < width; p++) symbol |= (uint64_t)reader->plane[c][p][k & reader->mask[c][p]] << (8 * p);
    return symbol;
}

/* Run BODY (which reads `i` and `symbol`) for every element, symbols read WIDTH planes wide. */
#define EACH_SYMBOL_OF_WIDTH(WIDTH, BODY)                                                        \
    for (Py_ssize_t i = 0; i < n; i++) {                                                         \
        uint64_t symbol = read_symbol(reader, ctx[i], WIDTH);                                    \
        BODY                                                                                     \
    }

#define EACH_SYMBOL(BODY)                                                                        \
    switch (reader->max_width) {                                                                 \
    case 0: EACH_SYMBOL_OF_WIDTH(0, BODY) break;                                                 \
    case 1: EACH_SYMBOL_OF_WIDTH(1, BODY) break;                                                 \
    case 2: EACH_SYMBOL_OF_WIDTH(2, BODY) break;                                                 \
    case 3: EACH_SYMBOL_OF_WIDTH(3, BODY) break;                                                 \
    case 4: EACH_SYMBOL_OF_WIDTH(4, BODY) break;                                                 \
    default: EACH_SYMBOL_OF_WIDTH(8, BODY) break;                                                \
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
    if (!check_counts(&count_buffer, &plane_counts)) goto done;
    if (itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8) {
        PyErr_Format(PyExc_ValueError, "symbol width must be 1, 2, 4 or 8 bytes, got %d", itemsize);
        goto done;
    }
    if (!check_same_length(out.len / itemsize, n)) goto done;
    if (!collect_planes(plane_list, counts, width, itemsize, n, plane_at)) goto done;
    for (int c = 0; c < CONTEXTS; c++) first[c] = c ? first[c - 1] + counts[c - 1] : 0;
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


/* ---- Fused block decoding (progressive.py, docs/format.md "The ladder", "Lossless residual") ----
 *
 * Why: decoding a block through numpy/torch makes a dozen full passes (unpack, contexts,
 * argsort-free join, scatter, refine, dequantize, cast, contexts, join, restore), each
 * allocating a temporary. These functions fuse them into three passes over the block
 * (codes, one per refinement stage, reconstruction with the lossless contexts, restore),
 * reading each symbol straight from its inflated byte planes. Inflating stays in Python
 * (zlib or ISA-L, bounded), between the passes, because a stage's plane sizes are the
 * histogram of contexts that only the previous pass knows. The arithmetic is the one the
 * torch path does, operation by operation (float32, round-to-nearest-even casts), so the
 * tensors are the same bits; tests/test_native_codec.py checks it. */

/* unpack_codes(packed, bits, out) -> None: signed int32 codes from ladder.pack's bit stream
 * (code i in stream bits [i*bits, (i+1)*bits), stored as v + 2**(bits-1)); out holds len(packed)*8/bits. */
static PyObject *unpack_codes(PyObject *self, PyObject *args) {
    Py_buffer packed, out;
    int bits;
    if (!PyArg_ParseTuple(args, "y*iw*", &packed, &bits, &out)) return NULL;
    PyObject *result = NULL;
    if (bits < 1 || bits > 8) {
        PyErr_Format(PyExc_ValueError, "code width must be 1 to 8 bits, got %d", bits);
        goto done;
    }
    Py_ssize_t n = out.len / 4;
    if (!check_same_length(packed.len * 8 / bits, n) || packed.len * 8 % bits) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "packed codes are not whole codes");
        goto done;
    }
    const uint8_t *in = packed.buf;
    int32_t *codes = out.buf;
    Py_BEGIN_ALLOW_THREADS
    const uint32_t mask = (1u << bits) - 1, zero = 1u << (bits - 1);
    if (bits == 4) {
        for (Py_ssize_t j = 0; j < n / 2; j++) {
            codes[2 * j] = (int32_t)(in[j] & 15) - 8;
            codes[2 * j + 1] = (int32_t)(in[j] >> 4) - 8;
        }
    } else if (bits == 8) {
        for (Py_ssize_t i = 0; i < n; i++) codes[i] = (int32_t)in[i] - 128;
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t bit = i * bits, byte = bit >> 3;
            uint32_t window = in[byte] | (byte + 1 < packed.len ? (uint32_t)in[byte + 1] << 8 : 0);
            codes[i] = (int32_t)((window >> (bit & 7)) & mask) - (int32_t)zero;
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&packed);
    PyBuffer_Release(&out);
    return result;
}

/* refinement_contexts(codes, bits, out) -> counts: progressive._refinement_contexts of int32 coarse
 * codes of width `bits` into uint8 out, and their histogram (256 native int64). */
static PyObject *refinement_contexts(PyObject *self, PyObject *args) {
    Py_buffer codes, out;
    int bits;
    if (!PyArg_ParseTuple(args, "y*iw*", &codes, &bits, &out)) return NULL;
    PyObject *result = NULL;
    int64_t counts[CONTEXTS];
    Py_ssize_t n = out.len;
    if (bits < 1 || bits > 16) {
        PyErr_Format(PyExc_ValueError, "code width must be 1 to 16 bits, got %d", bits);
        goto done;
    }
    if (!check_same_length(codes.len / 4, n)) goto done;
    const int32_t *v = codes.buf;
    uint8_t *c = out.buf;
    Py_BEGIN_ALLOW_THREADS
    if (bits <= 8) {
        const int32_t zero = 1 << (bits - 1), top = (1 << bits) - 1;
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t context = (int64_t)v[i] + zero;
            c[i] = (uint8_t)(context < 0 ? 0 : context > top ? top : context);
        }
    } else { /* the magnitude class: frexp(float32(|v| folded) + 1).exponent, from the float's bits */
        for (Py_ssize_t i = 0; i < n; i++) {
            int32_t magnitude = v[i] < 0 ? -(v[i] + 1) : v[i];
            float value = (float)magnitude + 1.0f;
            uint32_t pattern;
            memcpy(&pattern, &value, 4);
            c[i] = (uint8_t)(((pattern >> 23) & 0xFF) - 126);
        }
    }
    count_contexts(c, n, counts);
    Py_END_ALLOW_THREADS
    result = PyBytes_FromStringAndSize((const char *)counts, sizeof(counts));
done:
    PyBuffer_Release(&codes);
    PyBuffer_Release(&out);
    return result;
}

/* refine(codes, contexts, counts, plane_counts, planes, from_bits, to_bits) -> None
 *
 * In place, ladder.refine of int32 coarse codes by the refinements the planes hold (grouped by
 * contexts, in element order within each context, as join_planes reads them): the symbol is
 * cast to int32 (as the torch path does), and the fine code is (coarse << k) + d, with d
 * folded back below the bottom bin of the coarse grid. */
static PyObject *refine(PyObject *self, PyObject *args) {
    PyObject *plane_list;
    Py_buffer codes, contexts, count_buffer, plane_counts;
    int from_bits, to_bits;
    if (!PyArg_ParseTuple(args, "w*y*y*y*O!ii", &codes, &contexts, &count_buffer, &plane_counts, &PyList_Type, &plane_list,
                          &from_bits, &to_bits))
        return NULL;
    PyObject *result = NULL;
    symbol_reader *reader = NULL;
    Py_ssize_t n = contexts.len;
    const uint8_t *ctx = contexts.buf;
    if (from_bits < 1 || to_bits <= from_bits || to_bits > 16) {
        PyErr_Format(PyExc_ValueError, "cannot refine %d-bit codes to %d bits", from_bits, to_bits);
        goto done;
    }
    if (!(reader = open_reader(plane_list, &count_buffer, &plane_counts, &contexts, codes.len / 4))) goto done;
    int32_t *v = codes.buf;
    const int step = to_bits - from_bits;
    const int32_t span = 1 << step, bottom = -(1 << (from_bits - 1));
    Py_BEGIN_ALLOW_THREADS
    EACH_SYMBOL({
        int32_t d = (int32_t)(uint32_t)symbol;
        if (d >= span && v[i] == bottom) d = (int32_t)((uint32_t)span - 1u - (uint32_t)d);
        v[i] = (int32_t)(((uint32_t)v[i] << step) + (uint32_t)d);
    })
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    release_planes_call(reader, &codes, &contexts, &count_buffer, &plane_counts);
    return result;
}

static inline float float_of(uint32_t pattern) {
    float value;
    memcpy(&value, &pattern, 4);
    return value;
}

static inline uint32_t pattern_of(float value) {
    uint32_t pattern;
    memcpy(&pattern, &value, 4);
    return pattern;
}

/* IEEE binary16 -> binary32 (exact). */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    if (exponent == 0x1F) return float_of(sign | 0x7F800000 | (mantissa << 13));
    if (exponent) return float_of(sign | ((exponent + 112) << 23) | (mantissa << 13));
    float magnitude = (float)mantissa * (1.0f / 16777216.0f); /* subnormal: mantissa * 2**-24, exact */
    return sign ? -magnitude : magnitude;
}

/* binary32 -> binary16, round to nearest even, overflow to infinity (finite inputs). */
static uint16_t float_to_half(uint32_t x) {
    uint32_t sign = (x >> 16) & 0x8000, magnitude = x & 0x7FFFFFFF;
    if (magnitude >= 0x477FF000) return (uint16_t)(sign | 0x7C00); /* >= 65520: rounds past 65504 */
    if (magnitude >= 0x38800000) { /* normal half */
        uint32_t rounded = magnitude + 0xFFF + ((magnitude >> 13) & 1);
        return (uint16_t)(sign | ((rounded - 0x38000000) >> 13));
    }
    if (magnitude <= 0x33000000) return (uint16_t)sign; /* <= 2**-25: rounds to zero */
    uint32_t exponent = magnitude >> 23, mantissa = (magnitude & 0x7FFFFF) | 0x800000;
    int shift = 126 - (int)exponent; /* 14..24: units of 2**-24 */
    uint32_t quotient = mantissa >> shift, rest = mantissa & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (quotient & 1))) quotient++;
    return (uint16_t)(sign | quotient);
}

/* binary32 -> bfloat16, round to nearest even (finite inputs). */
static inline uint16_t float_to_bfloat(uint32_t x) { return (uint16_t)((x + 0x7FFF + ((x >> 16) & 1)) >> 16); }

enum { FLOAT32 = 0, BFLOAT16 = 1, FLOAT16 = 2 };

/* reconstruct(codes, scales, offsets, base_bits, bits, top_bits, group_size, dtype, out, contexts) -> counts or None
 *
 * out[i] = cast((float32(v_i - o_g * 2**(bits-b)) + 0.5) * s_g * 2**(b-bits)) for the first len(out)
 * codes (ladder.dequantize, then the cast to the source dtype: 0 float32, 1 bfloat16, 2 float16,
 * written as bit patterns). scales: float16 bit patterns, offsets: int32, one per group; scales
 * must be finite (the caller checks). When `contexts` is a writable buffer (not None), it also
 * gets lossless.contexts of out against the top level's step s_g * 2**(b-top_bits), clamped to
 * [CONTEXT_MIN, CONTEXT_MAX] given as `low`/`high`, and the call returns their histogram. */
static PyObject *reconstruct(PyObject *self, PyObject *args) {
    Py_buffer codes, scales, offsets, out;
    PyObject *context_object;
    int base_bits, bits, top_bits, group_size, dtype, low, high;
    if (!PyArg_ParseTuple(args, "y*y*y*iiiiiw*Oii", &codes, &scales, &offsets, &base_bits, &bits, &top_bits, &group_size, &dtype,
                          &out, &context_object, &low, &high))
        return NULL;
    PyObject *result = NULL;
    Py_buffer contexts = {0};
    int have_contexts = 0;
    int64_t counts[CONTEXTS];
    int width = dtype == FLOAT32 ? 4 : 2;
    Py_ssize_t n = out.len / width;
    if (dtype < FLOAT32 || dtype > FLOAT16 || base_bits < 1 || bits < base_bits || top_bits < bits || top_bits > 16 ||
        group_size <= 0) {
        PyErr_SetString(PyExc_ValueError, "unsupported dtype, widths or group size");
        goto done;
    }
    Py_ssize_t groups = scales.len / 2;
    if (!check_same_length(offsets.len / 4, groups)) goto done;
    if (n > codes.len / 4 || n > groups * (Py_ssize_t)group_size) {
        PyErr_Format(PyExc_ValueError, "%zd outputs, %zd codes and %zd groups given", n, codes.len / 4, groups);
        goto done;
    }
    if (context_object != Py_None) {
        if (PyObject_GetBuffer(context_object, &contexts, PyBUF_WRITABLE) < 0) goto done;
        have_contexts = 1;
        if (!check_same_length(contexts.len, n)) goto done;
    }
    const int32_t *v = codes.buf;
    const uint16_t *s = scales.buf;
    const int32_t *o = offsets.buf;
    uint8_t *ctx = have_contexts ? contexts.buf : NULL;
    const float level = float_of((uint32_t)(127 + base_bits - bits) << 23), top_level = float_of((uint32_t)(127 + base_bits - top_bits) << 23);
    Py_BEGIN_ALLOW_THREADS
    /* One loop per output type and with/without contexts, with the group's constants hoisted,
     * so each inner loop is straight-line code the compiler can vectorise. */
#define RECONSTRUCT(T, CAST, MANTISSA, BIAS, FIELD, WITH_CONTEXTS)                                    \
    for (Py_ssize_t start = 0, g = 0; start < n; start += group_size, g++) {                         \
        const float scale = half_to_float(s[g]), step = scale * level;                               \
        const uint32_t offset = (uint32_t)o[g] << (bits - base_bits);                                \
        const int floor_ = low + (int)((pattern_of(scale * top_level) >> 23) & 0xFF) - 127 + (BIAS); \
        Py_ssize_t stop = start + group_size < n ? start + group_size : n;                           \
        T *x = (T *)out.buf;                                                                         \
        for (Py_ssize_t i = start; i < stop; i++) {                                                  \
            float value = (float)(int32_t)((uint32_t)v[i] - offset) + 0.5f;                         \
            value = value * step;                                                                    \
            uint32_t stored = CAST(pattern_of(value));                                               \
            x[i] = (T)stored;                                                                        \
            if (WITH_CONTEXTS) {                                                                     \
                int relative = (int)((stored >> (MANTISSA)) & (FIELD)) - floor_;                     \
                ctx[i] = (uint8_t)(relative < 0 ? 0 : relative > high - low ? high - low : relative); \
            }                                                                                        \
        }                                                                                            \
    }
#define RECONSTRUCT_TYPE(T, CAST, MANTISSA, BIAS, FIELD)                                              \
    if (ctx) RECONSTRUCT(T, CAST, MANTISSA, BIAS, FIELD, 1) else RECONSTRUCT(T, CAST, MANTISSA, BIAS, FIELD, 0)
    if (dtype == FLOAT32) RECONSTRUCT_TYPE(uint32_t, (uint32_t), 23, 127, 0xFF)
    else if (dtype == BFLOAT16) RECONSTRUCT_TYPE(uint16_t, float_to_bfloat, 7, 127, 0xFF)
    else RECONSTRUCT_TYPE(uint16_t, float_to_half, 10, 15, 0x1F)
#undef RECONSTRUCT_TYPE
#undef RECONSTRUCT
    if (ctx) count_contexts(ctx, n, counts);
    Py_END_ALLOW_THREADS
    if (have_contexts)
        result = PyBytes_FromStringAndSize((const char *)counts, sizeof(counts));
    else {
        result = Py_None;
        Py_INCREF(result);
    }
done:
    if (have_contexts) PyBuffer_Release(&contexts);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&out);
    return result;
}

/* restore_planes(values, contexts, counts, plane_counts, planes, width) -> None
 *
 * In place: the float bit patterns `values` (width 2 or 4 bytes, the reconstruction) become the
 * originals, each adding the zigzag residual its planes hold (restore of join_planes, fused). */
static PyObject *restore_planes(PyObject *self, PyObject *args) {
    PyObject *plane_list;
    Py_buffer values, contexts, count_buffer, plane_counts;
    int width;
    if (!PyArg_ParseTuple(args, "w*y*y*y*O!i", &values, &contexts, &count_buffer, &plane_counts, &PyList_Type, &plane_list, &width))
        return NULL;
    PyObject *result = NULL;
    symbol_reader *reader = NULL;
    Py_ssize_t n = contexts.len;
    const uint8_t *ctx = contexts.buf;
    if (width != 2 && width != 4) {
        PyErr_Format(PyExc_ValueError, "float width must be 2 or 4 bytes, got %d", width);
        goto done;
    }
    if (!(reader = open_reader(plane_list, &count_buffer, &plane_counts, &contexts, values.len / width))) goto done;
    Py_BEGIN_ALLOW_THREADS
    if (width == 2) {
        int16_t *x = values.buf;
        EACH_SYMBOL({
            int64_t d = (int64_t)(symbol >> 1) ^ -(int64_t)(symbol & 1);
            int16_t bits = (int16_t)(uint16_t)(uint64_t)(ordered16(x[i]) + d);
            x[i] = bits < 0 ? (int16_t)(bits ^ 0x7FFF) : bits;
        })
    } else {
        int32_t *x = values.buf;
        EACH_SYMBOL({
            int64_t d = (int64_t)(symbol >> 1) ^ -(int64_t)(symbol & 1);
            int32_t bits = (int32_t)(uint32_t)(uint64_t)(ordered32(x[i]) + d);
            x[i] = bits < 0 ? (int32_t)(bits ^ 0x7FFFFFFF) : bits;
        })
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    release_planes_call(reader, &values, &contexts, &count_buffer, &plane_counts);
    return result;
}

/* Candidate base grids tried per group: at most this many (ladder.CLIP_RATIOS gives 23). */
#define MAX_GRIDS 32
/* Grids whose sums stay in registers while a group's weights stream past: two 4-lane vectors. */
#define GRIDS_AT_ONCE 8

/* grid_errors(groups, group_size, steps, offsets, bits, out) -> None
 *
 * ladder._grid_errors: for every candidate grid c and group g, the squared error of quantizing the
 * group's float32 weights at `bits` on the grid (step steps[c, g], integer offset offsets[c, g]), into
 * float32 out[c, g]. Per weight, in float32 with every operation rounded on its own:
 * r = o + w * (1 / s), code = floor(clamp(r, -2**(bits-1), 2**(bits-1) - 1)), d = (code + 0.5) - r;
 * the d * d are summed in weight order and the sum times s * s is the error. A zero step reconstructs
 * 0: its error is the sum of w * w, in weight order. The numpy path does the same operations in the
 * same order, so both pick the same grids. The candidates are the inner loop (independent sums,
 * each still in weight order): it vectorises without reordering any sum. */
static PyObject *grid_errors(PyObject *self, PyObject *args) {
    Py_buffer groups, steps, offsets, out;
    int group_size, bits;
    if (!PyArg_ParseTuple(args, "y*iy*y*iw*", &groups, &group_size, &steps, &offsets, &bits, &out)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = groups.len / 4, group_count = group_size > 0 ? n / group_size : 0;
    Py_ssize_t grids = group_count ? steps.len / 4 / group_count : 0;
    if (group_size <= 0 || bits < 1 || bits > 8 || group_count * group_size != n) {
        PyErr_Format(PyExc_ValueError, "%zd weights do not make groups of %d at %d bits", n, group_size, bits);
        goto done;
    }
    if (grids < 1 || grids > MAX_GRIDS || grids * group_count * 4 != steps.len || steps.len != offsets.len || steps.len != out.len) {
        PyErr_Format(PyExc_ValueError, "steps, offsets and out must hold 1 to %d grids of %zd groups", MAX_GRIDS, group_count);
        goto done;
    }
    const float *w = groups.buf, *s = steps.buf;
    const int32_t *o = offsets.buf;
    float *error = out.buf;
    const float low = -(float)(1 << (bits - 1)), high = (float)((1 << (bits - 1)) - 1);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t g = 0; g < group_count; g++) {
        const float *x = w + g * group_size;
        float squares = 0.0f;
        for (int i = 0; i < group_size; i++) squares += x[i] * x[i];
        for (Py_ssize_t first = 0; first < grids; first += GRIDS_AT_ONCE) {
            float inverse[GRIDS_AT_ONCE], offset[GRIDS_AT_ONCE], sum[GRIDS_AT_ONCE] = {0};
            for (int c = 0; c < GRIDS_AT_ONCE; c++) {
                float step = first + c < grids ? s[(first + c) * group_count + g] : 0.0f;
                inverse[c] = step > 0.0f ? 1.0f / step : 0.0f;
                offset[c] = first + c < grids ? (float)o[(first + c) * group_count + g] : 0.0f;
            }
            for (int i = 0; i < group_size; i++) {
                const float weight = x[i];
                for (int c = 0; c < GRIDS_AT_ONCE; c++) {
                    float r = offset[c] + weight * inverse[c];
                    float t = r < low ? low : r > high ? high : r;
                    float truncated = (float)(int32_t)t;
                    float code = truncated > t ? truncated - 1.0f : truncated;
                    float d = (code + 0.5f) - r;
                    sum[c] += d * d;
                }
            }
            for (Py_ssize_t c = first; c < grids && c < first + GRIDS_AT_ONCE; c++) {
                float step = s[c * group_count + g];
                error[c * group_count + g] = step > 0.0f ? sum[c - first] * (step * step) : squares;
            }
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&groups);
    PyBuffer_Release(&steps);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"histogram", histogram, METH_VARARGS, "Counts of each uint8 context: bytes of 256 native int64."},
    {"join_planes", join_planes, METH_VARARGS, "Inverse of split_planes, into a uint64 buffer."},
    {"residual", residual, METH_VARARGS, "Zigzag-coded ordered-integer residual of float bit patterns."},
    {"restore", restore, METH_VARARGS, "Inverse of residual: the original float bit patterns."},
    {"contexts", contexts, METH_VARARGS, "Lossless coding context: relative exponent of reconstruction and step, clamped."},
    {"unpack_codes", unpack_codes, METH_VARARGS, "Signed int32 codes from ladder.pack's bit stream."},
    {"refinement_contexts", refinement_contexts, METH_VARARGS, "Refinement contexts of coarse codes, and their histogram."},
    {"refine", refine, METH_VARARGS, "Raise coarse codes in place by the refinements their byte planes hold."},
    {"reconstruct", reconstruct, METH_VARARGS, "Dequantize codes to the source dtype, optionally with lossless contexts."},
    {"grid_errors", grid_errors, METH_VARARGS, "Squared error of each group's weights on each candidate base grid."},
    {"restore_planes", restore_planes, METH_VARARGS, "Add the residuals their byte planes hold to float bit patterns, in place."},
    {"encode_stream", encode_stream, METH_VARARGS, "Group symbols by context into byte planes, each coded as Huffman-only raw DEFLATE."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "Native loops of the p2u codec.", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
