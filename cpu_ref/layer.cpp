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
// Vectorized for AVX-512 (16 lanes) only; ``tk_layer_vectorized`` tells the loader, which otherwise keeps torch ops.
// Sizes must be multiples of 16 (head_dim of 32): the loader checks.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__F16C__)
#define TL_AVX512 1
#include <immintrin.h>
#endif

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

extern "C" int tk_layer_vectorized() {
#if defined(TL_AVX512)
    return 1;
#else
    return 0;
#endif
}

#if defined(TL_AVX512)
typedef __m512 V;

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

static inline V exp16(V x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts (Cody-Waite)
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    V p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// 1 / sqrt(mean of squares + eps) of n values (n % 16 == 0), as torch's rsqrt(x.pow(2).mean(-1) + eps).
template <int DT> static inline float inv_rms(const void* x, int64_t n, float eps) {
    V a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const V v0 = ld<DT>(x, i), v1 = ld<DT>(x, i + 16);
        a0 = _mm512_fmadd_ps(v0, v0, a0);
        a1 = _mm512_fmadd_ps(v1, v1, a1);
    }
    for (; i < n; i += 16) {
        const V v = ld<DT>(x, i);
        a0 = _mm512_fmadd_ps(v, v, a0);
    }
    const float ms = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) / (float)n;
    return 1.0f / std::sqrt(ms + eps);
}

// -------------------------------------------------------------------------------------- residual add + RMSNorm
// h = h + delta (if given; rounded to DT, in place); out = w * DT(h * rsqrt(mean(h^2) + eps)), rounded to DT.
template <int DT>
static void add_rmsnorm(void* h, const void* delta, const void* w, float eps, int64_t n, void* out) {
    if (delta)
        for (int64_t i = 0; i < n; i += 16) st<DT>(h, i, rt<DT>(_mm512_add_ps(ld<DT>(h, i), ld<DT>(delta, i))));
    const V r = _mm512_set1_ps(inv_rms<DT>(h, n, eps));
    for (int64_t i = 0; i < n; i += 16)
        st<DT>(out, i, rt<DT>(_mm512_mul_ps(ld<DT>(w, i), rt<DT>(_mm512_mul_ps(ld<DT>(h, i), r)))));
}

// --------------------------------------------------------------------------------------------------- SwiGLU
// out = DT(DT(silu(gate)) * up) over n values, silu(x) = x / (1 + exp(-x)) as torch computes it.
template <int DT>
static void swiglu(const void* gate, const void* up, int64_t n, void* out) {
    const V one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const V g = ld<DT>(gate, i);
        const V s = rt<DT>(_mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
        st<DT>(out, i, rt<DT>(_mm512_mul_ps(s, ld<DT>(up, i))));
    }
}
#endif  // TL_AVX512

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

#if defined(TL_AVX512)
// x (d values, DT) -> q/k norm (if w) -> RoPE at this position -> dst (DT). HF's op order and rounding points:
// x = w * DT(x * r); out = DT(DT(x * cos) + DT(rotate_half(x) * sin)), rotate_half(x) = [-x2, x1].
template <int DT>
static void norm_rope(const void* x, const void* w, float eps, const void* cos, const void* sin, int d, void* dst,
                      float* tmp) {
    const int half = d / 2;
    if (w) {
        const V r = _mm512_set1_ps(inv_rms<DT>(x, d, eps));
        for (int i = 0; i < d; i += 16)
            _mm512_storeu_ps(tmp + i, rt<DT>(_mm512_mul_ps(ld<DT>(w, i), rt<DT>(_mm512_mul_ps(ld<DT>(x, i), r)))));
    } else {
        for (int i = 0; i < d; i += 16) _mm512_storeu_ps(tmp + i, ld<DT>(x, i));
    }
    for (int i = 0; i < half; i += 16) {
        const V x1 = _mm512_loadu_ps(tmp + i), x2 = _mm512_loadu_ps(tmp + half + i);
        const V c1 = ld<DT>(cos, i), c2 = ld<DT>(cos, half + i), s1 = ld<DT>(sin, i), s2 = ld<DT>(sin, half + i);
        const V o1 = rt<DT>(_mm512_add_ps(rt<DT>(_mm512_mul_ps(x1, c1)),
                                          rt<DT>(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), s1))));
        const V o2 = rt<DT>(_mm512_add_ps(rt<DT>(_mm512_mul_ps(x2, c2)), rt<DT>(_mm512_mul_ps(x1, s2))));
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
    for (int c = 0; c < nv; c++) qv[c] = _mm512_loadu_ps(q + 16 * c);
    float m = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
        V a = _mm512_setzero_ps();
        for (int c = 0; c < nv; c++) a = _mm512_fmadd_ps(qv[c], ld<DT>(kh, j * d + 16 * c), a);
        s[j] = _mm512_reduce_add_ps(a) * scale;
        m = s[j] > m ? s[j] : m;
    }
    int64_t j = 0;
    V sum = _mm512_setzero_ps();
    const V vm = _mm512_set1_ps(m);
    for (; j + 16 <= n; j += 16) {
        const V p = exp16(_mm512_sub_ps(_mm512_loadu_ps(s.data() + j), vm));
        _mm512_storeu_ps(s.data() + j, p);
        sum = _mm512_add_ps(sum, p);
    }
    if (j < n) {
        const __mmask16 k = (__mmask16)((1u << (n - j)) - 1);
        const V p = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s.data() + j), vm));
        _mm512_mask_storeu_ps(s.data() + j, k, p);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, p));
    }
    V acc[16];
    for (int c = 0; c < nv; c++) acc[c] = _mm512_setzero_ps();
    for (j = 0; j < n; j++) {
        const V p = _mm512_set1_ps(s[j]);
        for (int c = 0; c < nv; c++) acc[c] = _mm512_fmadd_ps(p, ld<DT>(vh, j * d + 16 * c), acc[c]);
    }
    const V inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (int c = 0; c < nv; c++) st<DT>(out, 16 * c, rt<DT>(_mm512_mul_ps(acc[c], inv)));
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
            for (int i = 0; i < d; i += 16) _mm512_storeu_ps(qf.data() + i, ld<DT>(qbuf, i));
            attend<DT>(qf.data(), kc + g * head_stride, vc + g * head_stride, n, d, a->scale,
                       (char*)out + (size_t)h * d * es, s);
        }
    }
}
#endif  // TL_AVX512

// ------------------------------------------------------------------------------------------------ entry points
#if defined(TL_AVX512)
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
