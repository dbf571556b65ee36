// One decode step of grouped-query attention, float32, as an XLA FFI CPU handler:
//   out[b, k, g] = sum_s softmax_s(q[b, k, g] . key[b, k, s] + bias[b, k, g, s]) value[b, k, s]
// q [B, K, G, H], key and value [B, K, S, H] (the decode cache's layout), bias [B, K, G, S],
// out [B, K, G, H]. Each (b, k) reads its key and value rows once, for all G queries of the
// group, which is what makes a smaller K cheaper; XLA's CPU kernels run the [G, H] x [H, S]
// and [G, S] x [S, H] products of a step several times below memory bandwidth.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// W floats (and W int32s, for exp's bit tricks) in one vector.
template <int W>
struct Vec {
  typedef float f __attribute__((vector_size(4 * W), aligned(4)));
  typedef int32_t i __attribute__((vector_size(4 * W), aligned(4)));
};
typedef Vec<16>::f v16;

inline float sum16(v16 v) {
#ifdef __AVX512F__
  return _mm512_reduce_add_ps(__builtin_bit_cast(__m512, v));
#else
  float total = 0.0f;
  for (int j = 0; j < 16; ++j) total += v[j];
  return total;
#endif
}

// sum_i a[i] b[i].
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float total = 0.0f;
  if (n >= 16) {
    v16 acc{};
    for (; i + 16 <= n; i += 16) {
      acc += *reinterpret_cast<const v16*>(a + i) * *reinterpret_cast<const v16*>(b + i);
    }
    total = sum16(acc);
  }
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

constexpr int64_t kBlockS = 32;  // value rows per block: 8 KiB at H 64, kept in L1

// out[g, :] = sum_s probs[g * g_stride + s * s_stride] value[s, :] / total[g] for g < G; value
// [S, H]. Blocks of rows are read once from memory and then from L1 for each g, and each g's
// running sum over a block stays in registers, 64 columns at a time.
void weighted_values(const float* probs, int64_t g_stride, int64_t s_stride, const float* total,
                     const float* value, int64_t G, int64_t S, int64_t H, float* out) {
  std::fill(out, out + G * H, 0.0f);
  for (int64_t s0 = 0; s0 < S; s0 += kBlockS) {
    const int64_t s1 = std::min(S, s0 + kBlockS);
    for (int64_t g = 0; g < G; ++g) {
      const float* p = probs + g * g_stride;
      float* o = out + g * H;
      int64_t h0 = 0;
      for (; h0 + 64 <= H; h0 += 64) {
        v16* a = reinterpret_cast<v16*>(o + h0);
        v16 a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
        for (int64_t s = s0; s < s1; ++s) {
          const float w = p[s * s_stride];
          const v16* row = reinterpret_cast<const v16*>(value + s * H + h0);
          a0 += w * row[0];
          a1 += w * row[1];
          a2 += w * row[2];
          a3 += w * row[3];
        }
        a[0] = a0;
        a[1] = a1;
        a[2] = a2;
        a[3] = a3;
      }
      for (int64_t s = s0; s < s1 && h0 < H; ++s) {
        for (int64_t h = h0; h < H; ++h) o[h] += p[s * s_stride] * value[s * H + h];
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t h = 0; h < H; ++h) out[g * H + h] /= total[g];
  }
}

// exp of W floats: 2^n exp(r) with r = x - n ln 2 in [-ln2/2, ln2/2] and a degree-6 Taylor
// polynomial (relative error under 2e-7); 0 below -87 (the masks' -1e10 lands there).
template <int W>
inline typename Vec<W>::f expv(typename Vec<W>::f x) {
  using V = typename Vec<W>::f;
  using VI = typename Vec<W>::i;
  const V magic = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const VI underflow = x < -87.0f;
  x = x < -87.0f ? V{} - 87.0f : x;
  x = x > 88.0f ? V{} + 88.0f : x;
  const V t = x * 1.44269504088896341f + magic;
  const V n = t - magic;
  const V r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  V p = V{} + (1.0f / 720);
  p = p * r + (1.0f / 120);
  p = p * r + (1.0f / 24);
  p = p * r + (1.0f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VI bits = (__builtin_bit_cast(VI, t) - __builtin_bit_cast(VI, magic) + 127) << 23;
  const V scaled = p * __builtin_bit_cast(V, bits);
  return underflow ? V{} : scaled;
}

// In place: row <- exp(row - max(row)); returns the sum.
float exp_shifted(float* row, int64_t n) {
  float m = row[0];
  for (int64_t i = 1; i < n; ++i) m = std::max(m, row[i]);
  float total = 0.0f;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v16* v = reinterpret_cast<v16*>(row + i);
    *v = expv<16>(*v - m);
    for (int j = 0; j < 16; ++j) total += (*v)[j];
  }
  for (; i < n; ++i) total += row[i] = std::exp(row[i] - m);
  return total;
}

struct Shapes {
  int64_t B, K, G, S, H;
};

// From this many queries per kv head on, logits are computed with one query per vector lane
// (a broadcast key element times all queries' elements); below it, one dot product per query
// and key row, whose horizontal sum would otherwise dominate a GQA or MQA step.
constexpr int64_t kLanesFromG = 8;
constexpr int64_t kMaxLanes = 16;

// One kv head with G <= W queries in the lanes of W-float vectors: q [G, H], key/value [S, H],
// bias [G, S], out [G, H]. Scratch: lanes [S, W] and qt [H, W] floats.
template <int W>
void head_lanes(const Shapes& d, int64_t G, const float* q, const float* key, const float* value,
                const float* bias, float* out, float* lanes, float* qt) {
  using V = typename Vec<W>::f;
  V* lv = reinterpret_cast<V*>(lanes);  // [S] vectors
  V* qv = reinterpret_cast<V*>(qt);     // [H] vectors: qv[h][g] = q[g, h], unused lanes 0
  for (int64_t h = 0; h < d.H; ++h) {
    qv[h] = V{};
    for (int64_t g = 0; g < G; ++g) qv[h][g] = q[g * d.H + h];
  }
  for (int64_t s = 0; s < d.S; ++s) {  // each key row once, for all G queries
    const float* row = key + s * d.H;
    V a0{}, a1{}, a2{}, a3{};  // four chains, so that the FMAs overlap
    int64_t h = 0;
    for (; h + 4 <= d.H; h += 4) {
      a0 += row[h] * qv[h];
      a1 += row[h + 1] * qv[h + 1];
      a2 += row[h + 2] * qv[h + 2];
      a3 += row[h + 3] * qv[h + 3];
    }
    for (; h < d.H; ++h) a0 += row[h] * qv[h];
    lv[s] = (a0 + a1) + (a2 + a3);
  }
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t s = 0; s < d.S; ++s) lanes[s * W + g] += bias[g * d.S + s];
  }
  V m = lv[0];
  for (int64_t s = 1; s < d.S; ++s) m = m > lv[s] ? m : lv[s];
  V total{};
  for (int64_t s = 0; s < d.S; ++s) total += lv[s] = expv<W>(lv[s] - m);
  float totals[W];
  for (int g = 0; g < W; ++g) totals[g] = total[g];
  weighted_values(lanes, 1, W, totals, value, G, d.S, d.H, out);
}

