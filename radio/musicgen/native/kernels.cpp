// radio's CPU kernels for the decode step (AVX-512 with VNNI): built at load by radio/musicgen/native/__init__.py.
//
// linear: y = x W^T for a few rows x and 8- or 4-bit weights, as integer dot products (vpdpbusd: 64
//   multiply-adds an instruction). Each row of x is quantized to int8 with its own scale (absolute maximum / 127).
//   PyTorch's weight-only kernels instead turn every weight back into a float to multiply it, which costs more
//   instructions than reading it: on two cores they run at the speed of arithmetic, not of memory.
//   Weights come in blocks of 16 output channels (one 512-bit register of int32 sums):
//   - 8 bits: w[block][k / 4][channel][k % 4] int8, a float32 scale per channel, and each channel's sum of
//     codes (the activations enter as unsigned x + 128; the sum takes the 128s back out).
//   - 4 bits: codes 0..15 in groups of inputs with a bf16 scale and low per group and channel (weight = code *
//     scale + low), one stream per block: per group, the 16 scales, the 16 lows, then per 8 inputs
//     [channel][i] = code[k + i] | code[k + 4 + i] << 4 (i < 4). (Scales in arrays of their own, beside the codes,
//     made each thread follow three streams, and the step slower.)
// attend8: one query per row over an 8-bit KV cache (decoding.kv8_pack: each token's d int8 numbers, then its
//   float32 scale), with an additive mask; columns the mask removes are not read.
// decode_layers: a decode step's decoder layers in one call, made of the two (native/layers.py holds its operands).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t BLOCK = 16;  // output channels per block
constexpr int MAX_ROWS = 8;    // rows per pass over the weights (one accumulator per row)
// Software prefetch, this far ahead of the loads: the weights' stream (bytes) and the cache's columns. Without it
// the products and the attention read at 20-27 GB/s (int4 at six rows: 10), with it at 30-38, of the ~34 GB/s a
// plain sum reads on a 2-core AMD EPYC VM (2026-12-02; the hardware prefetcher alone falls behind there).
constexpr int64_t AHEAD_BYTES = 4096;
constexpr int64_t AHEAD_COLUMNS = 64;

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }


struct Rows {                // the activations, quantized per row
  std::vector<int8_t> q;     // (M, K): round(x / scale), in [-127, 127]
  std::vector<float> scale;  // (M,)
};

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i v = _mm256_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// Each row to int8 with its own scale (absolute maximum / 127), rounded to nearest. Vectorised and without
// branches: a rounding written with a branch on the sign mispredicted on every other number (~50 us a call).
template <typename T>
void quantize(const T* p, int64_t M, int64_t K, Rows& r) {
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t m = 0; m < M; ++m) {
    const T* row = p + m * K;
    __m512 top = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mask = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
      top = _mm512_max_ps(top, _mm512_and_ps(load16(row + k, mask), sign));
    }
    const float amax = _mm512_reduce_max_ps(top);
    const float s = amax > 0.f ? amax / 127.f : 1.f;
    const __m512 inv = _mm512_set1_ps(1.f / s);
    r.scale[m] = s;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mask = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16(row + k, mask), inv));  // nearest, ties to even
      _mm_mask_storeu_epi8(r.q.data() + m * K + k, mask, _mm512_cvtsepi32_epi8(q));
    }
  }
}

Rows quantize_rows(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1);
  Rows r;
  r.q.resize(M * K);
  r.scale.resize(M);
  if (x.scalar_type() == at::kFloat)
    quantize(x.data_ptr<float>(), M, K, r);
  else
    quantize(x.data_ptr<c10::BFloat16>(), M, K, r);
  return r;
}

