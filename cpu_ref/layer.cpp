// The non-linear work of one decode step (one token) of a Llama / Qwen2 / Qwen3 layer, for the lean decode loop
// (cpu_ref/decoder.py), shared by every variant: residual add + RMSNorm, q/k RMSNorm + RoPE + KV-cache write +
// attention, SwiGLU. In torch ops that is about 50 dispatches a layer, each a few microseconds whatever its size
// (hidden 1024): at batch 1 on many cores it cost more than the weights. Here it is 4 calls.
//
// Activations are float32, bf16 or fp16 (the model's dtype, DT below); the arithmetic is float32 and rounds to the
// activation dtype where HF's op sequence rounds (after the residual add, the normalized value, the norm weight
// product, each RoPE product and sum, SiLU, the gate * up product), so a bf16 model stays a bf16 model. Reductions
// (mean square, attention sums) run in another order than torch's: results agree with the HF forward to float32
// rounding, not bit for bit. Attention uses float32 probabilities throughout (torch's CPU flash kernel rounds them
// to bf16 for a bf16 model); exp is a degree-7 polynomial after Cody-Waite range reduction (about 1 ulp).
//
// Vectors of 16 float32 lanes: one AVX-512 register, or two AVX2 registers (so both builds share one code and one
// size rule); ``tk_layer_vectorized`` tells the loader, which keeps torch ops on a build with neither. Sizes must be
// multiples of 16 (head_dim of 32): the loader checks. The two builds differ only in the order of their horizontal
// sums, i.e. to float32 rounding.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__F16C__)
#define TL_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TL_AVX2 1
#include <immintrin.h>
#endif
#if defined(TL_AVX512) || defined(TL_AVX2)
#define TL_VECTOR 1
#endif

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

extern "C" int tk_layer_vectorized() {
#if defined(TL_VECTOR)
    return 1;
#else
    return 0;
#endif
}

#if defined(TL_AVX512)
typedef __m512 V;
static inline V v_load(const float* p) { return _mm512_loadu_ps(p); }
static inline void v_store(float* p, V v) { _mm512_storeu_ps(p, v); }
static inline V v_set1(float f) { return _mm512_set1_ps(f); }
static inline V v_zero() { return _mm512_setzero_ps(); }
static inline V v_add(V a, V b) { return _mm512_add_ps(a, b); }
static inline V v_sub(V a, V b) { return _mm512_sub_ps(a, b); }
static inline V v_mul(V a, V b) { return _mm512_mul_ps(a, b); }
static inline V v_div(V a, V b) { return _mm512_div_ps(a, b); }
static inline V v_min(V a, V b) { return _mm512_min_ps(a, b); }
static inline V v_max(V a, V b) { return _mm512_max_ps(a, b); }
static inline V v_fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }    // a * b + c
static inline V v_fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
static inline V v_round(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline V v_scalef(V p, V n) { return _mm512_scalef_ps(p, n); }  // p * 2^n, n integral
static inline float v_sum(V a) { return _mm512_reduce_add_ps(a); }
// The first `count` lanes (count < 16) of p, zeros after; store / keep only those lanes.
static inline __mmask16 first(int64_t count) { return (__mmask16)((1u << count) - 1); }
static inline V v_load_first(int64_t count, const float* p) { return _mm512_maskz_loadu_ps(first(count), p); }
static inline void v_store_first(int64_t count, float* p, V v) { _mm512_mask_storeu_ps(p, first(count), v); }
static inline V v_keep_first(int64_t count, V v) { return _mm512_maskz_mov_ps(first(count), v); }

template <int DT> static inline V ld(const void* p, int64_t i) {
    if (DT == DT_F32) return _mm512_loadu_ps((const float*)p + i);
    if (DT == DT_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i))), 16));
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i)));
}

