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
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CONTEXTS 256

/* Loops the compiler vectorises also get an AVX2 version, picked when the module loads (GCC's and
 * Clang's target_clones, an ifunc: x86-64 Linux with glibc); elsewhere only the baseline SSE2 one.
 * The same operations either way (no fused multiply-add: the build passes -ffp-contract=off), so
 * the same bits; the AVX2 dequantize loop is ~1.9x faster. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#define HAVE_AVX2_CLONES 1
#endif
#endif
#ifndef VECTOR_CLONES
#define VECTOR_CLONES
#endif

/* Contexts counted per table stretch: 32-bit counters cannot overflow. */
#define COUNT_STRETCH ((Py_ssize_t)1 << 30)

/* Eight interleaved tables: runs of one context would otherwise serialise on one counter (eight
 * count a third faster than four on lossless contexts); 32-bit counters, half the cache lines. */
static void count_contexts(const uint8_t *contexts, Py_ssize_t n, int64_t *counts) {
    memset(counts, 0, CONTEXTS * sizeof(int64_t));
    for (Py_ssize_t start = 0; start < n; start += COUNT_STRETCH) {
        uint32_t partial[8][CONTEXTS] = {{0}};
        const uint8_t *x = contexts + start;
        Py_ssize_t m = n - start < COUNT_STRETCH ? n - start : COUNT_STRETCH, i = 0;
        for (; i + 8 <= m; i += 8)
            for (int t = 0; t < 8; t++) partial[t][x[i + t]]++;
        for (; i < m; i++) partial[0][x[i]]++;
        for (int t = 0; t < 8; t++)
            for (int c = 0; c < CONTEXTS; c++) counts[c] += partial[t][c];
    }
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

/* A stored block's bytes: out[i] = data[i * stride]. One loop per symbol width, so each has a constant
 * stride the compiler vectorises (a byte at a time, the wide residuals' near-uniform low planes, which are
 * mostly stored, took a seventh of encode_stream). */
VECTOR_CLONES static void stored_bytes(uint8_t *out, const uint8_t *data, Py_ssize_t n, Py_ssize_t stride) {
    switch (stride) {
    case 1: memcpy(out, data, (size_t)n); break;
    case 2: for (Py_ssize_t i = 0; i < n; i++) out[i] = data[2 * i]; break;
    case 4: for (Py_ssize_t i = 0; i < n; i++) out[i] = data[4 * i]; break;
    default: for (Py_ssize_t i = 0; i < n; i++) out[i] = data[8 * i]; break;
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
        stored_bytes(w->out, data, n, stride);
        w->out += n;
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

/* The code lengths of the fixed literal/length code (RFC 1951 3.2.6), all FIXED_LITERALS of them. */
static void fixed_code_lengths(uint8_t *lengths) {
    for (int s = 0; s < FIXED_LITERALS; s++) lengths[s] = s < 144 ? 8 : s < 256 ? 9 : s < 280 ? 7 : 8;
}

/* The fixed literal code for the 256 bytes and end-of-block, bit-reversed. */
static void fixed_literal_code(uint16_t *codes, uint8_t *lengths) {
    uint8_t all_lengths[FIXED_LITERALS];
    uint16_t all_codes[FIXED_LITERALS];
    fixed_code_lengths(all_lengths);
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

/* How many bytes of a context's top plane a packed byte holds, as a power of two (entropy.py, "packing"):
 * 3 (eight 1-bit fields) when every byte of the plane is below 2, 2 below 4, 1 below 16, else 0. */
static int packing_of(uint64_t top) { return top < 2 ? 3 : top < 4 ? 2 : top < 16 ? 1 : 0; }

/* Each context's plane count (the byte width of the OR of its run in `ordered`) and its top plane's packing. */
#define RUN_WIDTHS(T)                                                                            \
    {                                                                                            \
        const T *run_ = (const T *)ordered;                                                      \
        for (int c = 0; c < CONTEXTS; run_ += counts[c++]) {                                     \
            T all_ = 0;                                                                          \
            for (int64_t k = 0; k < counts[c]; k++) all_ |= run_[k];                             \
            width[c] = byte_width(all_);                                                         \
            packing[c] = width[c] ? packing_of((uint64_t)all_ >> (8 * (width[c] - 1))) : 0;       \
        }                                                                                        \
    }

static void run_widths(const uint8_t *ordered, int stride, const int64_t *counts, int *width, int *packing) {
    switch (stride) {
    case 1: RUN_WIDTHS(uint8_t) break;
    case 2: RUN_WIDTHS(uint16_t) break;
    case 4: RUN_WIDTHS(uint32_t) break;
    default: RUN_WIDTHS(uint64_t) break;
    }
}

/* Bytes of a plane of n bytes packed 2**packing to a byte. */
static Py_ssize_t packed_size(Py_ssize_t n, int packing) { return (n + (1 << packing) - 1) >> packing; }

/* Pack a plane of n bytes (byte i at data[i * stride], each below 2**(8 >> packing)) 2**packing to a byte:
 * byte i at bit (i mod 2**packing) * (8 >> packing) of packed byte i >> packing, the last one's unused bits 0.
 * Whole bytes first with the field count a constant (unrolled, as unpack_symbols), then the last one. */
static void pack_symbols(uint8_t *out, const uint8_t *data, Py_ssize_t n, Py_ssize_t stride, int packing) {
    const int per_byte = 1 << packing, bits = 8 >> packing;
#define PACK_WHOLE(PER_BYTE, BITS)                                                                   \
    for (Py_ssize_t k = 0; k < n / (PER_BYTE); k++) {                                               \
        uint8_t byte = 0;                                                                           \
        for (int f = 0; f < (PER_BYTE); f++) byte |= (uint8_t)(data[(k * (PER_BYTE) + f) * stride] << (f * (BITS))); \
        out[k] = byte;                                                                              \
    }
    switch (packing) {
    case 1: PACK_WHOLE(2, 4) break;
    case 2: PACK_WHOLE(4, 2) break;
    default: PACK_WHOLE(8, 1) break;
    }
#undef PACK_WHOLE
    if (n % per_byte) {
        uint8_t byte = 0;
        for (Py_ssize_t i = n / per_byte * per_byte; i < n; i++) byte |= (uint8_t)(data[i * stride] << ((i & (per_byte - 1)) * bits));
        out[n >> packing] = byte;
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
    uint8_t *ordered = NULL, *packed = NULL;
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
    int width[CONTEXTS], packing[CONTEXTS], widest;
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
    packed = malloc(n ? (size_t)packed_size(n, 1) : 1); /* a packed plane: at most half a byte per byte */
    /* coded straight into the result, shrunk at the end: pages never written cost nothing */
    result = ordered && packed ? PyBytes_FromStringAndSize(NULL, bound + 8) : PyErr_NoMemory();
    if (!result) goto done;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
    Py_BEGIN_ALLOW_THREADS
    sort_by_context(sym, itemsize, ctx, n, first, counts, stride, ordered);
    run_widths(ordered, stride, counts, width, packing);
    uint16_t fixed_codes[LITERALS];
    uint8_t fixed_lengths[LITERALS];
    fixed_literal_code(fixed_codes, fixed_lengths);
    const uint16_t one = 1;
    int big_endian = *(const uint8_t *)&one == 0; /* then byte p of a symbol is at offset stride - 1 - p */
    const uint8_t *run = ordered;
    for (int c = 0; c < CONTEXTS; run += counts[c++] * stride) {
        if (!counts[c]) continue;
        uint8_t *lengths = out + 1;
        *out = (uint8_t)(width[c] | packing[c] << 4);
        out += 1 + 4 * width[c];
        for (int p = 0; p < width[c]; p++) {
            const uint8_t *plane = run + (big_endian ? (int)stride - 1 - p : p);
            size_t length;
            if (packing[c] && p == width[c] - 1) {
                pack_symbols(packed, plane, counts[c], stride, packing[c]);
                length = deflate_plane(out, packed, packed_size(counts[c], packing[c]), 1, block_symbols, fixed_codes, fixed_lengths);
            } else {
                length = deflate_plane(out, plane, counts[c], stride, block_symbols, fixed_codes, fixed_lengths);
            }
            for (int b = 0; b < 4; b++) lengths[4 * p + b] = (uint8_t)(length >> (8 * b));
            out += length;
        }
    }
    Py_END_ALLOW_THREADS
    _PyBytes_Resize(&result, (Py_ssize_t)(out - (uint8_t *)PyBytes_AS_STRING(result)));
done:
    free(ordered);
    free(packed);
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

/* Assemble each context's symbols from its planes into one run of `itemsize`-byte integers in
 * `runs` (runs in context order, `first` their starts): sequential passes the compiler vectorises. */
VECTOR_CLONES static void assemble_runs(void *runs, int itemsize, const int64_t *counts, const int64_t *first, const uint8_t *width,
                          const uint8_t *plane_at[CONTEXTS][8]) {
#define ASSEMBLE(T)                                                                              \
    for (int c = 0; c < CONTEXTS; c++) {                                                         \
        T *run = (T *)runs + first[c];                                                           \
        const int64_t count = counts[c];                                                         \
        if (!count) continue;                                                                    \
        if (!width[c]) memset(run, 0, count * sizeof(T));                                        \
        else if (sizeof(T) == 1) memcpy(run, plane_at[c][0], count);                             \
        else {                                                                                   \
            const uint8_t *low = plane_at[c][0];                                                 \
            for (int64_t k = 0; k < count; k++) run[k] = low[k];                                 \
        }                                                                                        \
        for (int p = 1; p < width[c]; p++) {                                                     \
            const uint8_t *plane = plane_at[c][p];                                               \
            for (int64_t k = 0; k < count; k++) run[k] |= (T)((T)plane[k] << (8 * p));           \
        }                                                                                        \
    }
    switch (itemsize) {
    case 1: ASSEMBLE(uint8_t) break;
    case 2: ASSEMBLE(uint16_t) break;
    case 4: ASSEMBLE(uint32_t) break;
    default: ASSEMBLE(uint64_t) break;
    }
#undef ASSEMBLE
}

/* Symbols gathered at a time: a stretch that stays in the L1 cache. */
#define SYMBOL_CHUNK 2048

/* Reading symbols in element order, for the fused decoders: element i takes the next symbol of
 * its context's run, through a pointer per context bumped per symbol. Each context's planes are
 * first assembled into a run of 1-, 2-, 4- or 8-byte integers (the block's widest context
 * decides, a constant per loop): one load per symbol instead of one per plane with a mask for the
 * planes a narrower context lacks, and no branch on the data (with a branch on each context's
 * width it mispredicts, ~1.5x slower). (Cutting the block into stretches read side by side, to
 * overlap the per-context updates, measured slower: twice the streams for the caches to follow.)
 *
 * Untrusted contexts: the runs lie end to end in one store followed by SYMBOL_CHUNK symbols of
 * slack, and gather checks after each chunk that no pointer passed its run's end; a pointer can
 * pass it by at most one chunk, so every read stays in the store. reader_done then checks that
 * every run was read to its end: the contexts' histogram was the counts. This replaces counting
 * the contexts before the loop, which took a third of restore_planes's time. */
typedef struct {
    const char *next[CONTEXTS], *end[CONTEXTS];
    int itemsize; /* bytes per symbol in the runs: 1, 2, 4 or 8 */
    char *store;
} symbol_reader;

static const char *const contexts_mismatch = "the contexts' histogram is not the counts given";

/* A reader of the planes for `n` symbols (a new one, for close_reader()); NULL with an exception
 * set when the planes do not fit the counts (collect_planes). */
static symbol_reader *reader_of(PyObject *plane_list, Py_buffer *count_buffer, Py_buffer *plane_counts, Py_ssize_t n) {
    const uint8_t *plane_at[CONTEXTS][8];
    const int64_t *counts = count_buffer->buf;
    const uint8_t *width = plane_counts->buf;
    if (!check_counts(count_buffer, plane_counts) || !collect_planes(plane_list, counts, width, 8, n, plane_at)) return NULL;
    int max_width = 0;
    int64_t first[CONTEXTS];
    for (int c = 0; c < CONTEXTS; c++) {
        if (counts[c] && width[c] > max_width) max_width = width[c];
        first[c] = c ? first[c - 1] + counts[c - 1] : 0;
    }
    int itemsize = max_width <= 1 ? 1 : max_width <= 2 ? 2 : max_width <= 4 ? 4 : 8;
    symbol_reader *reader = malloc(sizeof(symbol_reader));
    char *store = malloc((n + SYMBOL_CHUNK) * itemsize);
    if (!reader || !store) {
        free(reader);
        free(store);
        return (symbol_reader *)PyErr_NoMemory();
    }
    reader->itemsize = itemsize;
    reader->store = store;
    for (int c = 0; c < CONTEXTS; c++) {
        reader->next[c] = store + first[c] * itemsize;
        reader->end[c] = reader->next[c] + counts[c] * itemsize;
    }
    Py_BEGIN_ALLOW_THREADS
    assemble_runs(store, itemsize, counts, first, width, plane_at);
    memset(store + n * itemsize, 0, SYMBOL_CHUNK * itemsize);
    Py_END_ALLOW_THREADS
    return reader;
}

/* Whether no context's pointer has passed the end of its run. */
static int reader_in_bounds(const symbol_reader *reader) {
    ptrdiff_t left = 0; /* negative when a pointer passed its end: an OR of differences vectorises */
    for (int c = 0; c < CONTEXTS; c++) left |= reader->end[c] - reader->next[c];
    return left >= 0;
}

/* After the last symbol (or the chunk that did not fit): 1 when every read stayed in its run (`fits`) and every
 * run was read to its end, else 0 with an exception set. */
static int reader_done(const symbol_reader *reader, int fits) {
    if (!fits) {
        PyErr_SetString(PyExc_ValueError, contexts_mismatch);
        return 0;
    }
    for (int c = 0; c < CONTEXTS; c++)
        if (reader->next[c] != reader->end[c]) {
            PyErr_SetString(PyExc_ValueError, contexts_mismatch);
            return 0;
        }
    return 1;
}

static void close_reader(symbol_reader *reader) {
    if (reader) free(reader->store);
    free(reader);
}

static void release_planes_call(symbol_reader *reader, Py_buffer *target, Py_buffer *contexts, Py_buffer *count_buffer,
                                Py_buffer *plane_counts) {
    close_reader(reader);
    PyBuffer_Release(target);
    PyBuffer_Release(contexts);
    PyBuffer_Release(count_buffer);
    PyBuffer_Release(plane_counts);
}

/* The next symbol of context c, from runs of `itemsize` bytes (a constant in each loop). */
static inline uint64_t read_symbol(symbol_reader *reader, int c, int itemsize) {
#define BUMP(T)                                                                                  \
    {                                                                                            \
        const T *at = (const T *)reader->next[c];                                                \
        reader->next[c] = (const char *)(at + 1);                                                \
        return *at;                                                                              \
    }
    switch (itemsize) {
    case 1: BUMP(uint8_t)
    case 2: BUMP(uint16_t)
    case 4: BUMP(uint32_t)
    default: BUMP(uint64_t)
    }
#undef BUMP
}

/* The next symbols of the contexts ctx[0..count) (count <= SYMBOL_CHUNK), in element order, into
 * out; 0 when a pointer passed its run's end (out is then garbage). The only loop that follows
 * the per-context pointers, so the arithmetic on the symbols runs in separate loops the compiler
 * vectorises (one scalar loop doing both was bound by its instruction count). */
#define GATHER_FUNCTION(NAME, S)                                                                 \
    static int NAME(symbol_reader *reader, const uint8_t *ctx, Py_ssize_t count, S *out) {       \
        switch (reader->itemsize) {                                                              \
        case 1: for (Py_ssize_t j = 0; j < count; j++) out[j] = (S)read_symbol(reader, ctx[j], 1); break; \
        case 2: for (Py_ssize_t j = 0; j < count; j++) out[j] = (S)read_symbol(reader, ctx[j], 2); break; \
        case 4: for (Py_ssize_t j = 0; j < count; j++) out[j] = (S)read_symbol(reader, ctx[j], 4); break; \
        default: for (Py_ssize_t j = 0; j < count; j++) out[j] = (S)read_symbol(reader, ctx[j], 8); break; \
        }                                                                                        \
        return reader_in_bounds(reader);                                                         \
    }
GATHER_FUNCTION(gather32, uint32_t) /* symbols truncated to 32 bits: all a 16- or 32-bit result needs of most */
GATHER_FUNCTION(gather64, uint64_t)
#undef GATHER_FUNCTION

/* Assemble each context's run from its planes (sequential), then scatter the runs back to
 * element order (a stable counting sort), in symbols of type T. */
#define JOIN(T)                                                                                  \
    {                                                                                            \
        T *run_ = (T *)ordered, *symbols_ = (T *)out.buf;                                        \
        assemble_runs(ordered, sizeof(T), counts, first, width, plane_at);                       \
        for (Py_ssize_t i = 0; i < n; i++) symbols_[i] = run_[cursor[ctx[i]]++];                 \
    }

/* join_planes(planes, counts, plane_counts, contexts, out, itemsize) -> None: the grouping of encode_stream undone.
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

/* pack_groups(planes, counts, plane_counts, group_contexts, group_size, bits, out) -> int: a coded base's
 * codes (docs/format.md, "Base weights") from their inflated planes, packed as ladder.pack_unsigned packs
 * them: group i's group_size codes are the next ones of the run of its context group_contexts[i]. Returns
 * the OR of all codes: the caller refuses a code wider than `bits` by it (such a code's high bits are
 * dropped here, never spilled into a neighbour). One pass with a context per group, not per code:
 * histogram, join_planes and a packing pass after them took twice the time. */
static PyObject *pack_groups(PyObject *self, PyObject *args) {
    PyObject *plane_list;
    Py_buffer count_buffer, plane_counts, group_contexts, out;
    int group_size, bits;
    if (!PyArg_ParseTuple(args, "O!y*y*y*iiw*", &PyList_Type, &plane_list, &count_buffer, &plane_counts, &group_contexts,
                          &group_size, &bits, &out))
        return NULL;
    PyObject *result = NULL;
    const uint8_t *plane_at[CONTEXTS][8];
    int64_t cursor[CONTEXTS] = {0}, groups_of[CONTEXTS] = {0};
    const int64_t *counts = count_buffer.buf;
    const uint8_t *width = plane_counts.buf, *contexts = group_contexts.buf;
    const Py_ssize_t groups = group_contexts.len;
    if (!check_counts(&count_buffer, &plane_counts)) goto done;
    if (bits < 1 || bits > 8 || group_size <= 0 || group_size % 8) {
        PyErr_Format(PyExc_ValueError, "codes of %d bits in groups of %d cannot be packed", bits, group_size);
        goto done;
    }
    if (!check_same_length(out.len, groups * (Py_ssize_t)(group_size / 8) * bits)) goto done;
    for (Py_ssize_t i = 0; i < groups; i++) groups_of[contexts[i]]++;
    for (int c = 0; c < CONTEXTS; c++) {
        if (counts[c] != groups_of[c] * group_size) {
            PyErr_Format(PyExc_ValueError, "context %d counts %lld codes, its groups hold %lld", c, (long long)counts[c],
                         (long long)(groups_of[c] * group_size));
            goto done;
        }
    }
    if (!collect_planes(plane_list, counts, width, 1, groups * (Py_ssize_t)group_size, plane_at)) goto done;
    unsigned seen = 0;
    Py_BEGIN_ALLOW_THREADS
    const unsigned mask = (1u << bits) - 1;
    uint8_t *packed = out.buf;
    for (Py_ssize_t i = 0; i < groups; i++) {
        const int c = contexts[i];
        const uint8_t *codes = width[c] ? plane_at[c][0] + cursor[c] : NULL; /* no plane: every code is 0 */
        cursor[c] += group_size;
        for (int k = 0; k < group_size; k += 8) {
            uint64_t word = 0;
            if (codes)
                for (int j = 0; j < 8; j++) {
                    seen |= codes[k + j];
                    word |= (uint64_t)(codes[k + j] & mask) << (j * bits);
                }
            for (int q = 0; q < bits; q++) *packed++ = (uint8_t)(word >> (8 * q));
        }
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromUnsignedLong(seen);
done:
    PyBuffer_Release(&count_buffer);
    PyBuffer_Release(&plane_counts);
    PyBuffer_Release(&group_contexts);
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

/* Lossless contexts fit a byte: (high - low + 1) relative exponents times 2**step_bits step mantissas. */
static int check_context_bounds(int low, int high, int step_bits) {
    if (high < low || step_bits < 0 || step_bits > 8 || ((Py_ssize_t)(high - low + 1) << step_bits) > CONTEXTS) {
        PyErr_Format(PyExc_ValueError, "lossless contexts [%d, %d] with %d step bits do not fit a byte", low, high, step_bits);
        return 0;
    }
    return 1;
}

/* A lossless context: the relative exponent clamped to [0, span], then the step's leading mantissa bits. */
static inline uint8_t lossless_context(int relative, int span, int step_bits, uint32_t step_mantissa) {
    return (uint8_t)((uint32_t)(relative < 0 ? 0 : relative > span ? span : relative) << step_bits | step_mantissa);
}

/* The leading `step_bits` mantissa bits of a float32 step's bit pattern. */
static inline uint32_t step_mantissa(uint32_t step, int step_bits) { return (step & 0x7FFFFF) >> (23 - step_bits); }

/* contexts(reconstruction, width, mantissa_bits, bias, step, low, high, step_bits, out) -> None
 *
 * out[i] = (clamp(e(reconstruction[i]) - e(step[i]), low, high) - low) << step_bits | m(step[i]),
 * where e() is the biased exponent field minus the bias (of a float of `width` bytes with
 * `mantissa_bits`, `bias` for the reconstruction, of a float32 for the step) and m() the step's
 * leading `step_bits` mantissa bits.
 */
static PyObject *contexts(PyObject *self, PyObject *args) {
    Py_buffer reconstruction, step, out;
    int width, mantissa_bits, bias, low, high, step_bits;
    if (!PyArg_ParseTuple(args, "y*iiiy*iiiw*", &reconstruction, &width, &mantissa_bits, &bias, &step, &low, &high, &step_bits, &out))
        return NULL;
    PyObject *result = NULL;
    if ((width != 2 && width != 4) || mantissa_bits < 1 || mantissa_bits >= 8 * width - 1) {
        PyErr_Format(PyExc_ValueError, "no float layout of %d bytes with %d mantissa bits", width, mantissa_bits);
        goto done;
    }
    if (!check_context_bounds(low, high, step_bits)) goto done;
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
        c[i] = lossless_context(relative - low, high - low, step_bits, step_mantissa(s[i], step_bits));
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
 * allocating a temporary. These functions fuse them into two passes over the block for the
 * default ladder (decode_refined: codes, their one refinement stage and the reconstruction with
 * the lossless contexts; restore_planes), or one per step for longer ladders (unpack_codes, one
 * refine per stage, reconstruct, restore_planes), reading the symbols from their inflated byte
 * planes (symbol_reader). Inflating stays in Python
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
    if (!check_same_length(codes.len / 4, n) || !(reader = reader_of(plane_list, &count_buffer, &plane_counts, n))) goto done;
    int32_t *v = codes.buf;
    const int step = to_bits - from_bits;
    const int32_t span = 1 << step, bottom = -(1 << (from_bits - 1));
    int fits = 1;
    uint32_t symbols[SYMBOL_CHUNK];
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t first = 0; fits && first < n; first += SYMBOL_CHUNK) {
        const Py_ssize_t count = n - first < SYMBOL_CHUNK ? n - first : SYMBOL_CHUNK;
        if (!(fits = gather32(reader, ctx + first, count, symbols))) break;
        for (Py_ssize_t j = 0, i = first; j < count; j++, i++) {
            int32_t d = (int32_t)symbols[j];
            if (d >= span && v[i] == bottom) d = (int32_t)((uint32_t)span - 1u - (uint32_t)d);
            v[i] = (int32_t)(((uint32_t)v[i] << step) + (uint32_t)d);
        }
    }
    Py_END_ALLOW_THREADS
    if (reader_done(reader, fits)) result = Py_NewRef(Py_None);
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

/* What dequantizes a block's codes: widths, group size, lossless context bounds, the output dtype. */
typedef struct {
    int base_bits, bits, group_size, dtype, low, high, step_bits;
    float level, top_level; /* 2**(base_bits - bits) and 2**(base_bits - top_bits) */
} dequantizer;

static dequantizer dequantizer_of(int base_bits, int bits, int top_bits, int group_size, int dtype, int low, int high, int step_bits) {
    dequantizer q = {base_bits, bits, group_size, dtype, low, high, step_bits, float_of((uint32_t)(127 + base_bits - bits) << 23),
                     float_of((uint32_t)(127 + base_bits - top_bits) << 23)};
    return q;
}

/* reconstruct's loop over n codes `v` from a group's start: group g has scale s[g] (float16 bits) and
 * offset o[g]; the values go to `values` (as q->dtype's bit patterns), the lossless contexts to ctx
 * unless it is NULL. One loop per output type and with/without contexts, with the group's constants
 * hoisted, so each inner loop is straight-line code the compiler can vectorise. */
VECTOR_CLONES static void dequantize_groups(const int32_t *v, Py_ssize_t n, const uint16_t *s, const int32_t *o, void *values, uint8_t *ctx,
                              const dequantizer *q) {
    const int group_size = q->group_size, low = q->low, high = q->high, step_bits = q->step_bits;
#define DEQUANTIZE(T, CAST, MANTISSA, BIAS, FIELD, WITH_CONTEXTS)                                     \
    for (Py_ssize_t start = 0, g = 0; start < n; start += group_size, g++) {                         \
        const float scale = half_to_float(s[g]), step = scale * q->level;                            \
        const uint32_t offset = (uint32_t)o[g] << (q->bits - q->base_bits);                          \
        const uint32_t top_step = pattern_of(scale * q->top_level), fine = step_mantissa(top_step, step_bits); \
        const int floor_ = low + (int)((top_step >> 23) & 0xFF) - 127 + (BIAS);                      \
        Py_ssize_t stop = start + group_size < n ? start + group_size : n;                           \
        T *x = (T *)values;                                                                          \
        for (Py_ssize_t i = start; i < stop; i++) {                                                  \
            float value = (float)(int32_t)((uint32_t)v[i] - offset) + 0.5f;                          \
            value = value * step;                                                                    \
            uint32_t stored = CAST(pattern_of(value));                                               \
            x[i] = (T)stored;                                                                        \
            if (WITH_CONTEXTS) {                                                                     \
                int relative = (int)((stored >> (MANTISSA)) & (FIELD)) - floor_;                     \
                ctx[i] = lossless_context(relative, high - low, step_bits, fine);                    \
            }                                                                                        \
        }                                                                                            \
    }
#define DEQUANTIZE_TYPE(T, CAST, MANTISSA, BIAS, FIELD)                                               \
    if (ctx) DEQUANTIZE(T, CAST, MANTISSA, BIAS, FIELD, 1) else DEQUANTIZE(T, CAST, MANTISSA, BIAS, FIELD, 0)
    if (q->dtype == FLOAT32) DEQUANTIZE_TYPE(uint32_t, (uint32_t), 23, 127, 0xFF)
    else if (q->dtype == BFLOAT16) DEQUANTIZE_TYPE(uint16_t, float_to_bfloat, 7, 127, 0xFF)
    else DEQUANTIZE_TYPE(uint16_t, float_to_half, 10, 15, 0x1F)
#undef DEQUANTIZE_TYPE
#undef DEQUANTIZE
}

/* The optional lossless contexts of reconstruct and decode_refined: 1 when `object` is a writable
 * buffer of n bytes (held in `contexts`, for the caller to release), 0 for None, -1 with an
 * exception set. */
static int optional_contexts(PyObject *object, Py_buffer *contexts, Py_ssize_t n) {
    if (object == Py_None) return 0;
    if (PyObject_GetBuffer(object, contexts, PyBUF_WRITABLE) < 0) return -1;
    if (!check_same_length(contexts->len, n)) {
        PyBuffer_Release(contexts);
        return -1;
    }
    return 1;
}

/* reconstruct(codes, scales, offsets, base_bits, bits, top_bits, group_size, dtype, out, contexts, low, high,
 *             step_bits) -> counts or None
 *
 * out[i] = cast((float32(v_i - o_g * 2**(bits-b)) + 0.5) * s_g * 2**(b-bits)) for the first len(out)
 * codes (ladder.dequantize, then the cast to the source dtype: 0 float32, 1 bfloat16, 2 float16,
 * written as bit patterns). scales: float16 bit patterns, offsets: int32, one per group; scales
 * must be finite (the caller checks). When `contexts` is a writable buffer (not None), it also
 * gets lossless.contexts of out against the top level's step s_g * 2**(b-top_bits), clamped to
 * [CONTEXT_MIN, CONTEXT_MAX] given as `low`/`high` with `step_bits` of the step's mantissa, and the call
 * returns their histogram. */
static PyObject *reconstruct(PyObject *self, PyObject *args) {
    Py_buffer codes, scales, offsets, out;
    PyObject *context_object;
    int base_bits, bits, top_bits, group_size, dtype, low, high, step_bits;
    if (!PyArg_ParseTuple(args, "y*y*y*iiiiiw*Oiii", &codes, &scales, &offsets, &base_bits, &bits, &top_bits, &group_size, &dtype,
                          &out, &context_object, &low, &high, &step_bits))
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
    if (!check_context_bounds(low, high, step_bits)) goto done;
    if ((have_contexts = optional_contexts(context_object, &contexts, n)) < 0) goto done;
    uint8_t *ctx = have_contexts ? contexts.buf : NULL;
    const dequantizer q = dequantizer_of(base_bits, bits, top_bits, group_size, dtype, low, high, step_bits);
    Py_BEGIN_ALLOW_THREADS
    dequantize_groups(codes.buf, n, scales.buf, offsets.buf, out.buf, ctx, &q);
    if (ctx) count_contexts(ctx, n, counts);
    Py_END_ALLOW_THREADS
    result = have_contexts > 0 ? PyBytes_FromStringAndSize((const char *)counts, sizeof(counts)) : Py_NewRef(Py_None);
done:
    if (have_contexts > 0) PyBuffer_Release(&contexts);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&out);
    return result;
}

/* Histogram of the refinement contexts of `bits`-wide base codes packed in `packed` (`codes` of
 * them): a base code's context is its packed field itself (v + 2**(bits-1), in range, so the
 * clamp of refinement_contexts never acts). Four codes per byte at once through a byte histogram
 * when the width divides 8. */
static void count_packed_contexts(const uint8_t *packed, Py_ssize_t length, int bits, Py_ssize_t codes, int64_t *counts) {
    const uint32_t mask = (1u << bits) - 1;
    memset(counts, 0, CONTEXTS * sizeof(int64_t));
    if (8 % bits == 0) {
        int64_t bytes[CONTEXTS];
        count_contexts(packed, length, bytes);
        for (int b = 0; b < CONTEXTS; b++)
            for (int shift = 0; shift < 8; shift += bits) counts[(b >> shift) & mask] += bytes[b];
        return;
    }
    for (Py_ssize_t i = 0; i < codes; i++) {
        Py_ssize_t bit = i * bits, byte = bit >> 3;
        uint32_t window = packed[byte] | (byte + 1 < length ? (uint32_t)packed[byte + 1] << 8 : 0);
        counts[(window >> (bit & 7)) & mask]++;
    }
}

/* packed_contexts(packed, bits) -> counts: the histogram (256 native int64) of the refinement
 * contexts of the base codes ladder.pack wrote at `bits` (1 to 8), as refinement_contexts of the
 * unpacked codes gives it: what bounds the first stage's planes before any code is unpacked. */
static PyObject *packed_contexts(PyObject *self, PyObject *args) {
    Py_buffer packed;
    int bits;
    if (!PyArg_ParseTuple(args, "y*i", &packed, &bits)) return NULL;
    PyObject *result = NULL;
    int64_t counts[CONTEXTS];
    if (bits < 1 || bits > 8 || packed.len * 8 % bits) {
        PyErr_Format(PyExc_ValueError, "%zd bytes are not whole %d-bit codes", packed.len, bits);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    count_packed_contexts(packed.buf, packed.len, bits, packed.len * 8 / bits, counts);
    Py_END_ALLOW_THREADS
    result = PyBytes_FromStringAndSize((const char *)counts, sizeof(counts));
done:
    PyBuffer_Release(&packed);
    return result;
}

/* The fine codes at `bits` of `count` base codes given as packed fields (v + 2**(base_bits-1)) and
 * their refinement symbols: refine's arithmetic, the bottom bin's fold on field 0. */
VECTOR_CLONES static void refine_fields(const uint8_t *fields, const uint32_t *symbols, Py_ssize_t count, int base_bits, int bits,
                                        int32_t *codes) {
    const int shift = bits - base_bits;
    const int32_t span = 1 << shift;
    const uint32_t zero = 1u << (base_bits - 1);
    for (Py_ssize_t j = 0; j < count; j++) {
        int32_t d = (int32_t)symbols[j];
        if (d >= span && fields[j] == 0) d = (int32_t)((uint32_t)span - 1u - (uint32_t)d);
        codes[j] = (int32_t)((((uint32_t)fields[j] - zero) << shift) + (uint32_t)d);
    }
}

/* Codes decode_refined refines before it dequantizes them: a stretch that stays in the L1 cache. */
#define REFINED_CHUNK 4096

/* decode_refined(packed, base_bits, counts, plane_counts, planes, bits, scales, offsets, top_bits,
 *                group_size, dtype, out, contexts, low, high, step_bits) -> counts or None
 *
 * unpack_codes, refine from base_bits to `bits` and reconstruct in one pass over stretches of
 * REFINED_CHUNK codes that stay in the L1 cache, without the block's int32 codes: the base codes
 * come from their packed fields (also their refinement contexts: packed_contexts gives `counts`),
 * take their refinements from the planes and are dequantized and cast into `out` (and their
 * lossless contexts written, as reconstruct does). The same arithmetic as those three calls, so
 * the same bits; 1.8x faster than them on bfloat16 (ns per weight 4.9 -> 2.7 before the AVX2
 * clones). */
static PyObject *decode_refined(PyObject *self, PyObject *args) {
    PyObject *plane_list, *context_object;
    Py_buffer packed, count_buffer, plane_counts, scales, offsets, out;
    int base_bits, bits, top_bits, group_size, dtype, low, high, step_bits;
    if (!PyArg_ParseTuple(args, "y*iy*y*O!iy*y*iiiw*Oiii", &packed, &base_bits, &count_buffer, &plane_counts, &PyList_Type,
                          &plane_list, &bits, &scales, &offsets, &top_bits, &group_size, &dtype, &out, &context_object, &low,
                          &high, &step_bits))
        return NULL;
    PyObject *result = NULL;
    symbol_reader *reader = NULL;
    int32_t *local = NULL;
    Py_buffer contexts = {0};
    int have_contexts = 0;
    int64_t counts[CONTEXTS];
    int width = dtype == FLOAT32 ? 4 : 2;
    Py_ssize_t n = out.len / width, groups = scales.len / 2, codes = base_bits >= 1 && base_bits <= 8 ? packed.len * 8 / base_bits : 0;
    if (dtype < FLOAT32 || dtype > FLOAT16 || base_bits < 1 || base_bits > 8 || bits <= base_bits || top_bits < bits ||
        top_bits > 16 || group_size <= 0 || packed.len * 8 % base_bits) {
        PyErr_SetString(PyExc_ValueError, "unsupported dtype, widths, group size or packed length");
        goto done;
    }
    if (!check_same_length(offsets.len / 4, groups)) goto done;
    if (n > codes || n > groups * (Py_ssize_t)group_size) {
        PyErr_Format(PyExc_ValueError, "%zd outputs, %zd codes and %zd groups given", n, codes, groups);
        goto done;
    }
    if (!check_context_bounds(low, high, step_bits)) goto done;
    if ((have_contexts = optional_contexts(context_object, &contexts, n)) < 0) goto done;
    if (!(reader = reader_of(plane_list, &count_buffer, &plane_counts, codes))) goto done;
    const Py_ssize_t chunk = group_size < REFINED_CHUNK ? REFINED_CHUNK / group_size * group_size : group_size;
    if (!(local = malloc(chunk * (2 * sizeof(int32_t) + 1) + 1))) {
        PyErr_NoMemory();
        goto done;
    }
    const uint8_t *in = packed.buf;
    const Py_ssize_t length = packed.len;
    uint8_t *ctx = have_contexts ? contexts.buf : NULL;
    const uint32_t mask = (1u << base_bits) - 1;
    const dequantizer q = dequantizer_of(base_bits, bits, top_bits, group_size, dtype, low, high, step_bits);
    uint32_t *symbols = (uint32_t *)(local + chunk);
    uint8_t *fields = (uint8_t *)(symbols + chunk); /* chunk + 1 bytes: nibbles come in pairs */
    int fits = 1;
    Py_BEGIN_ALLOW_THREADS
    /* Over every code, the padding past the last output included: all symbols are read. */
    for (Py_ssize_t first = 0; fits && first < codes; first += chunk) {
        const Py_ssize_t last = first + chunk < codes ? first + chunk : codes, count = last - first;
        const Py_ssize_t outputs = last < n ? count : first < n ? n - first : 0;
        /* The base fields (refinement contexts), their refinements, then the fine codes. */
        if (base_bits == 4 && !(first & 1))
            for (Py_ssize_t j = 0; j < (count + 1) / 2; j++) {
                fields[2 * j] = in[first / 2 + j] & 15;
                fields[2 * j + 1] = in[first / 2 + j] >> 4;
            }
        else
            for (Py_ssize_t i = first; i < last; i++) {
                Py_ssize_t bit = i * base_bits, byte = bit >> 3;
                uint32_t window = in[byte] | (byte + 1 < length ? (uint32_t)in[byte + 1] << 8 : 0);
                fields[i - first] = (uint8_t)((window >> (bit & 7)) & mask);
            }
        for (Py_ssize_t read = 0, part; fits && read < count; read += part) {
            part = count - read < SYMBOL_CHUNK ? count - read : SYMBOL_CHUNK;
            fits = gather32(reader, fields + read, part, symbols + read);
        }
        refine_fields(fields, symbols, outputs, base_bits, bits, local);
        if (fits && outputs)
            dequantize_groups(local, outputs, (const uint16_t *)scales.buf + first / group_size,
                              (const int32_t *)offsets.buf + first / group_size, (char *)out.buf + first * width,
                              ctx ? ctx + first : NULL, &q);
    }
    if (fits && ctx) count_contexts(ctx, n, counts);
    Py_END_ALLOW_THREADS
    if (reader_done(reader, fits))
        result = have_contexts > 0 ? PyBytes_FromStringAndSize((const char *)counts, sizeof(counts)) : Py_NewRef(Py_None);
done:
    close_reader(reader);
    free(local);
    if (have_contexts > 0) PyBuffer_Release(&contexts);
    PyBuffer_Release(&packed);
    PyBuffer_Release(&count_buffer);
    PyBuffer_Release(&plane_counts);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&out);
    return result;
}

/* restore_planes's arithmetic on `count` float bit patterns of `width` bytes: each adds its zigzag
 * symbol (uint64 when `wide`, else uint32) in ordered integers, the sum wrapping to the width; a
 * 32-bit difference needs the symbol's 33 low bits, so symbols of 8 bytes stay 64-bit. */
VECTOR_CLONES static void add_residuals(void *values, int width, const void *symbols, int wide, Py_ssize_t count) {
#define RESTORE(X, U, MAGNITUDE, S)                                                              \
    {                                                                                            \
        X *x = values;                                                                           \
        const S *z = symbols;                                                                    \
        for (Py_ssize_t j = 0; j < count; j++) {                                                 \
            U d = (U)((U)(z[j] >> 1) ^ (U)(0u - (U)(z[j] & 1)));                                 \
            X ordered = x[j] < 0 ? (X)(x[j] ^ MAGNITUDE) : x[j];                                 \
            X bits = (X)(U)((U)ordered + d);                                                     \
            x[j] = bits < 0 ? (X)(bits ^ MAGNITUDE) : bits;                                      \
        }                                                                                        \
    }
    if (width == 2 && wide) RESTORE(int16_t, uint16_t, 0x7FFF, uint64_t)
    else if (width == 2) RESTORE(int16_t, uint16_t, 0x7FFF, uint32_t)
    else if (wide) RESTORE(int32_t, uint32_t, 0x7FFFFFFF, uint64_t)
    else RESTORE(int32_t, uint32_t, 0x7FFFFFFF, uint32_t)
#undef RESTORE
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
    if (!check_same_length(values.len / width, n) || !(reader = reader_of(plane_list, &count_buffer, &plane_counts, n))) goto done;
    int fits = 1;
    Py_BEGIN_ALLOW_THREADS
    union {
        uint32_t narrow[SYMBOL_CHUNK];
        uint64_t wide[SYMBOL_CHUNK];
    } symbols;
    for (Py_ssize_t first = 0; fits && first < n; first += SYMBOL_CHUNK) {
        const Py_ssize_t count = n - first < SYMBOL_CHUNK ? n - first : SYMBOL_CHUNK;
        if (reader->itemsize == 8 ? !(fits = gather64(reader, ctx + first, count, symbols.wide))
                                  : !(fits = gather32(reader, ctx + first, count, symbols.narrow)))
            break;
        add_residuals((char *)values.buf + first * width, width, &symbols, reader->itemsize == 8, count);
    }
    Py_END_ALLOW_THREADS
    if (reader_done(reader, fits)) result = Py_NewRef(Py_None);
done:
    release_planes_call(reader, &values, &contexts, &count_buffer, &plane_counts);
    return result;
}

/* ---- Encoder: the base grid choice (ladder.base_grid, docs/format.md "Choosing the grid") ---- */

/* Candidate grids per group, as lanes: the symmetric one and two per clipping ratio (ladder.CLIP_RATIOS
 * gives 23), padded to three 8-lane vectors whose sums stay in registers while a group's weights stream past. */
#define GRID_LANES 24

/* A weight as the grid search sees it: NaN and +-inf count as 0 (torch.nan_to_num). */
static inline float finite_or_zero(float value) { return (pattern_of(value) & 0x7F800000) == 0x7F800000 ? 0.0f : value; }

/* ladder._to_scale of a non-negative float32: saturate at 65504 (float16's maximum), round to nearest even, then a
 * normal float16 to the nearest `mantissa_bits`-bit mantissa (up on ties), saturating at the largest such value. */
static inline uint16_t scale_half(float value, int mantissa_bits) {
    uint32_t half = float_to_half(pattern_of(value > 65504.0f ? 65504.0f : value));
    if (half < 0x0400) return (uint16_t)half; /* zero or subnormal: kept */
    const int dropped = 10 - mantissa_bits;
    const uint32_t largest = 0x7BFFu & ~((1u << dropped) - 1u);
    half = (half + ((1u << dropped) >> 1)) >> dropped << dropped;
    return (uint16_t)(half > largest ? largest : half);
}

/* floor(t) for |t| < 2**31, in the grid search's inner loop. x86 code without SSE4.1 (the baseline of a build
 * without AVX2 clones) has no vector floor and floorf is a scalar sequence there (~8x slower): truncate, then
 * step down where that rounded up, which SSE2 vectorises. Elsewhere floorf is one vector instruction (the AVX2
 * clone's roundps, NEON's frintm). Both are exact. */
#if defined(__x86_64__) && !defined(__SSE4_1__) && !defined(HAVE_AVX2_CLONES)
static inline float grid_floor(float t) {
    float truncated = (float)(int32_t)t;
    return truncated > t ? truncated - 1.0f : truncated;
}
#else
#define grid_floor floorf
#endif

/* Per candidate lane c, the sum over the group's weights w, in weight order, of d * d where, in float32 with
 * every operation rounded on its own, r = offset[c] + w * inverse[c], d = (floor(clamp(r, low, high)) + 0.5) - r:
 * ladder._grid_errors' sums. The lanes are the inner loop (independent sums, each still in weight order), so
 * it vectorises without reordering any sum. */
VECTOR_CLONES static void grid_sums(const float *weights, int group_size, const float *inverse, const float *offset, float low,
                                    float high, float *sums) {
    float sum[GRID_LANES] = {0};
    for (int i = 0; i < group_size; i++) {
        const float weight = finite_or_zero(weights[i]);
        for (int c = 0; c < GRID_LANES; c++) {
            float r = offset[c] + weight * inverse[c];
            float t = low > r ? low : r; /* clamp(r, low, high), written as max then min: two instructions */
            t = high < t ? high : t;
            float d = (grid_floor(t) + 0.5f) - r;
            sum[c] += d * d;
        }
    }
    memcpy(sums, sum, sizeof sum);
}

/* One group's base grid: its float16 scale bits and integer offset, as ladder.base_grid's torch path picks them. */
VECTOR_CLONES static void choose_grid(const float *weights, int group_size, int bits, const float *ratios, int ratio_count,
                                      int mantissa_bits, uint16_t *scale, int32_t *offset) {
    float low = finite_or_zero(weights[0]), high = low, absmax = 0.0f, squares = 0.0f;
    for (int i = 0; i < group_size; i++) {
        float weight = finite_or_zero(weights[i]), magnitude = fabsf(weight);
        low = weight < low ? weight : low;
        high = weight > high ? weight : high;
        absmax = magnitude > absmax ? magnitude : absmax;
        squares += weight * weight;
    }
    const float limit = (float)(1 << (bits - 1));
    uint16_t scales[GRID_LANES] = {scale_half(absmax / (limit - 0.5f), mantissa_bits)};
    int32_t offsets[GRID_LANES] = {0};
    float inverse[GRID_LANES], lane_offset[GRID_LANES], steps[GRID_LANES] = {half_to_float(scales[0])}, sums[GRID_LANES];
    for (int k = 0; k < ratio_count; k++) {
        uint16_t clipped = scale_half((high - low) * ratios[k] / (float)(1 << bits), mantissa_bits);
        float step = half_to_float(clipped), centre = step > 0.0f ? -(high + low) / (2.0f * step) : 0.0f;
        float below = floorf(centre), above = ceilf(centre);
        below = below < -limit ? -limit : below > limit - 1.0f ? limit - 1.0f : below;
        above = above < -limit ? -limit : above > limit - 1.0f ? limit - 1.0f : above;
        scales[1 + 2 * k] = scales[2 + 2 * k] = clipped;
        steps[1 + 2 * k] = steps[2 + 2 * k] = step;
        offsets[1 + 2 * k] = (int32_t)below;
        offsets[2 + 2 * k] = (int32_t)above;
    }
    const int candidates = 1 + 2 * ratio_count;
    for (int c = 0; c < GRID_LANES; c++) { /* all lanes, the unused ones at step 0: whole vectors, 3 divisions */
        inverse[c] = steps[c] > 0.0f ? 1.0f / steps[c] : 0.0f;
        lane_offset[c] = (float)offsets[c];
    }
    grid_sums(weights, group_size, inverse, lane_offset, -limit, limit - 1.0f, sums);
    int best = 0;
    float least = 0.0f;
    for (int c = 0; c < candidates; c++) {
        float error = steps[c] > 0.0f ? sums[c] * (steps[c] * steps[c]) : squares;
        if (c == 0 || error < least) { /* the first minimum wins */
            least = error;
            best = c;
        }
    }
    *scale = scales[best];
    *offset = offsets[best];
}

/* choose_grids(groups, group_size, bits, ratios, mantissa_bits, scales, offsets) -> None
 *
 * ladder.base_grid in one pass per group: min, max and absmax of the group's float32 weights (NaN and
 * +-inf as 0), every candidate grid (the symmetric one, then per float32 clipping ratio in `ratios` the
 * floor and ceil offsets; scales of `mantissa_bits` mantissa bits, ladder.SCALE_MANTISSA_BITS), their
 * squared errors and the first least one, written as float16 scale bits
 * (uint16, one per group) and int32 offsets. The same float32 operations as the torch candidates and
 * ladder._grid_errors' numpy sums, each rounded on its own, so both paths pick the same grids. */
static PyObject *choose_grids(PyObject *self, PyObject *args) {
    Py_buffer groups, ratios, scales, offsets;
    int group_size, bits, mantissa_bits;
    if (!PyArg_ParseTuple(args, "y*iiy*iw*w*", &groups, &group_size, &bits, &ratios, &mantissa_bits, &scales, &offsets)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = groups.len / 4, group_count = group_size > 0 ? n / group_size : 0;
    int ratio_count = (int)(ratios.len / 4);
    if (group_size <= 0 || bits < 1 || bits > 8 || group_count * group_size != n || groups.len != n * 4) {
        PyErr_Format(PyExc_ValueError, "%zd bytes of float32 weights do not make groups of %d at 1 to 8 bits (%d)", groups.len,
                     group_size, bits);
        goto done;
    }
    if (mantissa_bits < 0 || mantissa_bits > 10) {
        PyErr_Format(PyExc_ValueError, "a float16 scale has 0 to 10 mantissa bits, got %d", mantissa_bits);
        goto done;
    }
    if (ratios.len % 4 || 1 + 2 * ratio_count > GRID_LANES) {
        PyErr_Format(PyExc_ValueError, "ratios must be float32, at most %d of them", (GRID_LANES - 1) / 2);
        goto done;
    }
    if (scales.len != group_count * 2 || offsets.len != group_count * 4) {
        PyErr_Format(PyExc_ValueError, "scales and offsets must hold one float16 and one int32 for each of %zd groups", group_count);
        goto done;
    }
    const float *w = groups.buf, *r = ratios.buf;
    uint16_t *s = scales.buf;
    int32_t *o = offsets.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t g = 0; g < group_count; g++) choose_grid(w + g * group_size, group_size, bits, r, ratio_count, mantissa_bits, s + g, o + g);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&groups);
    PyBuffer_Release(&ratios);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&offsets);
    return result;
}

/* ---- Encoder: a block's codes and refinements (progressive._encode_block's integer part) ---- */

/* quantize_groups' loop: ladder.quantize of float32 weights (group g: step s[g] * level, offset o[g] << shift)
 * into int32 codes, as torch computes it: r = w / step (0 when step is 0), NaN -> 0 and +-inf -> +-limit
 * (torch.nan_to_num), plus the offset, floored and clamped to [-limit, limit - 1]. Blends, not branches:
 * the loop vectorises, division included, with each operation rounded as torch rounds it. */
VECTOR_CLONES static void quantize_loop(const float *w, Py_ssize_t group_count, int group_size, const uint16_t *s, const int32_t *o,
                                        int shift, float level, float limit, int32_t *codes) {
    for (Py_ssize_t g = 0; g < group_count; g++) {
        const float step = half_to_float(s[g]) * level, offset = (float)(int32_t)((uint32_t)o[g] << shift);
        const float *x = w + g * group_size;
        int32_t *v = codes + g * group_size;
        if (!(step > 0.0f)) { /* torch.where(step > 0, w / step, 0): every ratio is 0 */
            float code = floorf(offset);
            code = -limit > code ? -limit : code;
            code = limit - 1.0f < code ? limit - 1.0f : code;
            for (int i = 0; i < group_size; i++) v[i] = (int32_t)code;
            continue;
        }
        for (int i = 0; i < group_size; i++) {
            float r = x[i] / step;
            r = r != r ? 0.0f : r;
            r = r > FLT_MAX ? limit : r < -FLT_MAX ? -limit : r;
            float code = floorf(r + offset);
            code = -limit > code ? -limit : code;
            code = limit - 1.0f < code ? limit - 1.0f : code;
            v[i] = (int32_t)code;
        }
    }
}

/* quantize_groups(groups, group_size, scales, offsets, base_bits, bits, headroom, out) -> None
 *
 * ladder.quantize: the signed codes of width `bits` (clamped to 2**(bits-1+headroom)) of float32 groups
 * on the grid of float16 scales (bit patterns) and int32 offsets, one per group, into int32 out. */
static PyObject *quantize_groups(PyObject *self, PyObject *args) {
    Py_buffer groups, scales, offsets, out;
    int group_size, base_bits, bits, headroom;
    if (!PyArg_ParseTuple(args, "y*iy*y*iiiw*", &groups, &group_size, &scales, &offsets, &base_bits, &bits, &headroom, &out)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t group_count = scales.len / 2;
    if (group_size <= 0 || base_bits < 1 || bits < base_bits || bits + headroom > 24 || headroom < 0) {
        PyErr_Format(PyExc_ValueError, "cannot quantize groups of %d at %d bits from a %d-bit base with headroom %d", group_size, bits,
                     base_bits, headroom);
        goto done;
    }
    if (groups.len != group_count * group_size * 4 || out.len != groups.len || offsets.len != group_count * 4) {
        PyErr_Format(PyExc_ValueError, "groups and out must hold %d float32 / int32 for each of the %zd scales and offsets", group_size,
                     group_count);
        goto done;
    }
    const float level = float_of((uint32_t)(127 + base_bits - bits) << 23), limit = (float)(1 << (bits - 1 + headroom));
    Py_BEGIN_ALLOW_THREADS
    quantize_loop(groups.buf, group_count, group_size, scales.buf, offsets.buf, bits - base_bits, level, limit, out.buf);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&groups);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&out);
    return result;
}

/* refinement_loop: per top code v, coarse = v >> (top_bits - low), fine = v >> (top_bits - high),
 * d = fine - (coarse << k) and the refinement d, or 2**k - 1 - d when d < 0 (ladder.refinement, not corrected). */
VECTOR_CLONES static void refinement_loop(const int32_t *top, Py_ssize_t n, int top_bits, int low, int high, int32_t *coarse,
                                          int32_t *refinements) {
    const int k = high - low, to_low = top_bits - low, to_high = top_bits - high;
    const int32_t span = 1 << k;
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t c = top[i] >> to_low;
        int32_t d = (int32_t)((uint32_t)(top[i] >> to_high) - ((uint32_t)c << k));
        coarse[i] = c;
        refinements[i] = d < 0 ? span - 1 - d : d;
    }
}

/* stage_refinements(top_codes, top_bits, low, high, coarse, refinements) -> None
 *
 * An integer stage after the first (base_stage codes that one), from `low` to `high` bits of int32 top
 * codes of width top_bits: the coarse codes and the refinements the stage codes, both int32, in one pass. */
static PyObject *stage_refinements(PyObject *self, PyObject *args) {
    Py_buffer top, coarse, refinements;
    int top_bits, low, high;
    if (!PyArg_ParseTuple(args, "y*iiiw*w*", &top, &top_bits, &low, &high, &coarse, &refinements)) return NULL;
    PyObject *result = NULL;
    if (low < 1 || high <= low || top_bits < high || top_bits > 24) {
        PyErr_Format(PyExc_ValueError, "no stage from %d to %d bits of %d-bit codes", low, high, top_bits);
        goto done;
    }
    if (top.len % 4 || coarse.len != top.len || refinements.len != top.len) {
        PyErr_SetString(PyExc_ValueError, "top codes, coarse codes and refinements must be int32 of one length");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    refinement_loop(top.buf, top.len / 4, top_bits, low, high, coarse.buf, refinements.buf);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&top);
    PyBuffer_Release(&coarse);
    PyBuffer_Release(&refinements);
    return result;
}

/* base_loop: per run of 8 top codes, the base codes c = clamp(v >> (top_bits - base_bits)), stored as u = c + 2**(b-1):
 * into `contexts` (u is the first stage's refinement context) and packed (ladder.pack: 8 codes fill b bytes, code k
 * at bits [k*b, (k+1)*b) of their little-endian run); with `refinements`, the first stage's (ladder.refinement of
 * v >> (top_bits - high) over c, not corrected). n is a multiple of 8. */
VECTOR_CLONES static void base_loop(const int32_t *top, Py_ssize_t n, int top_bits, int base_bits, int high, uint8_t *packed,
                                    uint8_t *contexts, int32_t *refinements) {
    const int to_base = top_bits - base_bits, to_high = top_bits - high, k = high - base_bits;
    const int32_t bottom = -(1 << (base_bits - 1)), top_code = (1 << (base_bits - 1)) - 1, span = 1 << k;
    for (Py_ssize_t i = 0; i < n; i++) { /* separate loops: each vectorises */
        int32_t c = top[i] >> to_base;
        contexts[i] = (uint8_t)((c < bottom ? bottom : c > top_code ? top_code : c) - bottom);
    }
    if (refinements)
        for (Py_ssize_t i = 0; i < n; i++) {
            int32_t c = (int32_t)contexts[i] + bottom;
            int32_t d = (int32_t)((uint32_t)(top[i] >> to_high) - ((uint32_t)c << k));
            refinements[i] = d < 0 ? span - 1 - d : d;
        }
    if (base_bits == 4) /* the default width: two codes a byte, low nibble first */
        for (Py_ssize_t j = 0; j < n / 2; j++) packed[j] = (uint8_t)(contexts[2 * j] | contexts[2 * j + 1] << 4);
    else
        for (Py_ssize_t run = 0; run < n; run += 8) {
            uint64_t word = 0;
            for (int j = 0; j < 8; j++) word |= (uint64_t)contexts[run + j] << (j * base_bits);
            for (int b = 0; b < base_bits; b++) packed[run / 8 * base_bits + b] = (uint8_t)(word >> (8 * b));
        }
}

/* base_stage(top_codes, top_bits, base_bits, high, packed, contexts, refinements) -> None
 *
 * The base of int32 top codes of width top_bits in one pass: its packed codes (ladder.pack layout,
 * base_bits bytes per 8 codes), its stored codes u = c + 2**(b-1) as uint8 (the first stage's refinement
 * contexts) and, unless `refinements` is None, the int32 refinements of the first stage, to `high` bits. */
static PyObject *base_stage(PyObject *self, PyObject *args) {
    Py_buffer top, packed, contexts, refinements = {0};
    PyObject *refinement_object;
    int top_bits, base_bits, high, have_refinements = 0;
    if (!PyArg_ParseTuple(args, "y*iiiw*w*O", &top, &top_bits, &base_bits, &high, &packed, &contexts, &refinement_object)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = top.len / 4;
    if (base_bits < 1 || base_bits > 8 || high < base_bits || top_bits < high || top_bits > 24 || (refinement_object == Py_None) != (high == base_bits)) {
        PyErr_Format(PyExc_ValueError, "no %d-bit base with a stage to %d bits of %d-bit codes", base_bits, high, top_bits);
        goto done;
    }
    if (top.len % 32 || packed.len != n / 8 * base_bits || contexts.len != n) {
        PyErr_Format(PyExc_ValueError, "%zd top codes need %zd packed bytes and as many contexts as codes", n, n / 8 * base_bits);
        goto done;
    }
    if ((have_refinements = optional_contexts(refinement_object, &refinements, top.len)) < 0) goto done;
    int32_t *refined = have_refinements ? refinements.buf : NULL;
    Py_BEGIN_ALLOW_THREADS
    base_loop(top.buf, n, top_bits, base_bits, high, packed.buf, contexts.buf, refined);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    if (have_refinements > 0) PyBuffer_Release(&refinements);
    PyBuffer_Release(&top);
    PyBuffer_Release(&packed);
    PyBuffer_Release(&contexts);
    return result;
}

/* The zigzag code of a residual: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ... (lossless.residual). */
static inline uint64_t zigzag(int64_t d) { return ((uint64_t)d << 1) ^ (uint64_t)(d >> 63); }

/* Elements dequantized at a time by lossless_symbols: whole groups, their reconstruction stays in L1. */
#define LOSSLESS_CHUNK 4096

/* lossless_symbols(codes, scales, offsets, base_bits, top_bits, group_size, dtype, original, contexts, residuals, low, high,
 *                  step_bits) -> None
 *
 * The lossless stage's symbols of a block in one pass over L1-sized runs of whole groups: the top codes'
 * reconstruction in the source dtype (reconstruct's loop, the decoder's own) and its lossless contexts
 * into uint8 `contexts`, then lossless.residual of the original's bit patterns against it into
 * `residuals`: uint32 for 16-bit dtypes (the zigzag code of a 16-bit difference is below 2**17), uint64
 * for float32. `original` holds the block's n elements; codes, scales (finite float16 bits) and offsets
 * cover them in whole groups. */
static PyObject *lossless_symbols(PyObject *self, PyObject *args) {
    Py_buffer codes, scales, offsets, original, contexts, residuals;
    int base_bits, top_bits, group_size, dtype, low, high, step_bits;
    if (!PyArg_ParseTuple(args, "y*y*y*iiiiy*w*w*iii", &codes, &scales, &offsets, &base_bits, &top_bits, &group_size, &dtype,
                          &original, &contexts, &residuals, &low, &high, &step_bits))
        return NULL;
    PyObject *result = NULL;
    uint8_t *local = NULL;
    const int width = dtype == FLOAT32 ? 4 : 2, symbol = width == 2 ? 4 : 8;
    const Py_ssize_t n = original.len / width, groups = scales.len / 2;
    if (dtype < FLOAT32 || dtype > FLOAT16 || base_bits < 1 || top_bits < base_bits || top_bits > 16 || group_size <= 0) {
        PyErr_SetString(PyExc_ValueError, "unsupported dtype, widths or group size");
        goto done;
    }
    if (original.len % width || offsets.len != groups * 4 || codes.len != groups * group_size * 4 || n > groups * group_size ||
        contexts.len != n || residuals.len != n * symbol) {
        PyErr_Format(PyExc_ValueError, "%zd elements need whole groups of codes, one context and one %d-byte residual each", n, symbol);
        goto done;
    }
    const Py_ssize_t chunk = (Py_ssize_t)group_size * (group_size < LOSSLESS_CHUNK ? LOSSLESS_CHUNK / group_size : 1);
    if (!(local = malloc(chunk * width))) {
        PyErr_NoMemory();
        goto done;
    }
    if (!check_context_bounds(low, high, step_bits)) goto done;
    const dequantizer q = dequantizer_of(base_bits, top_bits, top_bits, group_size, dtype, low, high, step_bits);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t first = 0; first < n; first += chunk) {
        const Py_ssize_t count = n - first < chunk ? n - first : chunk;
        dequantize_groups((const int32_t *)codes.buf + first, count, (const uint16_t *)scales.buf + first / group_size,
                          (const int32_t *)offsets.buf + first / group_size, local, (uint8_t *)contexts.buf + first, &q);
        if (width == 2) {
            const int16_t *x = (const int16_t *)original.buf + first, *y = (const int16_t *)local;
            uint32_t *out = (uint32_t *)residuals.buf + first;
            for (Py_ssize_t i = 0; i < count; i++) out[i] = (uint32_t)zigzag(ordered16(x[i]) - ordered16(y[i]));
        } else {
            const int32_t *x = (const int32_t *)original.buf + first, *y = (const int32_t *)local;
            uint64_t *out = (uint64_t *)residuals.buf + first;
            for (Py_ssize_t i = 0; i < count; i++) out[i] = zigzag(ordered32(x[i]) - ordered32(y[i]));
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    free(local);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&original);
    PyBuffer_Release(&contexts);
    PyBuffer_Release(&residuals);
    return result;
}

/* ---- Decoder: inflating the planes of a stream (entropy.inflate_planes) ---- */

/* Why our own inflater: the planes are literal-only DEFLATE (the encoder above) and a block has
 * ~100 of them, so ISA-L's inflate through Python cost one call, one object and one GIL round
 * trip per plane, and its general decoder handles matches our planes never hold. This one decodes
 * up to three literals per table lookup (as many as fit the table's index), two planes side by
 * side, and inflates a whole stream per call with the GIL released, so the planes of a block
 * inflate while other threads run Python. MiniLM's stage streams, one core: bfloat16 54 ms where
 * ISA-L plane by plane through Python took 65 ms; float32 78 ms against 70 (its planes are mostly
 * stored, where ISA-L's copy is as good), but with the GIL released all along.
 *
 * It accepts only streams it can prove every inflater decodes the same way: literal and
 * end-of-block symbols, complete Huffman codes, consistent stored lengths, each plane ending
 * exactly at its last byte with its context's count. Anything else (a length code, an incomplete
 * or over-subscribed code, a truncated or malformed stream) makes inflate_stream return None, and
 * entropy.py inflates that stream with zlib or ISA-L, which decode any valid DEFLATE and name the
 * fault of an invalid one. */

#define LITERAL_TABLE_BITS 12 /* the most: a table of 16 KB */
#define LITERAL_TABLE_SIZE (1 << LITERAL_TABLE_BITS)

/* A table entry: the bits its literals take (bits 0..5, the shift count itself), how many literals
 * (bits 6..7: 1 to 3) and the literals (bytes 1 to 3, in the order they are stored); 0 sends the
 * decoder to the canonical decode (end of block, length codes, codes longer than the table). */
#define ENTRY(literals, bits, count) ((uint32_t)(bits) | (uint32_t)(count) << 6 | (uint32_t)(literals) << 8)
#define ENTRY_BITS(e) ((e) & 63)
#define ENTRY_COUNT(e) (((e) >> 6) & 3)

typedef struct {
    uint16_t count[MAX_CODE_BITS + 1]; /* codes per length */
    uint16_t symbol[FIXED_LITERALS];   /* symbols in canonical order */
    int table_bits; /* of the table's index: fewer for short blocks, whose table would cost more than it saves */
    uint32_t table[LITERAL_TABLE_SIZE];
} literal_code;

typedef struct {
    const uint8_t *start, *in, *end;
    uint64_t bits;     /* the next `count` bits, least significant first (higher bits: copies of later input, or 0) */
    int count;
    Py_ssize_t padded; /* zero bytes read past the end */
} bit_reader;

static inline uint64_t load_le64(const uint8_t *in) {
    uint64_t value = 0;
    for (int k = 0; k < 8; k++) value |= (uint64_t)in[k] << (8 * k); /* one unaligned load at -O3 */
    return value;
}

/* At least 56 bits in the buffer. With 8 bytes left, one load: the bytes past the whole ones taken
 * land above `count` and are ORed in again, unchanged, by the next refill. */
static inline void refill(bit_reader *r) {
    if (r->end - r->in >= 8) {
        r->bits |= load_le64(r->in) << r->count;
        r->in += (63 - r->count) >> 3;
        r->count |= 56;
        return;
    }
    while (r->count <= 56) {
        uint64_t byte = 0;
        if (r->in < r->end) byte = *r->in++;
        else r->padded++;
        r->bits |= byte << r->count;
        r->count += 8;
    }
}

static inline uint32_t take_bits(bit_reader *r, int n) {
    if (r->count < n) refill(r);
    uint32_t value = (uint32_t)(r->bits & ((1u << n) - 1));
    r->bits >>= n;
    r->count -= n;
    return value;
}

/* Whether the bits taken so far lie within the input. */
static inline int reader_within(const bit_reader *r) {
    return 8 * ((r->in - r->start) + r->padded) - r->count <= 8 * (r->end - r->start);
}

/* The canonical code of `lengths` (0: unused) into `code`; 0 unless complete: Kraft's sum exactly 1. */
static int build_code(const uint8_t *lengths, int symbols, uint16_t *count, uint16_t *symbol) {
    uint16_t offset[MAX_CODE_BITS + 2];
    memset(count, 0, (MAX_CODE_BITS + 1) * sizeof(uint16_t));
    for (int s = 0; s < symbols; s++) count[lengths[s]]++;
    int left = 1;
    for (int len = 1; len <= MAX_CODE_BITS; len++) {
        left = 2 * left - count[len];
        if (left < 0) return 0;
    }
    if (left != 0) return 0;
    offset[1] = 0;
    for (int len = 1; len <= MAX_CODE_BITS; len++) offset[len + 1] = offset[len] + count[len];
    for (int s = 0; s < symbols; s++)
        if (lengths[s]) symbol[offset[lengths[s]]++] = (uint16_t)s;
    return 1;
}

/* One symbol, a bit at a time (RFC 1951 canonical codes; zlib's puff.c). */
static int decode_canonical(bit_reader *r, const uint16_t *count, const uint16_t *symbol) {
    int code = 0, first = 0, index = 0;
    for (int len = 1; len <= MAX_CODE_BITS; len++) {
        code |= (int)take_bits(r, 1);
        int here = count[len];
        if (code - here < first) return symbol[index + (code - first)];
        index += here;
        first += here;
        first <<= 1;
        code <<= 1;
    }
    return -1;
}

/* Fill every `stride`-th entry of the table from `first` on with `entry`. */
static inline void fill_entries(uint32_t *table, int size, int first, int stride, uint32_t entry) {
    for (int i = first; i < size; i += stride) table[i] = entry;
}

/* The literal code of `lengths` (FIXED_LITERALS entries, 0: unused) with a table of `table_bits`
 * whose entries hold up to three literals; 0 unless the code is complete.
 *
 * The literals whose codes fit the table, in canonical order (shortest first), with their codes
 * bit-reversed as they are read. Each entry is written for its first literal, then again for each
 * pair, then for each triple that fits: stores only, no lookups that wait on each other. */
static int build_literal_code(const uint8_t *lengths, int table_bits, literal_code *h) {
    if (!build_code(lengths, FIXED_LITERALS, h->count, h->symbol)) return 0;
    uint32_t *table = h->table;
    const int size = 1 << table_bits;
    uint8_t literal[256], length[256];
    uint16_t reversed[256], codes[FIXED_LITERALS];
    int literals = 0, fitting = 0;
    h->table_bits = table_bits;
    memset(table, 0, size * sizeof(uint32_t));
    canonical_codes(lengths, FIXED_LITERALS, codes);
    for (int len = 1; len <= table_bits; len++) fitting += h->count[len];
    for (int index = 0; index < fitting; index++) { /* canonical order: shortest first */
        int s = h->symbol[index];
        if (s >= END_OF_BLOCK) continue; /* end of block, length codes: the canonical decode */
        literal[literals] = (uint8_t)s;
        length[literals] = lengths[s];
        reversed[literals++] = codes[s];
        fill_entries(table, size, codes[s], 1 << lengths[s], ENTRY(s, lengths[s], 1));
    }
    for (int x = 0; x < literals && 2 * length[x] <= table_bits; x++)
        for (int y = 0; y < literals && length[x] + length[y] <= table_bits; y++) {
            const int pair_bits = length[x] + length[y], pair = reversed[x] | reversed[y] << length[x];
            fill_entries(table, size, pair, 1 << pair_bits, ENTRY(literal[x] | literal[y] << 8, pair_bits, 2));
            for (int z = 0; z < literals && pair_bits + length[z] <= table_bits; z++)
                fill_entries(table, size, pair | reversed[z] << pair_bits, 1 << (pair_bits + length[z]),
                             ENTRY(literal[x] | literal[y] << 8 | literal[z] << 16, pair_bits + length[z], 3));
        }
    return 1;
}

enum { INFLATED, NOT_PROVEN };

/* An entry's three literal bytes at out[0..3), and out[3] overwritten (the caller leaves room). */
static inline void store_literals(uint8_t *out, uint32_t e) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint32_t literals = e >> 8;
    memcpy(out, &literals, 4); /* one store */
#else
    out[0] = (uint8_t)(e >> 8);
    out[1] = (uint8_t)(e >> 16);
    out[2] = (uint8_t)(e >> 24);
#endif
}

/* A dynamic block's header into its literal code (the distance code is checked complete, never used). */
static int read_dynamic_header(bit_reader *r, Py_ssize_t left, literal_code *h) {
    uint8_t lengths[FIXED_LITERALS + 32], code_lengths[LENGTH_CODES] = {0}, distance_lengths[32];
    uint16_t count[MAX_CODE_BITS + 1], symbol[FIXED_LITERALS];
    int literals = (int)take_bits(r, 5) + 257, distances = (int)take_bits(r, 5) + 1, header = (int)take_bits(r, 4) + 4;
    if (literals > 286 || distances > 30) return NOT_PROVEN;
    for (int k = 0; k < header; k++) code_lengths[length_code_order[k]] = (uint8_t)take_bits(r, 3);
    if (!build_code(code_lengths, LENGTH_CODES, count, symbol)) return NOT_PROVEN;
    for (int k = 0; k < literals + distances;) {
        int s = decode_canonical(r, count, symbol), repeat, value = 0;
        if (s < 0) return NOT_PROVEN;
        if (s < 16) {
            lengths[k++] = (uint8_t)s;
            continue;
        }
        if (s == 16) {
            if (k == 0) return NOT_PROVEN;
            value = lengths[k - 1];
            repeat = 3 + (int)take_bits(r, 2);
        } else repeat = s == 17 ? 3 + (int)take_bits(r, 3) : 11 + (int)take_bits(r, 7);
        if (k + repeat > literals + distances) return NOT_PROVEN;
        while (repeat--) lengths[k++] = (uint8_t)value;
    }
    if (!lengths[END_OF_BLOCK] || !reader_within(r)) return NOT_PROVEN;
    memcpy(distance_lengths, lengths + literals, distances);
    if (!build_code(distance_lengths, distances, count, symbol)) return NOT_PROVEN;
    memset(lengths + literals, 0, FIXED_LITERALS - literals);
    /* A block holds at most `left` literals: ~4 per table entry or more pays for its building. A code
     * whose shortest two codes do not fit the table gets no entries of several literals: then the
     * table need only reach its longest code (near-uniform planes: 8 or 9 bits, not 12). */
    int table_bits = 8, shortest = MAX_CODE_BITS, longest = 1;
    while (table_bits < LITERAL_TABLE_BITS && ((Py_ssize_t)4 << table_bits) < left) table_bits++;
    for (int s = 0; s <= END_OF_BLOCK; s++)
        if (lengths[s]) {
            shortest = lengths[s] < shortest ? lengths[s] : shortest;
            longest = lengths[s] > longest ? lengths[s] : longest;
        }
    if (2 * shortest > table_bits && longest < table_bits) table_bits = longest;
    return build_literal_code(lengths, table_bits, h) ? INFLATED : NOT_PROVEN;
}

/* A stored block's bytes into out[*at, size). */
static int copy_stored(bit_reader *r, uint8_t *out, Py_ssize_t *at, Py_ssize_t size) {
    take_bits(r, r->count & 7); /* to the byte boundary */
    uint32_t length = take_bits(r, 16), complement = take_bits(r, 16);
    if ((length ^ 0xFFFF) != complement || (Py_ssize_t)length > size - *at || !reader_within(r)) return NOT_PROVEN;
    for (; length && r->count >= 8; length--) out[(*at)++] = (uint8_t)take_bits(r, 8); /* whole bytes still buffered */
    if (!length) return INFLATED;
    if (r->padded || r->end - r->in < (Py_ssize_t)length) return NOT_PROVEN;
    memcpy(out + *at, r->in, length);
    *at += length;
    r->in += length;
    r->bits = 0; /* the buffer is empty: drop the copies of bytes just taken */
    return INFLATED;
}

static literal_code fixed_code; /* RFC 1951 3.2.6, built when the module loads */

static void build_fixed_code(void) {
    uint8_t lengths[FIXED_LITERALS];
    fixed_code_lengths(lengths);
    build_literal_code(lengths, LITERAL_TABLE_BITS, &fixed_code);
}

/* A plane being inflated: raw DEFLATE that must inflate to exactly `size` bytes and end at its last byte. */
typedef struct {
    bit_reader r;
    const literal_code *code; /* of the current Huffman block */
    uint8_t *out;
    Py_ssize_t at, size, length;
    int last, state;
    literal_code dynamic; /* the table of the lane's current dynamic block */
} lane;

enum { LANE_HEADER, LANE_LITERALS, LANE_DONE };
enum { LANE_READY = 2 }; /* beside INFLATED (the plane is done) and NOT_PROVEN */

static void start_lane(lane *l, const uint8_t *data, Py_ssize_t length, uint8_t *out, Py_ssize_t size) {
    l->r = (bit_reader){data, data, data + length, 0, 0, 0};
    l->code = NULL;
    l->out = out;
    l->at = 0;
    l->size = size;
    l->length = length;
    l->last = 0;
    l->state = LANE_HEADER;
}

/* Block headers, stored blocks and the symbols the table does not give (end of block, long codes, the
 * last literals of the plane or of the input) until the lane can take the fast loop (LANE_READY), its
 * plane is done (INFLATED) or not proven (NOT_PROVEN). */
static int ready_lane(lane *l) {
    bit_reader *r = &l->r;
    for (;;) {
        if (l->state == LANE_HEADER) {
            if (l->last) {
                Py_ssize_t used_bits = 8 * ((r->in - r->start) + r->padded) - r->count;
                l->state = LANE_DONE;
                return l->at == l->size && reader_within(r) && (used_bits + 7) / 8 == l->length ? INFLATED : NOT_PROVEN;
            }
            l->last = (int)take_bits(r, 1);
            int type = (int)take_bits(r, 2);
            if (type == 0) {
                if (copy_stored(r, l->out, &l->at, l->size) != INFLATED) return NOT_PROVEN;
                continue;
            }
            if (type == 1) l->code = &fixed_code;
            else if (type == 2 && read_dynamic_header(r, l->size - l->at, &l->dynamic) == INFLATED) l->code = &l->dynamic;
            else return NOT_PROVEN;
            l->state = LANE_LITERALS;
        }
        if (r->count < MAX_CODE_BITS) refill(r);
        const uint32_t e = l->code->table[r->bits & (((uint64_t)1 << l->code->table_bits) - 1)];
        if (e && l->size - l->at >= 16 && r->end - r->in >= 8) return LANE_READY;
        if (e && ENTRY_COUNT(e) == 1 && l->at < l->size) {
            l->out[l->at++] = (uint8_t)(e >> 8);
            r->bits >>= ENTRY_BITS(e);
            r->count -= (int)ENTRY_BITS(e);
            continue;
        }
        int s = decode_canonical(r, l->code->count, l->code->symbol);
        if (s == END_OF_BLOCK) {
            if (!reader_within(r)) return NOT_PROVEN;
            l->state = LANE_HEADER;
        } else if (s < 0 || s > 255 || l->at >= l->size) return NOT_PROVEN;
        else l->out[l->at++] = (uint8_t)s;
    }
}

/* The fast loop over one or two ready lanes, their readers in locals (stores through `out` could alias
 * their fields), until a lane meets an entry of 0 or runs short of room or input. Each refill gives 56
 * bits: four lookups of at most LITERAL_TABLE_BITS, four bytes stored each. Two lanes run side by side
 * because a lane's lookups wait on each other (the next index needs the last one's length): the
 * other lane's fill that wait. */
#define LANE_LOCALS(X, L)                                                                        \
    uint64_t bits##X = (L)->r.bits, mask##X = ((uint64_t)1 << (L)->code->table_bits) - 1;        \
    int count##X = (L)->r.count;                                                                 \
    const uint8_t *in##X = (L)->r.in, *const end##X = (L)->r.end;                                \
    const uint32_t *table##X = (L)->code->table;                                                 \
    uint8_t *out##X = (L)->out;                                                                  \
    Py_ssize_t at##X = (L)->at, room_end##X = (L)->size - 16;
#define LANE_STORE(X, L) ((L)->r.bits = bits##X, (L)->r.count = count##X, (L)->r.in = in##X, (L)->at = at##X)
#define LANE_CAN_GO(X) (at##X <= room_end##X && end##X - in##X >= 8)
#define LANE_REFILL(X)                                                                           \
    bits##X |= load_le64(in##X) << count##X;                                                     \
    in##X += (63 - count##X) >> 3;                                                               \
    count##X |= 56;
#define LANE_STEP(X)                                                                             \
    e##X = table##X[bits##X & mask##X];                                                          \
    if (!e##X) goto stop;                                                                        \
    store_literals(out##X + at##X, e##X);                                                        \
    at##X += ENTRY_COUNT(e##X);                                                                  \
    bits##X >>= ENTRY_BITS(e##X);                                                                \
    count##X -= (int)ENTRY_BITS(e##X);

static void run_lane(lane *a) {
    LANE_LOCALS(A, a)
    uint32_t eA;
    while (LANE_CAN_GO(A)) {
        LANE_REFILL(A)
        LANE_STEP(A) LANE_STEP(A) LANE_STEP(A) LANE_STEP(A)
    }
stop:
    LANE_STORE(A, a);
}

static void run_lanes(lane *a, lane *b) {
    LANE_LOCALS(A, a)
    LANE_LOCALS(B, b)
    uint32_t eA, eB;
    while (LANE_CAN_GO(A) && LANE_CAN_GO(B)) {
        LANE_REFILL(A)
        LANE_REFILL(B)
        LANE_STEP(A) LANE_STEP(B) LANE_STEP(A) LANE_STEP(B) LANE_STEP(A) LANE_STEP(B) LANE_STEP(A) LANE_STEP(B)
    }
stop:
    LANE_STORE(A, a);
    LANE_STORE(B, b);
}
#undef LANE_LOCALS
#undef LANE_STORE
#undef LANE_CAN_GO
#undef LANE_REFILL
#undef LANE_STEP

/* Every plane, two at a time while two are left: INFLATED, or NOT_PROVEN at the first plane that is not. */
static int inflate_all(const uint8_t *const *source, const Py_ssize_t *length, uint8_t *const *out, const Py_ssize_t *size, int count,
                       lane *lanes) {
    int next = 0, active = 0;
    lane *running[2];
    for (int k = 0; k < 2 && next < count; k++, next++, active++) {
        start_lane(&lanes[k], source[next], length[next], out[next], size[next]);
        running[k] = &lanes[k];
    }
    while (active) {
        for (int k = 0; k < active; k++) {
            int status;
            while ((status = ready_lane(running[k])) == INFLATED) { /* done: the lane takes the next plane */
                if (next == count) break;
                start_lane(running[k], source[next], length[next], out[next], size[next]);
                next++;
            }
            if (status == NOT_PROVEN) return NOT_PROVEN;
            if (status == INFLATED) { /* no plane left for it */
                running[k] = running[--active];
                k--;
            }
        }
        if (active == 2) run_lanes(running[0], running[1]);
        else if (active == 1) run_lane(running[0]);
    }
    return INFLATED;
}

/* The inverse of pack_symbols in place: `plane` holds n symbols' bytes, the packed bytes at its end; 0 when
 * the last packed byte's unused bits are not 0 (a stream pack_symbols did not write). Forward is safe: the
 * packed byte of symbol j sits at or after byte j, so no byte is overwritten before it is read. */
static int unpack_symbols(uint8_t *plane, Py_ssize_t n, int packing) {
    const Py_ssize_t size = packed_size(n, packing), last = n - ((size - 1) << packing);
    const int per_byte = 1 << packing, bits = 8 >> packing, mask = (1 << bits) - 1;
    const uint8_t *packed = plane + n - size;
    if (last < per_byte && packed[size - 1] >> (last * bits)) return 0;
    /* Whole bytes first, the field count a constant (unrolled; a variable shift per symbol took longer than
     * inflating: MiniLM bf16's first stage inflated in 18.8 ms, now 8.2), each byte read before its fields are
     * written; then the last byte's fields. */
#define UNPACK_WHOLE(PER_BYTE, BITS)                                                                 \
    for (Py_ssize_t k = 0; k < n / (PER_BYTE); k++) {                                               \
        const uint8_t byte = packed[k];                                                             \
        for (int f = 0; f < (PER_BYTE); f++) plane[k * (PER_BYTE) + f] = (uint8_t)((byte >> (f * (BITS))) & mask); \
    }
    switch (packing) {
    case 1: UNPACK_WHOLE(2, 4) break;
    case 2: UNPACK_WHOLE(4, 2) break;
    default: UNPACK_WHOLE(8, 1) break;
    }
#undef UNPACK_WHOLE
    for (Py_ssize_t i = n / per_byte * per_byte; i < n; i++)
        plane[i] = (uint8_t)((packed[i >> packing] >> ((i & (per_byte - 1)) * bits)) & mask);
    return 1;
}

/* inflate_stream(stream, counts) -> (plane_counts, planes) or None
 *
 * entropy.inflate_planes in one call: each context's plane count (256 bytes) and its inflated
 * planes (bytes of counts[c] each, a packed plane unpacked) in stream order; None when the stream's
 * layout does not fit `counts` (256 native int64), a plane is not one this decoder proves (see above)
 * or a packed plane's last byte has unused bits set. */
static PyObject *inflate_stream(PyObject *self, PyObject *args) {
    Py_buffer stream, count_buffer;
    if (!PyArg_ParseTuple(args, "y*y*", &stream, &count_buffer)) return NULL;
    PyObject *result = NULL, *planes = NULL;
    struct {
        const uint8_t *source[CONTEXTS * 8];
        uint8_t *out[CONTEXTS * 8];
        Py_ssize_t length[CONTEXTS * 8], size[CONTEXTS * 8], symbols[CONTEXTS * 8]; /* size: inflated bytes */
        int packing[CONTEXTS * 8];
        lane lanes[2];
    } *work = NULL; /* ~100 KB: off the stack of the calling thread */
    uint8_t width[CONTEXTS] = {0};
    int plane_count = 0, status = INFLATED;
    if (count_buffer.len != CONTEXTS * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "counts must be 256 native int64");
        goto done;
    }
    if (!(work = malloc(sizeof(*work)))) {
        PyErr_NoMemory();
        goto done;
    }
    const uint8_t **source = work->source;
    Py_ssize_t *length = work->length, *size = work->size, *symbols = work->symbols;
    int *packing = work->packing;
    const int64_t *counts = count_buffer.buf;
    const uint8_t *in = stream.buf;
    const Py_ssize_t end = stream.len;
    Py_ssize_t offset = 0;
    /* The layout: per present context a plane count, the planes' lengths, the planes; nothing after. */
    for (int c = 0; c < CONTEXTS && status == INFLATED; c++) {
        if (!counts[c]) continue;
        const int planes_here = offset < end ? in[offset] & 15 : 0, packed = offset < end ? in[offset] >> 4 : 0;
        if (counts[c] < 0 || offset >= end || planes_here > 8 || packed > 3 || (packed && !planes_here) ||
            end - offset - 1 < 4 * planes_here) {
            status = NOT_PROVEN;
            break;
        }
        width[c] = (uint8_t)planes_here;
        offset++;
        const uint8_t *lengths = in + offset;
        offset += 4 * width[c];
        for (int p = 0; p < width[c]; p++, plane_count++) {
            const uint8_t *at = lengths + 4 * p;
            length[plane_count] = (Py_ssize_t)((uint32_t)at[0] | (uint32_t)at[1] << 8 | (uint32_t)at[2] << 16 | (uint32_t)at[3] << 24);
            symbols[plane_count] = (Py_ssize_t)counts[c];
            packing[plane_count] = p == width[c] - 1 ? packed : 0; /* packing is the top plane's */
            size[plane_count] = packed_size((Py_ssize_t)counts[c], packing[plane_count]);
            source[plane_count] = in + offset;
            if (end - offset < length[plane_count]) {
                status = NOT_PROVEN;
                break;
            }
            offset += length[plane_count];
        }
    }
    if (status != INFLATED || offset != end) goto not_proven;
    if (!(planes = PyList_New(plane_count))) goto done;
    for (int p = 0; p < plane_count; p++) {
        PyObject *plane = PyBytes_FromStringAndSize(NULL, symbols[p]);
        if (!plane) goto done;
        PyList_SET_ITEM(planes, p, plane);
    }
    for (int p = 0; p < plane_count; p++) /* a packed plane inflates into the end of its symbols' bytes */
        work->out[p] = (uint8_t *)PyBytes_AS_STRING(PyList_GET_ITEM(planes, p)) + symbols[p] - size[p];
    Py_BEGIN_ALLOW_THREADS
    status = inflate_all(source, length, work->out, size, plane_count, work->lanes);
    for (int p = 0; p < plane_count && status == INFLATED; p++)
        if (packing[p] && !unpack_symbols(work->out[p] - (symbols[p] - size[p]), symbols[p], packing[p])) status = NOT_PROVEN;
    Py_END_ALLOW_THREADS
    if (status != INFLATED) goto not_proven;
    result = Py_BuildValue("(y#O)", (const char *)width, (Py_ssize_t)CONTEXTS, planes);
    goto done;
not_proven:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(planes);
    free(work);
    PyBuffer_Release(&stream);
    PyBuffer_Release(&count_buffer);
    return result;
}

static PyMethodDef methods[] = {
    {"histogram", histogram, METH_VARARGS, "Counts of each uint8 context: bytes of 256 native int64."},
    {"join_planes", join_planes, METH_VARARGS, "Symbols in element order from their contexts' byte planes (the encoder's inverse)."},
    {"residual", residual, METH_VARARGS, "Zigzag-coded ordered-integer residual of float bit patterns."},
    {"restore", restore, METH_VARARGS, "Inverse of residual: the original float bit patterns."},
    {"contexts", contexts, METH_VARARGS, "Lossless coding context: relative exponent of reconstruction and step, clamped."},
    {"unpack_codes", unpack_codes, METH_VARARGS, "Signed int32 codes from ladder.pack's bit stream."},
    {"pack_groups", pack_groups, METH_VARARGS, "A coded base's packed codes from their planes, group by group; returns the OR of the codes."},
    {"refinement_contexts", refinement_contexts, METH_VARARGS, "Refinement contexts of coarse codes, and their histogram."},
    {"refine", refine, METH_VARARGS, "Raise coarse codes in place by the refinements their byte planes hold."},
    {"reconstruct", reconstruct, METH_VARARGS, "Dequantize codes to the source dtype, optionally with lossless contexts."},
    {"choose_grids", choose_grids, METH_VARARGS, "Each group's base grid: float16 scale and offset of least squared error."},
    {"quantize_groups", quantize_groups, METH_VARARGS, "Signed codes of float32 groups on their grids, as ladder.quantize."},
    {"lossless_symbols", lossless_symbols, METH_VARARGS, "Lossless contexts and zigzag residuals of a block against its reconstruction."},
    {"base_stage", base_stage, METH_VARARGS, "Packed base codes, their contexts and the first stage's refinements from top codes."},
    {"stage_refinements", stage_refinements, METH_VARARGS, "Coarse codes and refinements of one integer stage from top codes."},
    {"restore_planes", restore_planes, METH_VARARGS, "Add the residuals their byte planes hold to float bit patterns, in place."},
    {"encode_stream", encode_stream, METH_VARARGS, "Group symbols by context into byte planes, each coded as Huffman-only raw DEFLATE."},
    {"packed_contexts", packed_contexts, METH_VARARGS, "Histogram of the refinement contexts of packed base codes."},
    {"inflate_stream", inflate_stream, METH_VARARGS, "A stream's plane counts and inflated planes, or None where zlib must decide."},
    {"decode_refined", decode_refined, METH_VARARGS, "Unpack, refine one stage and dequantize base codes in one pass."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "Native loops of the p2u codec.", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    build_fixed_code();
    return PyModule_Create(&module);
}