inline __m512 bf16x16(const uint16_t* p) {  // 16 bf16 -> 16 float
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

template <typename T>
void store16(T* out, __m512 v) {
  alignas(64) float f[BLOCK];
  _mm512_store_ps(f, v);
  for (int c = 0; c < BLOCK; ++c) out[c] = static_cast<T>(f[c]);
}

template <int MR, typename T>
void int8_block(const int8_t* w, int64_t K, const uint8_t* xu, const float* sx, const float* sw,
                const int32_t* wsum, T* out, int64_t ldo) {
  __m512i acc[MR];
  const int32_t* x32[MR];
  for (int m = 0; m < MR; ++m) {
    acc[m] = _mm512_setzero_si512();
    x32[m] = reinterpret_cast<const int32_t*>(xu + m * K);
  }
#pragma GCC unroll 4
  for (int64_t j = 0; j < K / 4; ++j) {
    prefetch(w + j * 64 + AHEAD_BYTES);
    const __m512i wv = _mm512_loadu_si512(w + j * 64);
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_dpbusd_epi32(acc[m], _mm512_set1_epi32(x32[m][j]), wv);
  }
  const __m512 scale = _mm512_loadu_ps(sw);
  const __m512i corr = _mm512_slli_epi32(_mm512_loadu_si512(wsum), 7);  // 128 * sum of codes
  for (int m = 0; m < MR; ++m) {
    const __m512 r = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m], corr));
    store16(out + m * ldo, _mm512_mul_ps(r, _mm512_mul_ps(scale, _mm512_set1_ps(sx[m]))));
  }
}

template <int MR, typename T>
void int4_block(const uint8_t* w, int64_t K, int64_t group, const int8_t* xq, const float* sx, const float* xsum,
                T* out, int64_t ldo) {
  const int64_t groups = K / group, per_group = group / 8;
  __m512 accf[MR];
  const int32_t* x32[MR];
  for (int m = 0; m < MR; ++m) {
    accf[m] = _mm512_setzero_ps();
    x32[m] = reinterpret_cast<const int32_t*>(xq + m * K);
  }
  const __m512i nib = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < groups; ++g) {
    __m512i lo_acc[MR], hi_acc[MR];
    for (int m = 0; m < MR; ++m) lo_acc[m] = hi_acc[m] = _mm512_setzero_si512();
    const uint8_t* head = w + g * (per_group + 1) * 64;  // 16 scales, 16 lows
    const uint8_t* wg = head + 64;
    const int64_t j0 = g * per_group * 2;
#pragma GCC unroll 4
    for (int64_t j = 0; j < per_group; ++j) {
      prefetch(wg + j * 64 + AHEAD_BYTES);
      const __m512i v = _mm512_loadu_si512(wg + j * 64);
      const __m512i lo = _mm512_and_si512(v, nib);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
      for (int m = 0; m < MR; ++m) {
        lo_acc[m] = _mm512_dpbusd_epi32(lo_acc[m], lo, _mm512_set1_epi32(x32[m][j0 + 2 * j]));
        hi_acc[m] = _mm512_dpbusd_epi32(hi_acc[m], hi, _mm512_set1_epi32(x32[m][j0 + 2 * j + 1]));
      }
    }
    const __m512 sc = bf16x16(reinterpret_cast<const uint16_t*>(head));
    const __m512 lw = bf16x16(reinterpret_cast<const uint16_t*>(head + 32));
    for (int m = 0; m < MR; ++m) {
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_acc[m], hi_acc[m]));
      accf[m] = _mm512_fmadd_ps(dot, sc, _mm512_fmadd_ps(lw, _mm512_set1_ps(xsum[m * groups + g]), accf[m]));
    }
  }
  for (int m = 0; m < MR; ++m) store16(out + m * ldo, _mm512_mul_ps(accf[m], _mm512_set1_ps(sx[m])));
}

struct Weights {
  const at::Tensor& w;
  const at::Tensor& scales;
  const at::Tensor& extra;
  int64_t bits, group, K, N;
};

template <typename T>
using Int8Block = void (*)(const int8_t*, int64_t, const uint8_t*, const float*, const float*, const int32_t*, T*,
                           int64_t);
template <typename T>
using Int4Block = void (*)(const uint8_t*, int64_t, int64_t, const int8_t*, const float*, const float*, T*, int64_t);

