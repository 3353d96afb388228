// Ternary x int8 matrix product for the CPU: y = x . W^T with W in {-1, 0, +1} packed 2 bits a weight.
//
// Weight layout ("i2", see cpu_ref/packing.py): row n holds K_pad / 4 bytes, K_pad = K rounded up to 256. A block of
// 256 weights is 64 bytes; byte j of a block holds the weights j, j + 64, j + 128, j + 192 of that block in bits
// 0-1, 2-3, 4-5, 6-7, each stored as q = code + 1 in {0, 1, 2} (3 never occurs). That order makes unpacking one shift
// and one AND per 64 weights, each giving 64 *contiguous* weights that line up with 64 contiguous activation bytes.
//
// Exactness: with q = code + 1, sum_k code_k x_k = sum_k q_k x_k - sum_k x_k. q is unsigned and small, x is signed
// int8, which is exactly the operand form of the u8 x s8 dot instructions (AVX-512 VNNI vpdpbusd, AVX2
// vpmaddubsw + vpmaddwd). Products are at most 2 * 128, pairs at most 512: no int16 saturation, and the int32
// accumulation is exact for K < 2^23 / 2. The result equals the int32 reference bit for bit.
//
// Threads: OpenMP over groups of 4 weight rows (each weight byte is read once per call; the activations, small, are
// shared through the caches). Within a group, a register tile of 4 rows x up to 4 tokens: each unpacked weight
// vector is used for 4 tokens, each activation vector for 4 rows.
//
// Built by cpu_ref/_build.py with g++ -O3 -march=native -fopenmp; the ISA path is chosen at compile time.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define TK_AVX512VNNI 1
#include <immintrin.h>
#elif defined(__AVX2__)
#define TK_AVX2 1
#include <immintrin.h>
#endif

static constexpr int BLOCK = 256;         // weights per packed block
static constexpr int BLOCK_BYTES = 64;    // bytes per packed block

extern "C" const char* tk_isa() {
#if defined(TK_AVX512VNNI)
    return "avx512vnni";
#elif defined(TK_AVX2)
    return "avx2";
#else
    return "scalar";
#endif
}

// acc[r][t] = sum over the K_pad weights of row r (packed, q in {0,1,2}) times token t's int8 activations.
template <int NR, int MR>
static inline void tile_dot(const uint8_t* __restrict w, int64_t ldw, const int8_t* __restrict x, int64_t ldx,
                            int nblocks, int32_t acc_out[NR][MR]) {
#if defined(TK_AVX512VNNI)
    __m512i acc[NR][MR];
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MR; t++) acc[r][t] = _mm512_setzero_si512();
    const __m512i mask = _mm512_set1_epi8(3);
    for (int b = 0; b < nblocks; b++) {
        __m512i packed[NR];
        for (int r = 0; r < NR; r++) packed[r] = _mm512_loadu_si512((const void*)(w + r * ldw + b * BLOCK_BYTES));
#pragma GCC unroll 4
        for (int s = 0; s < 4; s++) {
            __m512i xs[MR];
            for (int t = 0; t < MR; t++)
                xs[t] = _mm512_loadu_si512((const void*)(x + t * ldx + (int64_t)b * BLOCK + s * 64));
            for (int r = 0; r < NR; r++) {
                // 16-bit shift is fine: the AND drops the bits that crossed from the neighbouring byte.
                __m512i q = _mm512_and_si512(_mm512_srli_epi16(packed[r], 2 * s), mask);
                for (int t = 0; t < MR; t++) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], q, xs[t]);
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MR; t++) acc_out[r][t] = _mm512_reduce_add_epi32(acc[r][t]);
#elif defined(TK_AVX2)
    __m256i acc[NR][MR];
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MR; t++) acc[r][t] = _mm256_setzero_si256();
    const __m256i mask = _mm256_set1_epi8(3);
    const __m256i ones16 = _mm256_set1_epi16(1);
    for (int b = 0; b < nblocks; b++) {
        for (int h = 0; h < 2; h++) {  // bytes 32h..32h+31 of the block: weights 64s + 32h + (0..31)
            __m256i packed[NR];
            for (int r = 0; r < NR; r++)
                packed[r] = _mm256_loadu_si256((const __m256i*)(w + r * ldw + b * BLOCK_BYTES + 32 * h));
#pragma GCC unroll 4
            for (int s = 0; s < 4; s++) {
                __m256i xs[MR];
                for (int t = 0; t < MR; t++)
                    xs[t] = _mm256_loadu_si256((const __m256i*)(x + t * ldx + (int64_t)b * BLOCK + 64 * s + 32 * h));
                for (int r = 0; r < NR; r++) {
                    __m256i q = _mm256_and_si256(_mm256_srli_epi16(packed[r], 2 * s), mask);
                    for (int t = 0; t < MR; t++) {
                        __m256i p16 = _mm256_maddubs_epi16(q, xs[t]);  // |pair| <= 512: never saturates
                        acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(p16, ones16));
                    }
                }
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MR; t++) {
            __m128i v = _mm_add_epi32(_mm256_castsi256_si128(acc[r][t]), _mm256_extracti128_si256(acc[r][t], 1));
            v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4E));
            v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xB1));
            acc_out[r][t] = _mm_cvtsi128_si32(v);
        }
