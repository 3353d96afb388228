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
// Two product paths, one per regime:
// - one token (decode): a weight stream. Each thread reads one contiguous slab of rows front to back, one row at a
//   time (a single sequential stream per core is what the hardware prefetchers follow best; four interleaved rows
//   streamed at about half the rate), 16 rows reduced together.
// - several tokens (prefill): a register tile of 4 weight rows x up to 4 tokens (16 accumulators), OpenMP over
//   groups of 4 rows: each unpacked weight vector serves 4 tokens, each activation vector 4 rows.
// Either way each weight byte is read once per call.
//
// The float head (lm_head GEMV) lives in head.cpp. Built by cpu_ref/_build.py with g++ -O3 -march=native -fopenmp;
// the ISA path is chosen at compile time.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <vector>
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

// ------------------------------------------------------------------------------------------- activation quantization
// Per-token int8 quantization of one row, mirroring bitkernels.reference:
//   h = x * rsqrt(ms + norm_eps) * norm_w      (float32; only when norm_w is given)
//   a = max(max|h|, act_eps); codes = clip(round_half_even(h * (127 * (1/a))), -128, 127); scale = a * (1/127)
// ms is the row's mean square. Given (norm_ms, computed by torch's own x.pow(2).mean(-1) as the reference does),
// everything after it is IEEE-exact elementwise work, so the codes equal the reference's bit for bit. Without it the
// kernel sums in double itself: the scale may then differ in the last bit (summation order).
// Also returns sum_k codes_k, needed to undo the +1 offset of the stored weights.
static int32_t quantize_row(const float* x, int64_t K, int64_t K_pad, const float* norm_ms, const float* norm_w,
                            float norm_eps, float act_eps, int8_t* codes, float* scale, float* tmp) {
    const float* h = x;
    if (norm_w) {
        float ms;
        if (norm_ms) {
            ms = *norm_ms;
        } else {
            double ss = 0.0;
            for (int64_t k = 0; k < K; k++) ss += (double)x[k] * (double)x[k];
            ms = (float)(ss / (double)K);
        }
        const float r = 1.0f / std::sqrt(ms + norm_eps);  // torch.rsqrt is 1 / sqrt, both correctly rounded
        for (int64_t k = 0; k < K; k++) tmp[k] = (x[k] * r) * norm_w[k];
        h = tmp;
    }
    int32_t sum = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    __m512 vmax = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(h + k)));
    if (k < K) {
        const __mmask16 tail = (__mmask16)((1u << (K - k)) - 1);
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail, h + k)));
    }
    const float amax = std::fmax(_mm512_reduce_max_ps(vmax), act_eps);
    const float mult = (1.0f / amax) * 127.0f;
    const __m512 vm = _mm512_set1_ps(mult), lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
    __m512i vsum = _mm512_setzero_si512();
    for (k = 0; k < K; k += 16) {
        const __mmask16 mk = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, h + k), vm),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // half to even
        const __m512i qi = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(q, lo), hi));
        vsum = _mm512_add_epi32(vsum, qi);
        _mm_mask_storeu_epi8(codes + k, mk, _mm512_cvtepi32_epi8(qi));
    }
    sum = _mm512_reduce_add_epi32(vsum);
#else
    float amax = 0.0f;
    for (int64_t k = 0; k < K; k++) amax = std::fmax(amax, std::fabs(h[k]));
    amax = std::fmax(amax, act_eps);
    const float mult = (1.0f / amax) * 127.0f;
    for (int64_t k = 0; k < K; k++) {
        float q = std::nearbyint(h[k] * mult);  // default rounding mode: half to even
        q = std::fmin(std::fmax(q, -128.0f), 127.0f);
        codes[k] = (int8_t)q;
        sum += (int32_t)q;
    }
#endif
    std::memset(codes + K, 0, (size_t)(K_pad - K));
    *scale = amax * (1.0f / 127.0f);
    return sum;
}