template <typename T>
Int8Block<T> int8_rows(int64_t rows) {  // the 8-bit block for 1..MAX_ROWS rows
  switch (rows) {
    case 1: return int8_block<1, T>;
    case 2: return int8_block<2, T>;
    case 3: return int8_block<3, T>;
    case 4: return int8_block<4, T>;
    case 5: return int8_block<5, T>;
    case 6: return int8_block<6, T>;
    case 7: return int8_block<7, T>;
    default: return int8_block<8, T>;
  }
}

template <typename T>
Int4Block<T> int4_rows(int64_t rows) {
  switch (rows) {
    case 1: return int4_block<1, T>;
    case 2: return int4_block<2, T>;
    case 3: return int4_block<3, T>;
    case 4: return int4_block<4, T>;
    case 5: return int4_block<5, T>;
    case 6: return int4_block<6, T>;
    case 7: return int4_block<7, T>;
    default: return int4_block<8, T>;
  }
}

// Rows of activations per tile: a tile's quantized rows (~256 KB) stay in a core's cache while each block of
// weights passes over all of them, 8 rows at a time (a prefill's hundreds of rows read the weights once a tile,
// not once per 8 rows; a decode step's few rows are one tile).
constexpr int64_t TILE_BYTES = 256 * 1024;

template <typename T>
void linear_all(const Weights& W, const Rows& r, int64_t M, T* out) {
  const int64_t K = W.K, N = W.N, NB = N / BLOCK;
  const int64_t tile = std::max<int64_t>(MAX_ROWS, TILE_BYTES / K / MAX_ROWS * MAX_ROWS);
  if (W.bits == 8) {
    std::vector<uint8_t> xu(M * K);
    for (int64_t i = 0; i < M * K; ++i) xu[i] = static_cast<uint8_t>(r.q[i] + 128);
    const int8_t* wp = W.w.data_ptr<int8_t>();
    const float* sw = W.scales.data_ptr<float>();
    const int32_t* ws = W.extra.data_ptr<int32_t>();
    for (int64_t t0 = 0; t0 < M; t0 += tile) {
      const int64_t t1 = std::min(M, t0 + tile);
      at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t m0 = t0; m0 < t1; m0 += MAX_ROWS)
            int8_rows<T>(t1 - m0)(wp + b * BLOCK * K, K, xu.data() + m0 * K, r.scale.data() + m0, sw + b * BLOCK,
                                  ws + b * BLOCK, out + m0 * N + b * BLOCK, N);
      });
    }
  } else {
    const int64_t groups = K / W.group;
    std::vector<float> xsum(M * groups);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < groups; ++g) {
        int32_t sum = 0;
        for (int64_t k = g * W.group; k < (g + 1) * W.group; ++k) sum += r.q[m * K + k];
        xsum[m * groups + g] = static_cast<float>(sum);
      }
    const uint8_t* wp = W.w.data_ptr<uint8_t>();
    const int64_t block_bytes = groups * (W.group / 8 + 1) * 64;
    for (int64_t t0 = 0; t0 < M; t0 += tile) {
      const int64_t t1 = std::min(M, t0 + tile);
      at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t m0 = t0; m0 < t1; m0 += MAX_ROWS)
            int4_rows<T>(t1 - m0)(wp + b * block_bytes, K, W.group, r.q.data() + m0 * K, r.scale.data() + m0,
                                  xsum.data() + m0 * groups, out + m0 * N + b * BLOCK, N);
      });
    }
  }
}

void check_packed(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& extra, int64_t out_features,
                  int64_t K, int64_t bits, int64_t group) {
  TORCH_CHECK(bits == 8 || bits == 4, "radio_cpu: 8 or 4 bits");
  TORCH_CHECK(K % 8 == 0 && out_features % BLOCK == 0, "radio_cpu: in % 8 and out % 16 must be 0");
  TORCH_CHECK(bits == 8 || (group % 8 == 0 && K % group == 0), "radio_cpu: group");
  TORCH_CHECK(w.numel() == (bits == 8 ? K * out_features : out_features / BLOCK * (K / group) * (group / 8 + 1) * 64),
              "radio_cpu: weight size");
  TORCH_CHECK(w.is_contiguous() && scales.is_contiguous() && extra.is_contiguous(), "radio_cpu: layout");
  TORCH_CHECK(bits == 4 ? w.scalar_type() == at::kByte
                        : (w.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat &&
                           scales.numel() == out_features && extra.scalar_type() == at::kInt &&
                           extra.numel() == out_features),
              "radio_cpu: operands as native.pack8_codes / pack4_codes make them");
}