// Round a float32 vector to the activation dtype's precision (round to nearest even), staying float32.
template <int DT> static inline V rt(V v) {
    if (DT == DT_F32) return v;
    if (DT == DT_BF16) {
        __m512i u = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
        return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
    }
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Store an already-rounded vector (rt) in the activation dtype.
template <int DT> static inline void st(void* p, int64_t i, V v) {
    if (DT == DT_F32) {
        _mm512_storeu_ps((float*)p + i, v);
    } else if (DT == DT_BF16) {
        _mm256_storeu_si256((__m256i*)((uint16_t*)p + i),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
    } else {
        _mm256_storeu_si256((__m256i*)((uint16_t*)p + i),
                            _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
}
#elif defined(TL_AVX2)
struct V { __m256 l, h; };  // lanes 0-7, 8-15
static inline V v_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline void v_store(float* p, V v) { _mm256_storeu_ps(p, v.l); _mm256_storeu_ps(p + 8, v.h); }
static inline V v_set1(float f) { return {_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
static inline V v_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline V v_add(V a, V b) { return {_mm256_add_ps(a.l, b.l), _mm256_add_ps(a.h, b.h)}; }
static inline V v_sub(V a, V b) { return {_mm256_sub_ps(a.l, b.l), _mm256_sub_ps(a.h, b.h)}; }
static inline V v_mul(V a, V b) { return {_mm256_mul_ps(a.l, b.l), _mm256_mul_ps(a.h, b.h)}; }
static inline V v_div(V a, V b) { return {_mm256_div_ps(a.l, b.l), _mm256_div_ps(a.h, b.h)}; }
static inline V v_min(V a, V b) { return {_mm256_min_ps(a.l, b.l), _mm256_min_ps(a.h, b.h)}; }
static inline V v_max(V a, V b) { return {_mm256_max_ps(a.l, b.l), _mm256_max_ps(a.h, b.h)}; }
static inline V v_fmadd(V a, V b, V c) { return {_mm256_fmadd_ps(a.l, b.l, c.l), _mm256_fmadd_ps(a.h, b.h, c.h)}; }
static inline V v_fnmadd(V a, V b, V c) {
    return {_mm256_fnmadd_ps(a.l, b.l, c.l), _mm256_fnmadd_ps(a.h, b.h, c.h)};
}
static inline V v_round(V a) {
    return {_mm256_round_ps(a.l, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
            _mm256_round_ps(a.h, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
// p * 2^n for integral n in [-126, 128] (exp16's range): two exact powers of two, each in [-63, 64], so neither
// leaves the normal range where one 2^n would (2^128); the product rounds once, as scalef does.
static inline __m256 scalef8(__m256 p, __m256 n) {
    const __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
    const __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
}
static inline V v_scalef(V p, V n) { return {scalef8(p.l, n.l), scalef8(p.h, n.h)}; }
static inline float v_sum(V a) {
    const __m256 s = _mm256_add_ps(a.l, a.h);
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    return _mm_cvtss_f32(t);
}
static inline __m256i first8(int64_t count, int offset) {  // lane i: all ones where offset + i < count
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)count),
                              _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(offset)));
}
static inline V v_load_first(int64_t count, const float* p) {
    return {_mm256_maskload_ps(p, first8(count, 0)), _mm256_maskload_ps(p + 8, first8(count, 8))};
}
static inline void v_store_first(int64_t count, float* p, V v) {
    _mm256_maskstore_ps(p, first8(count, 0), v.l);
    _mm256_maskstore_ps(p + 8, first8(count, 8), v.h);
}
static inline V v_keep_first(int64_t count, V v) {
    return {_mm256_and_ps(v.l, _mm256_castsi256_ps(first8(count, 0))),
            _mm256_and_ps(v.h, _mm256_castsi256_ps(first8(count, 8)))};
}

static inline __m256 widen_bf16(__m128i u) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(u), 16));
}
template <int DT> static inline V ld(const void* p, int64_t i) {
    if (DT == DT_F32) return v_load((const float*)p + i);
    const __m128i* q = (const __m128i*)((const uint16_t*)p + i);
    if (DT == DT_BF16) return {widen_bf16(_mm_loadu_si128(q)), widen_bf16(_mm_loadu_si128(q + 1))};
    return {_mm256_cvtph_ps(_mm_loadu_si128(q)), _mm256_cvtph_ps(_mm_loadu_si128(q + 1))};
}

static inline __m256 round_bf16(__m256 v) {  // to nearest even, as the AVX-512 build
    __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xFFFF0000u)));
}
static inline __m256 round_f16(__m256 v) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
template <int DT> static inline V rt(V v) {
    if (DT == DT_F32) return v;
    if (DT == DT_BF16) return {round_bf16(v.l), round_bf16(v.h)};
    return {round_f16(v.l), round_f16(v.h)};
}