#else
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MR; t++) {
            int32_t a = 0;
            for (int b = 0; b < nblocks; b++)
                for (int j = 0; j < BLOCK_BYTES; j++) {
                    const uint8_t byte = w[r * ldw + b * BLOCK_BYTES + j];
                    for (int s = 0; s < 4; s++)
                        a += (int32_t)((byte >> (2 * s)) & 3) * x[t * ldx + (int64_t)b * BLOCK + 64 * s + j];
                }
            acc_out[r][t] = a;
        }
#endif
}

// Epilogue shared by the int32 and the float entry points.
struct Epilogue {
    int32_t* out_i32;          // [M, N] exact integer result, or null
    float* out_f32;            // [M, N] float result, or null
    const float* x_scale;      // [M] per-token activation scale
    const float* w_scale;      // [1] per-tensor or [N] per-row weight scale
    int w_scale_per_row;
    const float* bias;         // [N] or null
};

template <int NR, int MR>
static inline void run_tile(const uint8_t* w, int64_t ldw, const int8_t* x, int64_t ldx, int nblocks,
                            const int32_t* xsum, int n0, int m0, int64_t N, const Epilogue& ep) {
    int32_t acc[NR][MR];
    tile_dot<NR, MR>(w + n0 * ldw, ldw, x + m0 * ldx, ldx, nblocks, acc);
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MR; t++) {
            const int n = n0 + r, m = m0 + t;
            const int32_t v = acc[r][t] - xsum[m];  // undo the +1 offset of the stored codes
            if (ep.out_i32) ep.out_i32[(int64_t)m * N + n] = v;
            if (ep.out_f32) {
                const float ws = ep.w_scale[ep.w_scale_per_row ? n : 0];
                float y = (float)v * (ep.x_scale[m] * ws);
                if (ep.bias) y += ep.bias[n];
                ep.out_f32[(int64_t)m * N + n] = y;
            }
        }
}

template <int NR>
static inline void rows_all_tokens(const uint8_t* w, int64_t ldw, const int8_t* x, int64_t ldx, int nblocks,
                                   const int32_t* xsum, int n0, int M, int64_t N, const Epilogue& ep) {
    int m = 0;
    for (; m + 4 <= M; m += 4) run_tile<NR, 4>(w, ldw, x, ldx, nblocks, xsum, n0, m, N, ep);
    switch (M - m) {
        case 3: run_tile<NR, 3>(w, ldw, x, ldx, nblocks, xsum, n0, m, N, ep); break;
        case 2: run_tile<NR, 2>(w, ldw, x, ldx, nblocks, xsum, n0, m, N, ep); break;
        case 1: run_tile<NR, 1>(w, ldw, x, ldx, nblocks, xsum, n0, m, N, ep); break;
        default: break;
    }
}

static void gemm(const int8_t* x, int M, int64_t K_pad, const uint8_t* w, int64_t N, const Epilogue& ep,
                 int nthreads) {
    const int64_t ldw = K_pad / 4, ldx = K_pad;
    const int nblocks = (int)(K_pad / BLOCK);
    int32_t* xsum = (int32_t*)std::malloc(sizeof(int32_t) * (M > 0 ? M : 1));
    for (int m = 0; m < M; m++) {
        int32_t s = 0;
        for (int64_t k = 0; k < K_pad; k++) s += x[m * ldx + k];
        xsum[m] = s;
    }
    const int64_t groups = (N + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t g = 0; g < groups; g++) {
        const int n0 = (int)(g * 4);
        switch (N - n0 >= 4 ? 4 : N - n0) {
            case 4: rows_all_tokens<4>(w, ldw, x, ldx, nblocks, xsum, n0, M, N, ep); break;
            case 3: rows_all_tokens<3>(w, ldw, x, ldx, nblocks, xsum, n0, M, N, ep); break;
            case 2: rows_all_tokens<2>(w, ldw, x, ldx, nblocks, xsum, n0, M, N, ep); break;
            default: rows_all_tokens<1>(w, ldw, x, ldx, nblocks, xsum, n0, M, N, ep); break;
        }
    }
    std::free(xsum);
}

// Exact integer product: out[m, n] = sum_k code[n, k] * x[m, k] (x: [M, K_pad] int8, zero past K).
extern "C" void tk_gemm_i32(const int8_t* x, int M, int64_t K_pad, const uint8_t* w, int64_t N, int32_t* out,
                            int nthreads) {
    Epilogue ep{out, nullptr, nullptr, nullptr, 0, nullptr};
    gemm(x, M, K_pad, w, N, ep, nthreads);
}

