// Float head for decode: y[m, n] = sum_k W[n, k] * x[m, k] for a few rows x (the lm_head, which BitNet keeps in
// floating point), W float32 or bf16 [N, K]. At batch 1 this is a pure weight stream (Qwen3-0.6B: 622 MB fp32,
// 311 MB bf16 a token), so the loop is built for streaming:
// - each thread takes one contiguous range of rows (OpenMP static) and reads it front to back, one row at a time:
//   one sequential stream per core. (The previous version interleaved 4 rows, i.e. 4 streams 2-4 KB apart, and
//   streamed at less than half the rate of a plain read; software prefetch on top of a sequential stream lost here.)
// - bf16 -> fp32 without any lane shuffle: a 64-byte load holds 32 bf16 = 16 pairs; (pair << 16) is the even
//   element as fp32 and (pair & 0xffff0000) the odd one, exactly (bf16 is the top half of an fp32). x is split once
//   per call into its even and odd elements to match.
// Numerics: products and sums in float32 with fused multiply-adds; per row 4 vector accumulators (64 lanes with
// AVX-512, 32 with AVX2), summed pairwise then across lanes. Deterministic (no dependence on the thread count);
// differs from torch's matmul only by float32 summation order.
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define TH_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define TH_AVX2 1
#include <immintrin.h>
#endif

#if defined(TH_AVX512)
static constexpr int64_t CHUNK = 32;  // bf16 elements per even/odd chunk (one 64-byte load)
#elif defined(TH_AVX2)
static constexpr int64_t CHUNK = 16;
#else
static constexpr int64_t CHUNK = 2;
#endif

static inline float bf16_to_f32(uint16_t v) {
    const uint32_t u = (uint32_t)v << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// ------------------------------------------------------------------------------------------------ float32 rows
static inline float dot_f32(const float* __restrict w, const float* __restrict x, int64_t K) {
#if defined(TH_AVX512)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);
    }
    for (; k < K; k += 16) {  // masked tail: the lanes past K load as zeros
        const __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + k), _mm512_maskz_loadu_ps(m, x + k), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(TH_AVX2)
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    float s = _mm_cvtss_f32(v);
    for (; k < K; k++) s += w[k] * x[k];
    return s;
#else
    float s = 0.0f;
    for (int64_t k = 0; k < K; k++) s += w[k] * x[k];
    return s;
#endif
}

// --------------------------------------------------------------------------------------------------- bf16 rows
// xd: x with each CHUNK of elements stored as its even elements then its odd ones, zero-padded to a whole chunk.
static void split_even_odd(const float* x, int64_t K, float* xd) {
    const int64_t Kc = (K + CHUNK - 1) / CHUNK * CHUNK;
    for (int64_t c = 0; c < Kc; c += CHUNK)
        for (int64_t i = 0; i < CHUNK / 2; i++) {
            xd[c + i] = c + 2 * i < K ? x[c + 2 * i] : 0.0f;
            xd[c + CHUNK / 2 + i] = c + 2 * i + 1 < K ? x[c + 2 * i + 1] : 0.0f;
        }
}

static inline float dot_bf16(const uint16_t* __restrict w, const float* __restrict xd, int64_t K) {
#if defined(TH_AVX512)
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        const __m512i v0 = _mm512_loadu_si512((const void*)(w + k)), v1 = _mm512_loadu_si512((const void*)(w + k + 32));
        a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v0, 16)), _mm512_loadu_ps(xd + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v0, hi)), _mm512_loadu_ps(xd + k + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v1, 16)), _mm512_loadu_ps(xd + k + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v1, hi)), _mm512_loadu_ps(xd + k + 48), a3);
    }
    for (; k < K; k += 32) {  // masked tail: bf16 past K load as zeros (and xd is zero there)
        const __mmask32 m = K - k >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (K - k)) - 1);
        const __m512i v = _mm512_maskz_loadu_epi16(m, (const void*)(w + k));
        a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), _mm512_loadu_ps(xd + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi)), _mm512_loadu_ps(xd + k + 16), a1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(TH_AVX2)
    const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m256i v0 = _mm256_loadu_si256((const __m256i*)(w + k));
        const __m256i v1 = _mm256_loadu_si256((const __m256i*)(w + k + 16));
        a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), _mm256_loadu_ps(xd + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, hi)), _mm256_loadu_ps(xd + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)), _mm256_loadu_ps(xd + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v1, hi)), _mm256_loadu_ps(xd + k + 24), a3);
    }
    __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    float s = _mm_cvtss_f32(v);
    for (; k < K; k++) {  // xd holds element k at its even/odd slot of the chunk
        const int64_t c = k / CHUNK * CHUNK, i = k - c;
        s += bf16_to_f32(w[k]) * xd[c + (i & 1) * (CHUNK / 2) + i / 2];
    }
    return s;
#else
    float s = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        const int64_t c = k / CHUNK * CHUNK, i = k - c;
        s += bf16_to_f32(w[k]) * xd[c + (i & 1) * (CHUNK / 2) + i / 2];
    }
    return s;
#endif
}

// ------------------------------------------------------------------------------------------------ entry points
// Rows outermost: a weight row is read from memory once and, for M > 1, reused from L1 for the other tokens.
extern "C" void tk_head_f32(const float* w, int64_t N, int64_t K, const float* x, int M, float* y, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && N > 1)
    for (int64_t n = 0; n < N; n++)
        for (int m = 0; m < M; m++) y[(int64_t)m * N + n] = dot_f32(w + n * K, x + (int64_t)m * K, K);
}

extern "C" void tk_head_bf16(const uint16_t* w, int64_t N, int64_t K, const float* x, int M, float* y, int nthreads) {
    const int64_t Kc = (K + CHUNK - 1) / CHUNK * CHUNK;
    std::vector<float> xd((size_t)M * Kc);
    for (int m = 0; m < M; m++) split_even_odd(x + (int64_t)m * K, K, xd.data() + (int64_t)m * Kc);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && N > 1)
    for (int64_t n = 0; n < N; n++)
        for (int m = 0; m < M; m++) y[(int64_t)m * N + n] = dot_bf16(w + n * K, xd.data() + (int64_t)m * Kc, K);
}