static void quantize_rows(const float* x, int M, int64_t K, int64_t K_pad, const float* norm_ms, const float* norm_w,
                          float norm_eps, float act_eps, int8_t* codes, float* scales, int32_t* xsum, int nthreads) {
    // One row is a few microseconds of work: threads only pay off for several rows.
#pragma omp parallel num_threads(nthreads) if (M >= 4 && nthreads > 1)
    {
        static thread_local std::vector<float> tmp;  // the normalized row (per thread, reused across calls)
        if (norm_w && tmp.size() < (size_t)K) tmp.resize(K);
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) {
            const int32_t s = quantize_row(x + (int64_t)m * K, K, K_pad, norm_ms ? norm_ms + m : nullptr, norm_w,
                                           norm_eps, act_eps, codes + (int64_t)m * K_pad, scales + m, tmp.data());
            if (xsum) xsum[m] = s;
        }
    }
}

// ------------------------------------------------------------------------------------------------------- epilogue
struct Epilogue {
    int32_t* out_i32;          // [M, N] exact integer result, or null
    float* out_f32;            // [M, N] float result, or null
    const float* x_scale;      // [M] per-token activation scale
    const float* w_scale;      // [1] per-tensor or [N] per-row weight scale
    int w_scale_per_row;
    const float* bias;         // [N] or null
    const int32_t* xsum;       // [M] sum of each token's codes (undoes the +1 offset of the stored weights)
    int64_t N;

    inline void store(int m, int n, int32_t acc) const {
        const int32_t v = acc - xsum[m];
        if (out_i32) out_i32[(int64_t)m * N + n] = v;
        if (out_f32) {
            const float ws = w_scale[w_scale_per_row ? n : 0];
            float y = (float)v * (x_scale[m] * ws);
            if (bias) y += bias[n];
            out_f32[(int64_t)m * N + n] = y;
        }
    }
};

// ------------------------------------------------------------------------------------- several tokens: 4 x 4 tile
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

template <int NR, int MR>
static inline void run_tile(const uint8_t* w, int64_t ldw, const int8_t* x, int64_t ldx, int nblocks, int n0, int m0,
                            const Epilogue& ep) {
    int32_t acc[NR][MR];
    tile_dot<NR, MR>(w + n0 * ldw, ldw, x + m0 * ldx, ldx, nblocks, acc);
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MR; t++) ep.store(m0 + t, n0 + r, acc[r][t]);
}

template <int NR>
static inline void rows_all_tokens(const uint8_t* w, int64_t ldw, const int8_t* x, int64_t ldx, int nblocks, int n0,
                                   int M, const Epilogue& ep) {
    int m = 0;
    for (; m + 4 <= M; m += 4) run_tile<NR, 4>(w, ldw, x, ldx, nblocks, n0, m, ep);
    switch (M - m) {
        case 3: run_tile<NR, 3>(w, ldw, x, ldx, nblocks, n0, m, ep); break;
        case 2: run_tile<NR, 2>(w, ldw, x, ldx, nblocks, n0, m, ep); break;
        case 1: run_tile<NR, 1>(w, ldw, x, ldx, nblocks, n0, m, ep); break;
        default: break;
    }
}

static void gemm_tiled(const int8_t* x, int M, int64_t K_pad, const uint8_t* w, int64_t N, const Epilogue& ep,
                       int nthreads) {
    const int64_t ldw = K_pad / 4, ldx = K_pad;
    const int nblocks = (int)(K_pad / BLOCK);
    const int64_t groups = (N + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && groups > 1)
    for (int64_t g = 0; g < groups; g++) {
        const int n0 = (int)(g * 4);
        switch (N - n0 >= 4 ? 4 : N - n0) {
            case 4: rows_all_tokens<4>(w, ldw, x, ldx, nblocks, n0, M, ep); break;
            case 3: rows_all_tokens<3>(w, ldw, x, ldx, nblocks, n0, M, ep); break;
            case 2: rows_all_tokens<2>(w, ldw, x, ldx, nblocks, n0, M, ep); break;
            default: rows_all_tokens<1>(w, ldw, x, ldx, nblocks, n0, M, ep); break;
        }
    }
}