// One kv head with few queries, one dot product per query and key row; same operands, and
// scratch for [G, S] logits and [G] sums.
void head_dots(const Shapes& d, const float* q, const float* key, const float* value,
               const float* bias, float* out, float* logits, float* total) {
  for (int64_t s = 0; s < d.S; ++s) {  // each key row once, for all G queries
    const float* row = key + s * d.H;
    for (int64_t g = 0; g < d.G; ++g) logits[g * d.S + s] = dot(q + g * d.H, row, d.H);
  }
  for (int64_t g = 0; g < d.G; ++g) {
    float* lg = logits + g * d.S;
    for (int64_t s = 0; s < d.S; ++s) lg[s] += bias[g * d.S + s];
    total[g] = exp_shifted(lg, d.S);
  }
  weighted_values(logits, d.S, 1, total, value, d.G, d.S, d.H, out);
}

// Attention for the kv heads [i0, i1) of the flattened (b, k) axis.
void heads(const Shapes& d, const float* q, const float* key, const float* value,
           const float* bias, float* out, int64_t i0, int64_t i1) {
  const bool lanes = d.G >= kLanesFromG;
  // [S, W] logits, then [H, W] transposed queries
  std::vector<float> lane_buf(lanes ? (d.S + d.H) * kMaxLanes : 0);
  std::vector<float> logits(lanes ? 0 : d.G * d.S + d.G);  // [G, S], then [G] sums
  for (int64_t i = i0; i < i1; ++i) {
    const float* qi = q + i * d.G * d.H;
    const float* ki = key + i * d.S * d.H;
    const float* vi = value + i * d.S * d.H;
    const float* bi = bias + i * d.G * d.S;
    float* oi = out + i * d.G * d.H;
    if (!lanes) {
      head_dots(d, qi, ki, vi, bi, oi, logits.data(), logits.data() + d.G * d.S);
      continue;
    }
    float* qt = lane_buf.data() + d.S * kMaxLanes;
    if (d.G <= 8) {  // 8-float vectors: no idle lanes at G 8 (MQA with 8 heads)
      head_lanes<8>(d, d.G, qi, ki, vi, bi, oi, lane_buf.data(), qt);
      continue;
    }
    for (int64_t g0 = 0; g0 < d.G; g0 += kMaxLanes) {  // 16 queries at a time
      head_lanes<16>(d, std::min(kMaxLanes, d.G - g0), qi + g0 * d.H, ki, vi, bi + g0 * d.S,
                     oi + g0 * d.H, lane_buf.data(), qt);
    }
  }
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> key, ffi::Buffer<ffi::F32> value,
                               ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = key.dimensions(), vd = value.dimensions(),
             bd = bias.dimensions(), od = out->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || bd.size() != 4 || od.size() != 4) {
    return ffi::Error::InvalidArgument("gqa_decode_attention: expected rank-4 operands");
  }
  const Shapes d{qd[0], qd[1], qd[2], kd[2], qd[3]};
  bool ok = kd[0] == d.B && kd[1] == d.K && kd[3] == d.H && d.S > 0;
  for (int64_t j = 0; j < 4; ++j) ok = ok && vd[j] == kd[j] && od[j] == qd[j];
  ok = ok && bd[0] == d.B && bd[1] == d.K && bd[2] == d.G && bd[3] == d.S;
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "gqa_decode_attention: expected q [B, K, G, H], key and value [B, K, S, H], "
        "bias [B, K, G, S] and out [B, K, G, H]");
  }
  const float* qp = q.typed_data();
  const float* kp = key.typed_data();
  const float* vp = value.typed_data();
  const float* bp = bias.typed_data();
  float* op = out->typed_data();
  const int64_t items = d.B * d.K;
  // Contiguous ranges of kv heads, none under 256 KiB of keys and values.
  const int64_t parts = std::min(items, gqa_t5x::NumParts(pool, items * d.S * d.H, 32 * 1024));
  gqa_t5x::ParallelFor(pool, parts, [=](int64_t p) {
    heads(d, qp, kp, vp, bp, op, items * p / parts, items * (p + 1) / parts);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GqaDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