// x (M, K) float32 times a packed weight into out (M, N) float32: the layer loop's product.
void product(const float* x, int64_t M, const Weights& W, float* out) {
  Rows r;
  r.q.resize(M * W.K);
  r.scale.resize(M);
  quantize(x, M, W.K, r);
  linear_all<float>(W, r, M, out);
}

at::Tensor linear(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& extra,
                  int64_t out_features, int64_t bits, int64_t group) {
  TORCH_CHECK(x_.dim() == 2, "radio_cpu::linear: x must be a (rows, in) matrix");
  TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kBFloat16, "radio_cpu::linear: float or bf16");
  const at::Tensor x = x_.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  check_packed(w, scales, extra, out_features, K, bits, group);
  at::Tensor out = at::empty({M, out_features}, x.options());
  if (M == 0) return out;
  const Rows r = quantize_rows(x);
  const Weights W{w, scales, extra, bits, group, K, out_features};
  if (x.scalar_type() == at::kBFloat16)
    linear_all<c10::BFloat16>(W, r, M, out.data_ptr<c10::BFloat16>());
  else
    linear_all<float>(W, r, M, out.data_ptr<float>());
  return out;
}

// exp(x) for x <= 0 (softmax after the maximum is taken out): 2^n * p(r), |relative error| < 2e-7.
inline __m512 exp_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// p[i] = exp(p[i] - top) for n scores whose maximum is top; returns 1 / their sum (0 where n is 0).
inline float softmax_weights(float* p, int64_t n, float top) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 rest = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(rest, p + i), _mm512_set1_ps(top)));
    _mm512_mask_storeu_ps(p + i, rest, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(rest, e));
  }
  return n ? 1.f / _mm512_reduce_add_ps(sum) : 0.f;
}

inline __m512 int8x16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// One (row, head): q (NV x 16 floats, multiplied by the scaling here) over the columns of k, v (stride int8 a
// column: NV x 16 numbers, then the float32 scale) that the mask leaves.
template <int NV>
void attend_pair(const float* q, float scaling, const int8_t* k, const int8_t* v, int64_t stride, const float* bias,
                 int64_t W, std::vector<float>& scores, std::vector<int32_t>& live, float* out) {
  constexpr int64_t D = NV * 16;
  __m512 qv[NV], o[NV];
  for (int i = 0; i < NV; ++i) {
    qv[i] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * i), _mm512_set1_ps(scaling));
    o[i] = _mm512_setzero_ps();
  }
  live.clear();
  scores.clear();
  float top = -INFINITY;
  for (int64_t t = 0; t < W; ++t) {
    if (bias[t] < -6e4f) continue;  // masked (the mask holds its dtype's minimum): the softmax gives it nothing
    const int8_t* kt = k + t * stride;
    prefetch(kt + AHEAD_COLUMNS * stride);  // past the row's last column: the next (row, head)'s, or nothing
    __m512 acc = _mm512_mul_ps(qv[0], int8x16(kt));
    for (int i = 1; i < NV; ++i) acc = _mm512_fmadd_ps(qv[i], int8x16(kt + 16 * i), acc);
    float scale;
    std::memcpy(&scale, kt + D, sizeof(float));
    const float s = _mm512_reduce_add_ps(acc) * scale + bias[t];
    live.push_back(static_cast<int32_t>(t));
    scores.push_back(s);
    top = std::max(top, s);
  }
  const int64_t n = static_cast<int64_t>(scores.size());
  float* p = scores.data();
  const float inv = softmax_weights(p, n, top);
  for (int64_t j = 0; j < n; ++j) {
    const int8_t* vt = v + static_cast<int64_t>(live[j]) * stride;
    if (j + AHEAD_COLUMNS < n) prefetch(v + static_cast<int64_t>(live[j + AHEAD_COLUMNS]) * stride);
    float scale;
    std::memcpy(&scale, vt + D, sizeof(float));
    const __m512 w = _mm512_set1_ps(p[j] * inv * scale);
    for (int i = 0; i < NV; ++i) o[i] = _mm512_fmadd_ps(w, int8x16(vt + 16 * i), o[i]);
  }
  for (int i = 0; i < NV; ++i) _mm512_storeu_ps(out + 16 * i, o[i]);
}

