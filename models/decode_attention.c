/* Decode attention on the CPU: the G query heads of each key/value head, one new token, over the
 * L cached keys of one sequence, in bf16 with fp32 accumulation.
 *
 * Why: torch's CPU flash attention runs this shape (8 query rows, 128-dim heads, keys in a cache
 * that grows a key a step) at ~60 GFLOP/s on 2 cores that do ~400, so at 4k keys attention adds
 * almost half to a 0.3B decode step. Here each key is read once for all G <= 8 heads (padded to
 * 8), the dot products are AVX512-BF16's, and the keys are split into chunks over the threads
 * (flash-decoding), whose partial softmaxes are merged at the end: 2-2.7x faster than torch's at
 * 2-4k keys (bench/bench_decode_attention.py).
 *
 * Built and loaded by models/cpu_kernels.py (cc -O3 -march=native -fopenmp); on a CPU without
 * AVX512-BF16 the build fails and the model keeps torch's attention. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <immintrin.h>
#if !defined(__AVX512F__) || !defined(__AVX512BF16__)
#error "needs AVX512-BF16; without it the model uses torch's attention"
#endif

#define MAX_D 256

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

/* The sums of the 16 lanes of each of a[0..7], in order, as 8 floats: a transposing reduction
 * tree, 3 instructions a vector instead of a full reduction each. */
static inline __m256 sum_lanes_8(const __m512 a[8]) {
    __m512 b[4], c[2];
    for (int i = 0; i < 4; i++) /* [a_i 256-bit halves summed | a_i+4 halves summed] */
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], 0x44), _mm512_shuffle_f32x4(a[i], a[i + 4], 0xEE));
    for (int i = 0; i < 2; i++) /* 128-bit blocks: [a_i, a_i+4, a_i+2, a_i+6] (i = 0, 1) */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[i], b[i + 2], 0x88), _mm512_shuffle_f32x4(b[i], b[i + 2], 0xDD));
    __m512 e = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
    __m512 f = _mm512_add_ps(e, _mm512_permute_ps(e, 0x4E)); /* lanes 0, 1 of each block: a_j, a_j+1 */
    __m512i order = _mm512_setr_epi32(0, 1, 8, 9, 4, 5, 12, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, f));
}

/* exp(x) for x <= 0 (scores minus their maximum): 2^(x log2 e) = 2^n * 2^f with a degree-6
 * polynomial for 2^f, f in [-0.5, 0.5]; relative error ~2e-7. */
static inline __m512 exp_nonpositive(__m512 x) {
    __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-100.f)), _mm512_set1_ps(1.44269504f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n), p = _mm512_set1_ps(1.5353362e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3398874e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6184439e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503370e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022652e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* Scores of keys [0, n) for the 8 query heads q [8, D], scaled, key-major: scores[l * 8 + g]. */
static void scores_of(const uint16_t *q, const uint16_t *k, int64_t key_stride, int64_t n, int D, float scale,
                      float *scores) {
    const int chunks = D / 32;
    int64_t l = 0;
    for (; l + 2 <= n; l += 2) {
        const uint16_t *key = k + l * key_stride;
        for (int64_t ahead = 8 * key_stride; ahead < 10 * key_stride; ahead += 32) /* 8 keys on */
            _mm_prefetch((const char *)(key + ahead), _MM_HINT_T0);
        __m512 acc[2][8];
        for (int g = 0; g < 8; g++) acc[0][g] = acc[1][g] = _mm512_setzero_ps();
        for (int c = 0; c < chunks; c++) {
            __m512bh k0 = (__m512bh)_mm512_loadu_si512(key + 32 * c);
            __m512bh k1 = (__m512bh)_mm512_loadu_si512(key + key_stride + 32 * c);
            for (int g = 0; g < 8; g++) {
                __m512bh qc = (__m512bh)_mm512_loadu_si512(q + g * D + 32 * c);
                acc[0][g] = _mm512_dpbf16_ps(acc[0][g], qc, k0);
                acc[1][g] = _mm512_dpbf16_ps(acc[1][g], qc, k1);
            }
        }
        _mm256_storeu_ps(scores + l * 8, _mm256_mul_ps(sum_lanes_8(acc[0]), _mm256_set1_ps(scale)));
        _mm256_storeu_ps(scores + l * 8 + 8, _mm256_mul_ps(sum_lanes_8(acc[1]), _mm256_set1_ps(scale)));
    }
    if (l < n) { /* an odd last key: paired with itself */
        const uint16_t *key = k + l * key_stride;
        __m512 acc[8];
        for (int g = 0; g < 8; g++) acc[g] = _mm512_setzero_ps();
        for (int c = 0; c < chunks; c++)
            for (int g = 0; g < 8; g++)
                acc[g] = _mm512_dpbf16_ps(acc[g], (__m512bh)_mm512_loadu_si512(q + g * D + 32 * c),
                                          (__m512bh)_mm512_loadu_si512(key + 32 * c));
        _mm256_storeu_ps(scores + l * 8, _mm256_mul_ps(sum_lanes_8(acc), _mm256_set1_ps(scale)));
    }
}

/* In place: scores -> exp(scores - max) per head (two keys a vector); max[g] and sum[g] of the chunk. */
static void softmax_parts(float *scores, int64_t n, float *max, float *sum) {
    int64_t pairs = n / 2;
    __m512 m = _mm512_set1_ps(-INFINITY), s = _mm512_setzero_ps();
    for (int64_t i = 0; i < pairs; i++) m = _mm512_max_ps(m, _mm512_loadu_ps(scores + 16 * i));
    __m256 m8 = _mm256_max_ps(_mm512_castps512_ps256(m), _mm512_extractf32x8_ps(m, 1));
    if (n % 2) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(scores + 16 * pairs));
    m = _mm512_insertf32x8(_mm512_castps256_ps512(m8), m8, 1);
    for (int64_t i = 0; i < pairs; i++) {
        __m512 p = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(scores + 16 * i), m));
        _mm512_storeu_ps(scores + 16 * i, p);
        s = _mm512_add_ps(s, p);
    }
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
    if (n % 2) {
        __m512 last = _mm512_castps256_ps512(_mm256_loadu_ps(scores + 16 * pairs));
        __m256 p = _mm512_castps512_ps256(exp_nonpositive(_mm512_sub_ps(last, m)));
        _mm256_storeu_ps(scores + 16 * pairs, p);
        s8 = _mm256_add_ps(s8, p);
    }
    _mm256_storeu_ps(max, m8);
    _mm256_storeu_ps(sum, s8);
}