// ------------------------------------------------------------------------------------- one token: weight stream
static constexpr int ROWS = 16;  // rows reduced together (one AVX-512 vector of sums)

#if defined(TK_AVX512VNNI)
// The 16 partial-sum vectors of 16 rows -> one vector of their 16 totals (integer adds: any order is exact).
static inline __m512i reduce16(const __m512i v[ROWS]) {
    __m512i t[8], u[4];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        u[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * i], t[2 * i + 1]),
                                _mm512_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
    const __m512i w0 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], 0x88), _mm512_shuffle_i32x4(u[0], u[1], 0xDD));
    const __m512i w1 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2], u[3], 0x88), _mm512_shuffle_i32x4(u[2], u[3], 0xDD));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(w0, w1, 0x88), _mm512_shuffle_i32x4(w0, w1, 0xDD));
}

// One row's 16-lane partial sums: two accumulators so consecutive dot instructions do not wait on each other.
static inline __m512i row_dot(const uint8_t* __restrict w, const int8_t* __restrict x, int nblocks) {
    const __m512i mask = _mm512_set1_epi8(3);
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
    for (int b = 0; b < nblocks; b++) {
        const __m512i p = _mm512_loadu_si512((const void*)(w + b * BLOCK_BYTES));
        const int8_t* xb = x + (int64_t)b * BLOCK;
        a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(p, mask), _mm512_loadu_si512((const void*)xb));
        a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(_mm512_srli_epi16(p, 2), mask),
                                 _mm512_loadu_si512((const void*)(xb + 64)));
        a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(_mm512_srli_epi16(p, 4), mask),
                                 _mm512_loadu_si512((const void*)(xb + 128)));
        a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(_mm512_srli_epi16(p, 6), mask),
                                 _mm512_loadu_si512((const void*)(xb + 192)));
    }
    return _mm512_add_epi32(a0, a1);
}
#endif

// Rows [16 s, 16 s + 16) of the product for one token.
static inline void gemv_slab(const int8_t* x, int64_t K_pad, const uint8_t* w, int64_t N, const Epilogue& ep,
                             int64_t s) {
    const int64_t ldw = K_pad / 4;
    const int nblocks = (int)(K_pad / BLOCK);
    const int n0 = (int)(s * ROWS);
    const int rows = N - n0 >= ROWS ? ROWS : (int)(N - n0);
#if defined(TK_AVX512VNNI)
    if (rows == ROWS) {
        __m512i part[ROWS];
        for (int r = 0; r < ROWS; r++) part[r] = row_dot(w + (n0 + r) * ldw, x, nblocks);
        alignas(64) int32_t acc[ROWS];
        _mm512_store_si512((void*)acc, reduce16(part));
        for (int r = 0; r < ROWS; r++) ep.store(0, n0 + r, acc[r]);
        return;
    }
#endif
    for (int r = 0; r < rows; r++) run_tile<1, 1>(w, ldw, x, K_pad, nblocks, n0 + r, 0, ep);
}

static void gemv_stream(const int8_t* x, int64_t K_pad, const uint8_t* w, int64_t N, const Epilogue& ep,
                        int nthreads) {
    const int64_t slabs = (N + ROWS - 1) / ROWS;
    if (nthreads <= 1 || slabs <= 1) {  // no parallel region at all (even a team of one costs about 0.5 us)
        for (int64_t s = 0; s < slabs; s++) gemv_slab(x, K_pad, w, N, ep, s);
        return;
    }
    // schedule(static): each thread gets one contiguous range of slabs, i.e. one contiguous range of memory.
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t s = 0; s < slabs; s++) gemv_slab(x, K_pad, w, N, ep, s);
}

// Scratch for the int8 codes and per-token values, kept per calling thread: no allocation per call at decode.
struct Scratch {
    std::vector<int8_t> codes;
    std::vector<float> scales;
    std::vector<int32_t> xsum;
    void fit(int M, int64_t K_pad) {
        if (codes.size() < (size_t)M * K_pad) codes.resize((size_t)M * K_pad);
        if (scales.size() < (size_t)M) { scales.resize(M); xsum.resize(M); }
    }
};
static thread_local Scratch scratch;