// An 8-bit key and value cache as attend_pair reads it: int8 (rows, heads, columns, head size + 4), each column's
// numbers and scale contiguous, the two alike.
void check_cache8(const at::Tensor& k, const at::Tensor& v, int64_t R, int64_t H, int64_t W, int64_t d) {
  TORCH_CHECK(k.dim() == 4 && k.scalar_type() == at::kChar && v.sizes() == k.sizes() && v.strides() == k.strides() &&
                  k.size(0) == R && k.size(1) == H && k.size(2) == W && k.size(3) == d + 4 && k.stride(3) == 1 &&
                  k.stride(2) == d + 4,
              "radio_cpu: 8-bit caches (rows, heads, columns, head size + 4) alike, each column contiguous");
}

using PairFn = void (*)(const float*, float, const int8_t*, const int8_t*, int64_t, const float*, int64_t,
                        std::vector<float>&, std::vector<int32_t>&, float*);

PairFn pair_fn(int64_t d) {
  switch (d) {
    case 16: return attend_pair<1>;
    case 32: return attend_pair<2>;
    case 48: return attend_pair<3>;
    case 64: return attend_pair<4>;
    case 80: return attend_pair<5>;
    case 96: return attend_pair<6>;
    case 112: return attend_pair<7>;
    case 128: return attend_pair<8>;
    default: return nullptr;
  }
}

at::Tensor attend8(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                   double scaling) {
  TORCH_CHECK(q.dim() == 3, "radio_cpu::attend8: q (rows, heads, head size)");
  const int64_t R = q.size(0), H = q.size(1), D = q.size(2), W = k.size(2);
  const PairFn fn = pair_fn(D);
  TORCH_CHECK(fn != nullptr, "radio_cpu::attend8: head sizes 16, 32, ... 128");
  check_cache8(k, v, R, H, W, D);
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == R && bias.size(1) == W, "radio_cpu::attend8: bias (rows, columns)");
  const at::Tensor bf = bias.to(at::kFloat).contiguous();
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({R, H, D}, q.options().dtype(at::kFloat));
  const float* qp = qf.data_ptr<float>();
  const float* bp = bf.data_ptr<float>();
  const int8_t* kp = k.data_ptr<int8_t>();
  const int8_t* vp = v.data_ptr<int8_t>();
  float* op = out.data_ptr<float>();
  const int64_t s0 = k.stride(0), s1 = k.stride(1);
  at::parallel_for(0, R * H, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> scores;
    std::vector<int32_t> live;
    scores.reserve(W);
    live.reserve(W);
    for (int64_t pair = p0; pair < p1; ++pair) {
      const int64_t r = pair / H, h = pair % H;
      fn(qp + pair * D, static_cast<float>(scaling), kp + r * s0 + h * s1, vp + r * s0 + h * s1, D + 4,
         bp + r * W, W, scores, live, op + pair * D);
    }
  });
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

// -- decode_layers: a decode step's decoder layers in one call ----------------------------------------------------
// The dynamic layout's step (step.row_logits) with radio's products and an 8-bit cache: R rows of one new token
// each through every layer, in float32 between the products (the eager step rounds to bf16 after each). Called
// from Python once a step instead of once a layer: a compiled layer's call costs ~150 us around its C++ loops
// (the compiler's Python wrapper and guards), ~4 ms of a 20 ms step on two cores.