template <int DT> static inline void st(void* p, int64_t i, V v) {
    if (DT == DT_F32) {
        v_store((float*)p + i, v);
    } else if (DT == DT_BF16) {  // packus interleaves 128-bit lanes: the permute puts lanes 0-15 back in order
        const __m256i hi = _mm256_packus_epi32(_mm256_srli_epi32(_mm256_castps_si256(v.l), 16),
                                               _mm256_srli_epi32(_mm256_castps_si256(v.h), 16));
        _mm256_storeu_si256((__m256i*)((uint16_t*)p + i), _mm256_permute4x64_epi64(hi, _MM_SHUFFLE(3, 1, 2, 0)));
    } else {
        __m128i* q = (__m128i*)((uint16_t*)p + i);
        _mm_storeu_si128(q, _mm256_cvtps_ph(v.l, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm_storeu_si128(q + 1, _mm256_cvtps_ph(v.h, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
}
#endif

#if defined(TL_VECTOR)
static inline V exp16(V x) {
    x = v_min(v_max(x, v_set1(-87.3f)), v_set1(88.7f));
    const V n = v_round(v_mul(x, v_set1(1.44269504088896341f)));
    V r = v_fnmadd(n, v_set1(0.693359375f), x);  // ln 2 in two parts (Cody-Waite)
    r = v_fnmadd(n, v_set1(-2.12194440e-4f), r);
    V p = v_set1(1.0f / 5040.0f);
    p = v_fmadd(p, r, v_set1(1.0f / 720.0f));
    p = v_fmadd(p, r, v_set1(1.0f / 120.0f));
    p = v_fmadd(p, r, v_set1(1.0f / 24.0f));
    p = v_fmadd(p, r, v_set1(1.0f / 6.0f));
    p = v_fmadd(p, r, v_set1(0.5f));
    p = v_fmadd(p, r, v_set1(1.0f));
    p = v_fmadd(p, r, v_set1(1.0f));
    return v_scalef(p, n);
}

// 1 / sqrt(mean of squares + eps) of n values (n % 16 == 0), as torch's rsqrt(x.pow(2).mean(-1) + eps).
template <int DT> static inline float inv_rms(const void* x, int64_t n, float eps) {
    V a0 = v_zero(), a1 = v_zero();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const V v0 = ld<DT>(x, i), v1 = ld<DT>(x, i + 16);
        a0 = v_fmadd(v0, v0, a0);
        a1 = v_fmadd(v1, v1, a1);
    }
    for (; i < n; i += 16) {
        const V v = ld<DT>(x, i);
        a0 = v_fmadd(v, v, a0);
    }
    const float ms = v_sum(v_add(a0, a1)) / (float)n;
    return 1.0f / std::sqrt(ms + eps);
}

// -------------------------------------------------------------------------------------- residual add + RMSNorm
// h = h + delta (if given; rounded to DT, in place); out = w * DT(h * rsqrt(mean(h^2) + eps)), rounded to DT.
template <int DT>
static void add_rmsnorm(void* h, const void* delta, const void* w, float eps, int64_t n, void* out) {
    if (delta)
        for (int64_t i = 0; i < n; i += 16) st<DT>(h, i, rt<DT>(v_add(ld<DT>(h, i), ld<DT>(delta, i))));
    const V r = v_set1(inv_rms<DT>(h, n, eps));
    for (int64_t i = 0; i < n; i += 16)
        st<DT>(out, i, rt<DT>(v_mul(ld<DT>(w, i), rt<DT>(v_mul(ld<DT>(h, i), r)))));
}

// --------------------------------------------------------------------------------------------------- SwiGLU
// out = DT(DT(silu(gate)) * up) over n values, silu(x) = x / (1 + exp(-x)) as torch computes it.
template <int DT>
static void swiglu(const void* gate, const void* up, int64_t n, void* out) {
    const V one = v_set1(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const V g = ld<DT>(gate, i);
        const V s = rt<DT>(v_div(g, v_add(one, exp16(v_sub(v_zero(), g)))));
        st<DT>(out, i, rt<DT>(v_mul(s, ld<DT>(up, i))));
    }
}
#endif  // TL_VECTOR

// ------------------------------------------------------------------------------------------------ attention
// One layer's constants, filled once from Python (ctypes Structure cpu_ref.decoder._AttnDesc, same layout).
struct TkAttn {
    int32_t dtype, hq, hk, d;      // activation dtype, query heads, kv heads, head_dim
    const void* q_norm_w;          // [d] (Qwen3) or null
    const void* k_norm_w;          // [d] or null
    float norm_eps, scale;         // q/k RMSNorm eps; attention scale (head_dim ** -0.5)
    void* k_cache;                 // [hk, max_len, d], activation dtype
    void* v_cache;
    int64_t max_len;
};

extern "C" int64_t tk_attn_desc_size() { return (int64_t)sizeof(TkAttn); }

#if defined(TL_VECTOR)
// x (d values, DT) -> q/k norm (if w) -> RoPE at this position -> dst (DT). HF's op order and rounding points:
// x = w * DT(x * r); out = DT(DT(x * cos) + DT(rotate_half(x) * sin)), rotate_half(x) = [-x2, x1].
template <int DT>
static void norm_rope(const void* x, const void* w, float eps, const void* cos, const void* sin, int d, void* dst,
                      float* tmp) {
    const int half = d / 2;
    if (w) {
        const V r = v_set1(inv_rms<DT>(x, d, eps));
        for (int i = 0; i < d; i += 16)
            v_store(tmp + i, rt<DT>(v_mul(ld<DT>(w, i), rt<DT>(v_mul(ld<DT>(x, i), r)))));
    } else {
        for (int i = 0; i < d; i += 16) v_store(tmp + i, ld<DT>(x, i));
    }
    for (int i = 0; i < half; i += 16) {
        const V x1 = v_load(tmp + i), x2 = v_load(tmp + half + i);
        const V c1 = ld<DT>(cos, i), c2 = ld<DT>(cos, half + i), s1 = ld<DT>(sin, i), s2 = ld<DT>(sin, half + i);
        const V o1 = rt<DT>(v_add(rt<DT>(v_mul(x1, c1)),
                                          rt<DT>(v_mul(v_sub(v_zero(), x2), s1))));
        const V o2 = rt<DT>(v_add(rt<DT>(v_mul(x2, c2)), rt<DT>(v_mul(x1, s2))));
        st<DT>(dst, i, o1);
        st<DT>(dst, half + i, o2);
    }
}

// out (d, DT) = softmax(scale * K q) . V over the first n cached positions of one kv head; q is float32.
template <int DT>
static void attend(const float* q, const void* kh, const void* vh, int64_t n, int d, float scale, void* out,
                   std::vector<float>& s) {
    if ((int64_t)s.size() < n) s.resize(n);
    const int nv = d / 16;
    V qv[16];  // head_dim <= 256
    for (int c = 0; c < nv; c++) qv[c] = v_load(q + 16 * c);
    float m = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
        V a = v_zero();
        for (int c = 0; c < nv; c++) a = v_fmadd(qv[c], ld<DT>(kh, j * d + 16 * c), a);
        s[j] = v_sum(a) * scale;
        m = s[j] > m ? s[j] : m;
    }
    int64_t j = 0;
    V sum = v_zero();
    const V vm = v_set1(m);
    for (; j + 16 <= n; j += 16) {
        const V p = exp16(v_sub(v_load(s.data() + j), vm));
        v_store(s.data() + j, p);
        sum = v_add(sum, p);
    }
    if (j < n) {
        const V p = exp16(v_sub(v_load_first(n - j, s.data() + j), vm));
        v_store_first(n - j, s.data() + j, p);
        sum = v_add(sum, v_keep_first(n - j, p));
    }
    V acc[16];
    for (int c = 0; c < nv; c++) acc[c] = v_zero();
    for (j = 0; j < n; j++) {
        const V p = v_set1(s[j]);
        for (int c = 0; c < nv; c++) acc[c] = v_fmadd(p, ld<DT>(vh, j * d + 16 * c), acc[c]);
    }
    const V inv = v_set1(1.0f / v_sum(sum));
    for (int c = 0; c < nv; c++) st<DT>(out, 16 * c, rt<DT>(v_mul(acc[c], inv)));
}

template <int DT> static inline size_t esize() { return DT == DT_F32 ? 4 : 2; }

// This token's q [hq d], k [hk d], v [hk d]; cos/sin: [d] at position pos; out: [hq d].
template <int DT>
static void attn_decode(const TkAttn* a, const void* qp, const void* kp, const void* vp, const void* cos,
                        const void* sin, int64_t pos, void* out, int nthreads) {
    const int d = a->d, hq = a->hq, hk = a->hk, rep = hq / hk;
    const size_t es = esize<DT>();
    const char* q = (const char*)qp;
    const char* k = (const char*)kp;
    const char* v = (const char*)vp;
    const size_t head_stride = (size_t)a->max_len * d * es;
    char* kc = (char*)a->k_cache;
    char* vc = (char*)a->v_cache;
    std::vector<float> tmp(d);
    for (int g = 0; g < hk; g++) {  // this token's k (normed, rotated) and v into the cache: tiny, one thread
        norm_rope<DT>(k + (size_t)g * d * es, a->k_norm_w, a->norm_eps, cos, sin, d,
                      kc + g * head_stride + pos * d * es, tmp.data());
        std::memcpy(vc + g * head_stride + pos * d * es, v + (size_t)g * d * es, d * es);
    }
    const int64_t n = pos + 1;
    const bool par = nthreads > 1 && (int64_t)hq * n * d >= 65536;  // below that a fork/join costs more
#pragma omp parallel num_threads(nthreads) if (par)
    {
        static thread_local std::vector<float> s, qf;
        if ((int)qf.size() < d) qf.resize(d);
#pragma omp for schedule(static)
        for (int h = 0; h < hq; h++) {
            const int g = h / rep;  // GQA: query head h reads kv head h / rep
            alignas(64) char qbuf[256 * 4];
            norm_rope<DT>(q + (size_t)h * d * es, a->q_norm_w, a->norm_eps, cos, sin, d, qbuf, qf.data());
            for (int i = 0; i < d; i += 16) v_store(qf.data() + i, ld<DT>(qbuf, i));
            attend<DT>(qf.data(), kc + g * head_stride, vc + g * head_stride, n, d, a->scale,
                       (char*)out + (size_t)h * d * es, s);
        }
    }
}
#endif  // TL_VECTOR

// ------------------------------------------------------------------------------------------------ entry points
#if defined(TL_VECTOR)
#define TL_DISPATCH(dtype, CALL) \
    switch (dtype) { case DT_F32: { constexpr int DT = DT_F32; CALL; } break; \
                     case DT_BF16: { constexpr int DT = DT_BF16; CALL; } break; \
                     default: { constexpr int DT = DT_F16; CALL; } break; }

extern "C" void tk_add_rmsnorm(int dtype, void* h, const void* delta, const void* w, float eps, int64_t n, void* out) {
    TL_DISPATCH(dtype, (add_rmsnorm<DT>(h, delta, w, eps, n, out)))
}

extern "C" void tk_swiglu(int dtype, const void* gate, const void* up, int64_t n, void* out) {
    TL_DISPATCH(dtype, (swiglu<DT>(gate, up, n, out)))
}

extern "C" void tk_attn_decode(const TkAttn* a, const void* q, const void* k, const void* v, const void* cos,
                               const void* sin, int64_t pos, void* out, int nthreads) {
    TL_DISPATCH(a->dtype, (attn_decode<DT>(a, q, k, v, cos, sin, pos, out, nthreads)))
}
#else  // not built: the loader sees tk_layer_vectorized() == 0 and never calls these
extern "C" void tk_add_rmsnorm(int, void*, const void*, const void*, float, int64_t, void*) {}
extern "C" void tk_swiglu(int, const void*, const void*, int64_t, void*) {}
extern "C" void tk_attn_decode(const TkAttn*, const void*, const void*, const void*, const void*, const void*,
                               int64_t, void*, int) {}
#endif