/* out[g] = sum over keys [0, n) of weights[l * 8 + g] * v[l], fp32 [8, D]. The weights are rounded
 * to bf16 (as torch's CPU flash attention does), so that one product takes two keys. */
static void weighted_values(float *weights, const uint16_t *v, int64_t key_stride, int64_t n, int D, float *out) {
    /* In place, each pair of keys (l, l + 1): 8 x [bf16 weight of l, of l + 1], one per head. */
    uint32_t *pairs = (uint32_t *)weights;
    int64_t n_pairs = (n + 1) / 2;
    for (int64_t i = 0; i < n_pairs; i++) {
        __m512 w = 2 * i + 1 < n ? _mm512_loadu_ps(weights + 16 * i)
                                 : _mm512_castps256_ps512(_mm256_loadu_ps(weights + 16 * i)); /* odd n */
        if (2 * i + 1 >= n) w = _mm512_insertf32x8(w, _mm256_setzero_ps(), 1);
        __m256i w16 = (__m256i)_mm512_cvtneps_pbh(w);
        __m128i first = _mm256_castsi256_si128(w16), second = _mm256_extracti128_si256(w16, 1);
        _mm_storeu_si128((__m128i *)(pairs + 8 * i), _mm_unpacklo_epi16(first, second));
        _mm_storeu_si128((__m128i *)(pairs + 8 * i + 4), _mm_unpackhi_epi16(first, second));
    }
    const __m512i low_dims = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i high_dims = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int g = 0; g < 8; g++) memset(out + g * D, 0, sizeof(float) * D);
    /* Blocks of 32 pairs (16 KB of values at D = 128, which stay in L1 across the passes over
     * their dims): 32 dims a pass, 8 heads x 2 vectors of sums in registers. */
    for (int64_t block = 0; block < n_pairs; block += 32) {
        int64_t end = block + 32 < n_pairs ? block + 32 : n_pairs;
        for (int64_t key = 2 * end; key < 2 * end + 64 && key < n; key++) /* the next block */
            for (int d = 0; d < D; d += 32) _mm_prefetch((const char *)(v + key * key_stride + d), _MM_HINT_T1);
        for (int c = 0; c < D / 32; c++) {
            __m512 acc[8][2];
            for (int g = 0; g < 8; g++) acc[g][0] = acc[g][1] = _mm512_setzero_ps();
            for (int64_t i = block; i < end; i++) {
                const uint16_t *row = v + 2 * i * key_stride + 32 * c;
                __m512i v0 = _mm512_loadu_si512(row), v1 = 2 * i + 1 < n ? _mm512_loadu_si512(row + key_stride) : v0;
                /* dims {0-3, 8-11, 16-19, 24-27} and {4-7, ...} of both keys, interleaved */
                __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(v0, v1), hi = (__m512bh)_mm512_unpackhi_epi16(v0, v1);
                for (int g = 0; g < 8; g++) {
                    __m512bh w = (__m512bh)_mm512_set1_epi32((int)pairs[8 * i + g]);
                    acc[g][0] = _mm512_dpbf16_ps(acc[g][0], w, lo);
                    acc[g][1] = _mm512_dpbf16_ps(acc[g][1], w, hi);
                }
            }
            for (int g = 0; g < 8; g++) {
                float *dst = out + g * D + 32 * c;
                _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), _mm512_permutex2var_ps(acc[g][0], low_dims, acc[g][1])));
                _mm512_storeu_ps(dst + 16, _mm512_add_ps(_mm512_loadu_ps(dst + 16), _mm512_permutex2var_ps(acc[g][0], high_dims, acc[g][1])));
            }
        }
    }
}