static void product(const int8_t* codes, int M, int64_t K_pad, const uint8_t* w, int64_t N, const Epilogue& ep,
                    int nthreads) {
    if (M == 1) gemv_stream(codes, K_pad, w, N, ep, nthreads);
    else gemm_tiled(codes, M, K_pad, w, N, ep, nthreads);
}

// ------------------------------------------------------------------------------------------------- entry points
// Exact integer product: out[m, n] = sum_k code[n, k] * x[m, k] (x: [M, K_pad] int8, zero past K).
extern "C" void tk_gemm_i32(const int8_t* x, int M, int64_t K_pad, const uint8_t* w, int64_t N, int32_t* out,
                            int nthreads) {
    if (M <= 0 || N <= 0) return;
    std::vector<int32_t> xsum(M);
    for (int m = 0; m < M; m++) {
        int32_t s = 0;
        for (int64_t k = 0; k < K_pad; k++) s += x[m * K_pad + k];
        xsum[m] = s;
    }
    Epilogue ep{out, nullptr, nullptr, nullptr, 0, nullptr, xsum.data(), N};
    product(x, M, K_pad, w, N, ep, nthreads);
}

// (RMSNorm ->) per-token int8 codes [M, K_pad] (zero past K) and scales [M]; norm_ms: see quantize_row.
extern "C" void tk_quantize(const float* x, int M, int64_t K, int64_t K_pad, const float* norm_ms, const float* norm_w,
                            float norm_eps, float act_eps, int8_t* codes, float* scales, int nthreads) {
    quantize_rows(x, M, K, K_pad, norm_ms, norm_w, norm_eps, act_eps, codes, scales, nullptr, nthreads);
}

// The whole BitLinear forward on float32 rows: (SubLN) -> int8 per token -> ternary product -> scales (+ bias).
// One token (decode) is quantized by the calling thread and costs one parallel region.
extern "C" void tk_bitlinear_f32(const float* x, int M, int64_t K, int64_t K_pad, const float* norm_ms,
                                 const float* norm_w, float norm_eps, float act_eps, const uint8_t* w, int64_t N,
                                 const float* w_scale, int w_scale_per_row, const float* bias, float* out,
                                 int nthreads) {
    if (M <= 0 || N <= 0) return;
    Scratch& s = scratch;
    s.fit(M, K_pad);
    quantize_rows(x, M, K, K_pad, norm_ms, norm_w, norm_eps, act_eps, s.codes.data(), s.scales.data(), s.xsum.data(),
                  nthreads);
    Epilogue ep{nullptr, out, s.scales.data(), w_scale, w_scale_per_row, bias, s.xsum.data(), N};
    product(s.codes.data(), M, K_pad, w, N, ep, nthreads);
}

// The constant arguments of one BitLinear, filled once from Python (ctypes Structure cpu_ref.ops._LinearDesc, same
// layout; tk_linear_desc_size lets the loader check it): a decode call then passes 6 arguments, not 15 (ctypes
// converts every argument on every call, about 0.1 us each).
struct TkLinear {
    int64_t K, K_pad, N;
    const uint8_t* w;
    const float* w_scale;
    const float* bias;     // or null
    const float* norm_w;   // SubLN weight, or null
    float norm_eps, act_eps;
    int32_t w_scale_per_row, reserved;
};

extern "C" int64_t tk_linear_desc_size() { return (int64_t)sizeof(TkLinear); }

extern "C" void tk_linear(const TkLinear* d, const float* x, int M, const float* norm_ms, float* out, int nthreads) {
    tk_bitlinear_f32(x, M, d->K, d->K_pad, norm_ms, d->norm_w, d->norm_eps, d->act_eps, d->w, d->N, d->w_scale,
                     d->w_scale_per_row, d->bias, out, nthreads);
}