// Per-token int8 quantization of one row, optionally after RMSNorm, mirroring bitkernels.reference:
//   h = x * rsqrt(mean(x^2) + norm_eps) * norm_w          (float32; only when norm_w is given)
//   a = max(max|h|, act_eps); codes = clip(round_half_even(h * (127 * (1/a))), -128, 127); scale = a * (1/127)
// The absmax path is bit-exact with the reference; the RMS sum may differ in the last bit (summation order).
static void quantize_row(const float* x, int64_t K, int64_t K_pad, const float* norm_w, float norm_eps,
                         float act_eps, int8_t* codes, float* scale, float* tmp) {
    const float* h = x;
    if (norm_w) {
        double ss = 0.0;
        for (int64_t k = 0; k < K; k++) ss += (double)x[k] * (double)x[k];
        const float mean = (float)(ss / (double)K);
        const float r = 1.0f / std::sqrt(mean + norm_eps);
        for (int64_t k = 0; k < K; k++) tmp[k] = (x[k] * r) * norm_w[k];
        h = tmp;
    }
    float amax = 0.0f;
    for (int64_t k = 0; k < K; k++) amax = std::fmax(amax, std::fabs(h[k]));
    amax = std::fmax(amax, act_eps);
    const float mult = (1.0f / amax) * 127.0f;
    for (int64_t k = 0; k < K; k++) {
        float q = std::nearbyint(h[k] * mult);  // default rounding mode: half to even
        q = std::fmin(std::fmax(q, -128.0f), 127.0f);
        codes[k] = (int8_t)q;
    }
    for (int64_t k = K; k < K_pad; k++) codes[k] = 0;
    *scale = amax * (1.0f / 127.0f);
}

extern "C" void tk_quantize(const float* x, int M, int64_t K, int64_t K_pad, const float* norm_w, float norm_eps,
                            float act_eps, int8_t* codes, float* scales, int nthreads) {
#pragma omp parallel num_threads(M >= 4 ? nthreads : 1)
    {
        float* tmp = norm_w ? (float*)std::malloc(sizeof(float) * (K > 0 ? K : 1)) : nullptr;
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++)
            quantize_row(x + (int64_t)m * K, K, K_pad, norm_w, norm_eps, act_eps, codes + (int64_t)m * K_pad,
                         scales + m, tmp);
        std::free(tmp);
    }
}

// The whole BitLinear forward on float32 rows: (SubLN) -> int8 per token -> ternary product -> scales (+ bias).
extern "C" void tk_bitlinear_f32(const float* x, int M, int64_t K, int64_t K_pad, const float* norm_w,
                                 float norm_eps, float act_eps, const uint8_t* w, int64_t N, const float* w_scale,
                                 int w_scale_per_row, const float* bias, float* out, int nthreads) {
    int8_t* codes = (int8_t*)std::aligned_alloc(64, ((size_t)M * K_pad + 63) / 64 * 64 + 64);
    float* scales = (float*)std::malloc(sizeof(float) * (M > 0 ? M : 1));
    tk_quantize(x, M, K, K_pad, norm_w, norm_eps, act_eps, codes, scales, nthreads);
    Epilogue ep{nullptr, out, scales, w_scale, w_scale_per_row, bias};
    gemm(codes, M, K_pad, w, N, ep, nthreads);
    std::free(scales);
    std::free(codes);
}

// Float head for decode: y[m, n] = sum_k bf16(W[n, k]) * x[m, k] in float32, W bf16 [N, K] (the lm_head, which
// BitNet keeps in floating point). At batch 1 this is a pure weight stream; bf16 halves it against fp32. bf16 ->
// fp32 is exact (a 16-bit shift), the products and sums are float32 (8 partial sums per row in AVX-512 lanes).
static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

template <int NR>
static inline void head_rows(const uint16_t* __restrict w, int64_t K, const float* __restrict x, int M, int64_t n0,
                             int64_t N, float* __restrict y) {
    for (int m = 0; m < M; m++) {
        const float* xm = x + (int64_t)m * K;
        float out[NR];
#if defined(__AVX512F__)
        __m512 acc[NR];
        for (int r = 0; r < NR; r++) acc[r] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            const __m512 xv = _mm512_loadu_ps(xm + k);
            for (int r = 0; r < NR; r++) {
                const __m256i h = _mm256_loadu_si256((const __m256i*)(w + (n0 + r) * K + k));
                const __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
                acc[r] = _mm512_fmadd_ps(wv, xv, acc[r]);
            }
        }
        for (int r = 0; r < NR; r++) {
            float s = _mm512_reduce_add_ps(acc[r]);
            for (int64_t kk = k; kk < K; kk++) s += bf16_to_f32(w[(n0 + r) * K + kk]) * xm[kk];
            out[r] = s;
        }
#else
        for (int r = 0; r < NR; r++) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++) s += bf16_to_f32(w[(n0 + r) * K + k]) * xm[k];
            out[r] = s;
        }
#endif
        for (int r = 0; r < NR; r++) y[(int64_t)m * N + n0 + r] = out[r];
    }
}

extern "C" void tk_head_bf16(const uint16_t* w, int64_t N, int64_t K, const float* x, int M, float* y, int nthreads) {
    const int64_t groups = (N + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t n0 = g * 4;
        if (N - n0 >= 4) head_rows<4>(w, K, x, M, n0, N, y);
        else for (int64_t n = n0; n < N; n++) head_rows<1>(w, K, x, M, n, N, y);
    }
}