void layer_norm(const float* x, int64_t R, int64_t D, const float* w, const float* b, float eps, float* y) {
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    __m512 s = _mm512_setzero_ps();
    for (int64_t k = 0; k < D; k += 16) s = _mm512_add_ps(s, _mm512_loadu_ps(xr + k));
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(s) / static_cast<float>(D));
    __m512 v = _mm512_setzero_ps();
    for (int64_t k = 0; k < D; k += 16) {
      const __m512 c = _mm512_sub_ps(_mm512_loadu_ps(xr + k), mean);
      v = _mm512_fmadd_ps(c, c, v);
    }
    const __m512 rstd = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(v) / static_cast<float>(D) + eps));
    for (int64_t k = 0; k < D; k += 16) {
      const __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xr + k), mean), rstd);
      _mm512_storeu_ps(yr + k, _mm512_fmadd_ps(c, _mm512_loadu_ps(w + k), _mm512_loadu_ps(b + k)));
    }
  }
}

void add_rows(float* h, const float* x, int64_t R, int64_t D, int64_t ldx) {  // h (R, D) += x (R, D; row stride ldx)
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < D; k += 16)
      _mm512_storeu_ps(h + r * D + k, _mm512_add_ps(_mm512_loadu_ps(h + r * D + k), _mm512_loadu_ps(x + r * ldx + k)));
}

// One token of one head as decoding.kv8_pack packs it: d int8 numbers (x / scale rounded half up), then the
// float32 scale (absolute maximum / 127).
void kv8_write(const float* x, int64_t d, int8_t* dst) {
  float amax = 0.f;
  for (int64_t i = 0; i < d; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = std::max(amax / 127.f, 1e-12f);
  for (int64_t i = 0; i < d; ++i)
    dst[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::floor(x[i] / scale + 0.5f))));
  std::memcpy(dst + d, &scale, sizeof(float));
}

// One (row, head) of the cross-attention: q (d floats) over S prompt tokens k, v (T: float or bf16; token t at
// t * stride, d contiguous numbers) with an additive mask.
template <typename T>
void cross_pair(const float* q, float scaling, const T* k, const T* v, int64_t stride, const float* bias, int64_t S,
                int64_t d, std::vector<float>& scores, float* out) {
  scores.resize(S);
  float top = -INFINITY;
  for (int64_t t = 0; t < S; ++t) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(k + t * stride + i, 0xFFFF), acc);
    scores[t] = _mm512_reduce_add_ps(acc) * scaling + bias[t];
    top = std::max(top, scores[t]);
  }
  const float inv = softmax_weights(scores.data(), S, top);
  for (int64_t i = 0; i < d; i += 16) {
    __m512 o = _mm512_setzero_ps();
    for (int64_t t = 0; t < S; ++t)
      o = _mm512_fmadd_ps(_mm512_set1_ps(scores[t] * inv), load16(v + t * stride + i, 0xFFFF), o);
    _mm512_storeu_ps(out + i, o);
  }
}

// Product ``index``'s packed weight (bits by its dtype; a 4-bit one's group by its width: 64 + 8 x group bytes).
Weights packed_at(at::TensorList weights, int64_t index, int64_t K, int64_t N) {
  const at::Tensor& w = weights[index * 3];
  const int64_t bits = w.scalar_type() == at::kChar ? 8 : 4;
  const int64_t group = bits == 8 ? 8 : (w.dim() == 3 ? (w.size(2) - 64) / 8 : 0);
  check_packed(w, weights[index * 3 + 1], weights[index * 3 + 2], N, K, bits, group);
  return Weights{w, weights[index * 3 + 1], weights[index * 3 + 2], bits, group, K, N};
}