/* This thread's buffer of at least n floats, kept between calls: a fresh one of this size (up to
 * 256 KB at 8k keys) would come from mmap, and page faults, every call. */
static float *scratch(int64_t n) {
    static __thread float *buffer;
    static __thread int64_t capacity;
    if (n > capacity) {
        free(buffer);
        buffer = malloc(sizeof(float) * n);
        capacity = buffer ? n : 0;
    }
    return buffer;
}

/* q [H, G, D] (contiguous); k, v: H heads of L keys, head h's key l at h * head_stride + l *
 * key_stride (elements); out [H, G, D]. Returns 0, or -1 for a shape it does not take. */
int decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int H, int G, int D,
                     int64_t L, int64_t head_stride, int64_t key_stride, float scale) {
    if (G > 8 || D > MAX_D || D % 32 || L < 1) return -1;
    /* Enough chunks of keys for every thread; none shorter than 64 keys. */
    int64_t chunks = (omp_get_max_threads() + H - 1) / H, min_chunk = 64;
    if (chunks > (L + min_chunk - 1) / min_chunk) chunks = (L + min_chunk - 1) / min_chunk;
    int64_t per_chunk = (L + chunks - 1) / chunks;
    chunks = (L + per_chunk - 1) / per_chunk; /* none empty */
    int64_t tasks = H * chunks;
    float *part_max = malloc(sizeof(float) * tasks * 8), *part_sum = malloc(sizeof(float) * tasks * 8);
    float *part_out = malloc(sizeof(float) * tasks * 8 * D);
    int failed = 0;
#pragma omp parallel for schedule(static) reduction(| : failed)
    for (int64_t task = 0; task < tasks; task++) {
        int64_t h = task / chunks, first = task % chunks * per_chunk;
        int64_t n = L - first < per_chunk ? L - first : per_chunk;
        float *scores = scratch(per_chunk * 8);
        if (!scores || !part_max || !part_sum || !part_out) {
            failed = 1;
            continue;
        }
        uint16_t q8[8 * MAX_D] = {0}; /* the G heads, padded to 8 with zeros */
        memcpy(q8, q + h * G * D, sizeof(uint16_t) * G * D);
        const int64_t offset = h * head_stride + first * key_stride;
        scores_of(q8, k + offset, key_stride, n, D, scale, scores);
        softmax_parts(scores, n, part_max + task * 8, part_sum + task * 8);
        weighted_values(scores, v + offset, key_stride, n, D, part_out + task * 8 * D);
    }
    for (int64_t h = 0; h < H && !failed; h++) /* merge the chunks: rescale each to the overall maximum */
        for (int g = 0; g < G; g++) {
            float max = -INFINITY, sum = 0.f, acc[MAX_D] = {0};
            for (int64_t c = 0; c < chunks; c++) max = fmaxf(max, part_max[(h * chunks + c) * 8 + g]);
            for (int64_t c = 0; c < chunks; c++) {
                int64_t part = (h * chunks + c) * 8 + g;
                float w = expf(part_max[part] - max);
                sum += w * part_sum[part];
                for (int d = 0; d < D; d++) acc[d] += w * part_out[part * D + d];
            }
            for (int d = 0; d < D; d++) out[(h * G + g) * D + d] = float_to_bf16(acc[d] / sum);
        }
    free(part_max), free(part_sum), free(part_out);
    return failed ? -1 : 0;
}