at::Tensor decode_layers(const at::Tensor& h_in, at::TensorList norms, at::TensorList weights, at::TensorList kc,
                         at::TensorList vc, at::TensorList xk, at::TensorList xv, const at::Tensor& uncond,
                         const at::Tensor& columns, const at::Tensor& self_bias, const at::Tensor& cross_bias,
                         int64_t heads, int64_t ffn, double eps, double scaling, bool halves) {
  const int64_t L = static_cast<int64_t>(kc.size());
  TORCH_CHECK(h_in.dim() == 2 && (h_in.scalar_type() == at::kFloat || h_in.scalar_type() == at::kBFloat16),
              "radio_cpu::decode_layers: h (rows, width) float or bf16");
  const int64_t R = h_in.size(0), D = h_in.size(1), d = heads > 0 ? D / heads : 0, F = ffn;
  const int64_t n = halves ? R / 2 : R;
  const PairFn fn = pair_fn(d);
  TORCH_CHECK(fn != nullptr && d * heads == D && D % 16 == 0 && F % 16 == 0 && (!halves || R % 2 == 0),
              "radio_cpu::decode_layers: widths");
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 6 * L && static_cast<int64_t>(weights.size()) == 18 * L &&
                  static_cast<int64_t>(vc.size()) == L && static_cast<int64_t>(xk.size()) == L &&
                  static_cast<int64_t>(xv.size()) == L,
              "radio_cpu::decode_layers: per layer 6 norm tensors, 6 products of 3 tensors, 4 caches");
  for (const at::Tensor& t : norms)
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == D,
                "radio_cpu::decode_layers: norms");
  TORCH_CHECK(uncond.scalar_type() == at::kFloat && uncond.is_contiguous() && uncond.numel() == L * D,
              "radio_cpu::decode_layers: uncond (layers, width) float");
  TORCH_CHECK(columns.scalar_type() == at::kLong && columns.is_contiguous() && columns.numel() == R,
              "radio_cpu::decode_layers: columns (rows,) int64");
  const int64_t W = L ? kc[0].size(2) : 0;
  TORCH_CHECK(self_bias.scalar_type() == at::kFloat && self_bias.is_contiguous() && self_bias.dim() == 2 &&
                  self_bias.size(0) == R && self_bias.size(1) == W,
              "radio_cpu::decode_layers: self_bias (rows, columns) float");
  const int64_t S = L ? xk[0].size(2) : 0;
  TORCH_CHECK(cross_bias.scalar_type() == at::kFloat && cross_bias.is_contiguous() && cross_bias.dim() == 2 &&
                  cross_bias.size(0) == n && cross_bias.size(1) == S,
              "radio_cpu::decode_layers: cross_bias (conditional rows, prompt) float");
  const int64_t* col = columns.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(col[r] >= 0 && col[r] < W, "radio_cpu::decode_layers: column");
  for (int64_t i = 0; i < L; ++i) {
    check_cache8(kc[i], vc[i], R, heads, W, d);
    const at::Tensor &a = xk[i], &b = xv[i];
    TORCH_CHECK(a.dim() == 4 && a.sizes() == b.sizes() && a.strides() == b.strides() && a.size(0) == n &&
                    a.size(1) == heads && a.size(2) == S && a.size(3) == d && a.stride(3) == 1 &&
                    a.scalar_type() == b.scalar_type() &&
                    (a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16),
                "radio_cpu::decode_layers: prompt keys and values (conditional rows, heads, prompt, head size)");
  }
  std::vector<Weights> W6;
  W6.reserve(6 * L);
  for (int64_t i = 0; i < L; ++i) {
    const int64_t shapes[6][2] = {{D, 3 * D}, {D, D}, {D, D}, {D, D}, {D, F}, {F, D}};  // (in, out)
    for (int64_t j = 0; j < 6; ++j) W6.push_back(packed_at(weights, i * 6 + j, shapes[j][0], shapes[j][1]));
  }

  const auto opts = h_in.options().dtype(at::kFloat);
  at::Tensor h = h_in.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();  // the loop's own rows
  at::Tensor y = at::empty({R, D}, opts), qkv = at::empty({R, 3 * D}, opts), a = at::empty({R, D}, opts);
  at::Tensor o = at::empty({R, D}, opts), f = at::empty({R, F}, opts);
  float *hp = h.data_ptr<float>(), *yp = y.data_ptr<float>(), *qp = qkv.data_ptr<float>(), *ap = a.data_ptr<float>();
  float *op = o.data_ptr<float>(), *fp = f.data_ptr<float>();
  const float* sb = self_bias.data_ptr<float>();
  const float* cb = cross_bias.data_ptr<float>();
  const float s = static_cast<float>(scaling), e = static_cast<float>(eps);
  for (int64_t i = 0; i < L; ++i) {
    const float* ln[6];
    for (int j = 0; j < 6; ++j) ln[j] = norms[i * 6 + j].data_ptr<float>();
    const Weights* P = W6.data() + i * 6;
    // self-attention: the new key and value into the cache, then the row's columns the mask leaves
    layer_norm(hp, R, D, ln[0], ln[1], e, yp);
    product(yp, R, P[0], qp);
    int8_t* kp = kc[i].data_ptr<int8_t>();
    int8_t* vp = vc[i].data_ptr<int8_t>();
    const int64_t s0 = kc[i].stride(0), s1 = kc[i].stride(1);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t hh = 0; hh < heads; ++hh) {
        const int64_t at_ = r * s0 + hh * s1 + col[r] * (d + 4);
        kv8_write(qp + r * 3 * D + D + hh * d, d, kp + at_);
        kv8_write(qp + r * 3 * D + 2 * D + hh * d, d, vp + at_);
      }
    at::parallel_for(0, R * heads, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> scores;
      std::vector<int32_t> live;
      scores.reserve(W);
      live.reserve(W);
      for (int64_t pair = p0; pair < p1; ++pair) {
        const int64_t r = pair / heads, hh = pair % heads;
        fn(qp + r * 3 * D + hh * d, s, kp + r * s0 + hh * s1, vp + r * s0 + hh * s1, d + 4, sb + r * W, W, scores,
           live, ap + r * D + hh * d);
      }
    });
    product(ap, R, P[1], op);
    add_rows(hp, op, R, D, D);
    // cross-attention: the conditional rows over their prompts; the unconditional rows add the layer's constant
    layer_norm(hp, R, D, ln[2], ln[3], e, yp);
    product(yp, n, P[2], op);
    const at::Tensor &xki = xk[i], &xvi = xv[i];
    const int64_t c0 = xki.stride(0), c1 = xki.stride(1), c2 = xki.stride(2);
    const bool bf = xki.scalar_type() == at::kBFloat16;
    at::parallel_for(0, n * heads, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> scores;
      for (int64_t pair = p0; pair < p1; ++pair) {
        const int64_t r = pair / heads, hh = pair % heads, base = r * c0 + hh * c1;
        if (bf)
          cross_pair(op + r * D + hh * d, s, xki.data_ptr<c10::BFloat16>() + base,
                     xvi.data_ptr<c10::BFloat16>() + base, c2, cb + r * S, S, d, scores, ap + r * D + hh * d);
        else
          cross_pair(op + r * D + hh * d, s, xki.data_ptr<float>() + base, xvi.data_ptr<float>() + base, c2,
                     cb + r * S, S, d, scores, ap + r * D + hh * d);
      }
    });
    product(ap, n, P[3], op);
    add_rows(hp, op, n, D, D);
    if (halves) add_rows(hp + n * D, uncond.data_ptr<float>() + i * D, R - n, D, 0);
    // feed-forward
    layer_norm(hp, R, D, ln[4], ln[5], e, yp);
    product(yp, R, P[4], fp);
    at::gelu_(f);
    product(fp, R, P[5], op);
    add_rows(hp, op, R, D, D);
  }
  return h_in.scalar_type() == at::kFloat ? h : h.to(h_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY(radio_cpu, m) {
  m.def("linear(Tensor x, Tensor w, Tensor scales, Tensor extra, int out_features, int bits, int group) -> Tensor");
  m.def("attend8(Tensor q, Tensor k, Tensor v, Tensor bias, float scaling) -> Tensor");
  m.def("decode_layers(Tensor h, Tensor[] norms, Tensor[] weights, Tensor(a!)[] kc, Tensor(b!)[] vc, Tensor[] xk, "
        "Tensor[] xv, Tensor uncond, Tensor columns, Tensor self_bias, Tensor cross_bias, int heads, int ffn, "
        "float eps, float scaling, bool halves) -> Tensor");
}

TORCH_LIBRARY_IMPL(radio_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("attend8", &attend8);
  m.impl("decode_layers", &decode_layers);
}
