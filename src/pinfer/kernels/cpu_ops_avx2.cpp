// pinfer's kernels for CPUs without AVX-512 but with AVX2 and FMA (AMD Zen 1-3, Intel client
// cores since Alder Lake), registered as torch.ops.pinfer.*; see kernels/__init__.py. A subset
// of cpu_ops.cpp's, with the same schemas (cpu_ops_entry.h) and results to float rounding: the
// bf16 GEMM (also built on AVX-512 CPUs without AVX512-BF16, where cpu_ops.cpp has none), the
// int8 GEMM and activation quantization, paged decode attention and (by the same arithmetic)
// prefill attention, RMSNorm, RoPE, SwiGLU, the Gumbel sampler, argmax and, from those, the
// decode stack for bf16 and int8 linears. int8 KV pools and the int4 GEMM keep the PyTorch path
// on these CPUs.
//
// The bf16 GEMM. On such CPUs neither oneDNN nor aten has a fast bf16 matmul: torch 2.13's
// F.linear in bf16 runs at ~8 GFLOPS a core on a Zen 3 (float32's MKL sgemm: ~67), and oneDNN
// refuses to pack a bf16 weight at all ("needs avx_ne_convert or avx512bw..."). bf16 weights
// still halve what batch-1 decode reads, and widening bf16 to float32 is a shift: this kernel
// keeps the weights in bf16 and multiplies in float32 with FMA.
//
// The weight is packed as for cpu_ops.cpp's GEMMs, [N / 16, K / 2, 16, 2] (kernels.pack_for_gemm):
// one 64-byte group holds k and k + 1 of 16 columns, a 32-bit lane per column. Two 256-bit
// loads cover the 16 columns; a lane's low half is k (shifted up 16 bits it is that float),
// its high half k + 1 (masked, it is that float). The input rows are widened to float32 once,
// so each k of a row is a broadcast load. Register tile: 6 rows x 16 columns, or at batch 1,
// 1 row x 32 columns. Sums are float32 in k order, + bias, rounded to bf16 once.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace {

using bf16 = at::BFloat16;

// float32 -> bf16 bits, round to nearest even; NaN stays a (quiet) NaN, as in c10::BFloat16.
inline __m128i to_bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC00000), nan);
  const __m256i high = _mm256_srli_epi32(rounded, 16);  // 0..65535: packus keeps them as they are
  const __m256i packed = _mm256_packus_epi32(high, high);  // lanes 0-3 | 0-3 | 4-7 | 4-7
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

#if !defined(__AVX512BF16__)
// One tile: MR rows x NV vectors of 8 columns (NV = 2 is one 16-column block of the packing,
// NV = 4 two): batch 1's, 1 x 4. x: the rows widened to float32, k-contiguous; w: the tile's
// first block.
template <int MR, int NV>
__attribute__((noinline)) void bf16_dots(const float* x, int64_t x_stride, const uint8_t* w, int64_t block_bytes,
                                         int64_t groups, __m256* sums) {
  const __m256i high_half = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m256 acc[MR][NV];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 even[NV], odd[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {  // vector j: block j / 2, its columns 8 (j % 2) .. + 7
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (j / 2) * block_bytes + g * 64 + (j % 2) * 32));
      even[j] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      odd[j] = _mm256_castsi256_ps(_mm256_and_si256(v, high_half));
    }
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const __m256 x0 = _mm256_broadcast_ss(x + i * x_stride + 2 * g);
      const __m256 x1 = _mm256_broadcast_ss(x + i * x_stride + 2 * g + 1);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm256_fmadd_ps(x1, odd[j], _mm256_fmadd_ps(x0, even[j], acc[i][j]));
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) sums[i * NV + j] = acc[i][j];
}

// The same sums for up to 6 rows x one block: each k's widened weights are made from the
// group's loads in turn (k, then k + 1), so 6 rows x 2 vectors of accumulators fit beside them
// (12 + 2 + a broadcast; 8-11% more GFLOPS than 4 rows x 2 with both k's widened at once, in
// alternated runs of SmolLM2's shapes at 64 and 1,002 rows).
template <int MR>
__attribute__((noinline)) void bf16_dots_tall(const float* x, int64_t x_stride, const uint8_t* w, int64_t groups,
                                              __m256* sums) {
  const __m256i high_half = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i* wg = reinterpret_cast<const __m256i*>(w + g * 64);
    const __m256 even0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(wg), 16));
    const __m256 even1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(wg + 1), 16));
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 x0 = _mm256_broadcast_ss(x + i * x_stride + 2 * g);
      acc[i][0] = _mm256_fmadd_ps(x0, even0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(x0, even1, acc[i][1]);
    }
    const __m256 odd0 = _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(wg), high_half));
    const __m256 odd1 = _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(wg + 1), high_half));
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 x1 = _mm256_broadcast_ss(x + i * x_stride + 2 * g + 1);
      acc[i][0] = _mm256_fmadd_ps(x1, odd0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(x1, odd1, acc[i][1]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) sums[2 * i] = acc[i][0], sums[2 * i + 1] = acc[i][1];
}

constexpr int kTileRows = 6;
// Rows widened to float32 per pass over a thread's columns: ~192 KB of them, so they stay in L2
// while the weights stream past.
constexpr int64_t kPanelBytes = 192 * 1024;

// The column-block loop both GEMMs share: each thread takes a range of the N / 16 column blocks.
// At batch 1, one_row(block, blocks) computes 2 blocks at a time (1 for an odd last one), the
// weights read once; else, for each panel of panel_rows input rows (kept in L2 while the weights
// stream past), tile(row, rows, block) computes up to tile_rows rows of one block, whose weights
// stay in L1/L2 across the panel.
template <class OneRow, class Tile>
void gemm_blocks(int64_t m_dim, int64_t n_blocks, int64_t panel_rows, int tile_rows, const OneRow& one_row,
                 const Tile& tile) {
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    if (m_dim == 1) {
      int64_t nb = begin;
      for (; nb + 2 <= end; nb += 2) one_row(nb, 2);
      if (nb < end) one_row(nb, 1);
      return;
    }
    for (int64_t m0 = 0; m0 < m_dim; m0 += panel_rows) {
      const int64_t m1 = std::min(m_dim, m0 + panel_rows);
      for (int64_t nb = begin; nb < end; ++nb)
        for (int64_t i = m0; i < m1; i += tile_rows) tile(i, static_cast<int>(std::min<int64_t>(tile_rows, m1 - i)), nb);
    }
  });
}

at::Tensor bf16_gemm(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  // x bf16 [M, K]; packed bf16 [N / 16, K / 2, 16, 2]; bias [N] (any float dtype) or None
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && packed.is_contiguous() && packed.dim() == 4,
              "bf16_gemm: x [M, K] contiguous, weight packed [N / 16, K / 2, 16, 2]");
  TORCH_CHECK(packed.size(1) * 2 == x.size(1) && packed.size(2) == 16 && packed.size(3) == 2,
              "bf16_gemm: weight packed for K = ", packed.size(1) * 2, ", input has K = ", x.size(1));
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16, "bf16_gemm: bfloat16 only");
  const int64_t m_dim = x.size(0), k_dim = x.size(1), n_blocks = packed.size(0), n_dim = n_blocks * 16;
  const int64_t groups = k_dim / 2, block_bytes = groups * 64;
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n_dim, "bf16_gemm: bias has ", bias->numel(), " values for ", n_dim, " outputs");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const at::Tensor xf = x.to(at::kFloat);  // M x K floats: small next to the N x K weight
  const float* xp = xf.data_ptr<float>();
  const uint8_t* w = reinterpret_cast<const uint8_t*>(packed.data_ptr<bf16>());
  auto out = at::empty({m_dim, n_dim}, x.options());
  bf16* op = out.data_ptr<bf16>();

  auto store = [&](int64_t row, int rows, int64_t column, int vectors, const __m256* sums) {
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < vectors; ++j) {
        const int64_t n = column + 8 * j;
        __m256 v = sums[i * vectors + j];
        if (bp != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(bp + n));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(op + (row + i) * n_dim + n), to_bf16_bits(v));
      }
  };
  const int64_t panel_rows = std::max<int64_t>(kTileRows, kPanelBytes / (k_dim * 4) / kTileRows * kTileRows);
  gemm_blocks(
      m_dim, n_blocks, panel_rows, kTileRows,
      [&](int64_t nb, int blocks) {
        alignas(32) __m256 sums[4];
        if (blocks == 2) bf16_dots<1, 4>(xp, k_dim, w + nb * block_bytes, block_bytes, groups, sums);
        else bf16_dots<1, 2>(xp, k_dim, w + nb * block_bytes, block_bytes, groups, sums);
        store(0, 1, nb * 16, 2 * blocks, sums);
      },
      [&](int64_t i, int rows, int64_t nb) {
        alignas(32) __m256 sums[kTileRows * 2];
        const float* xi = xp + i * k_dim;
        const uint8_t* wb = w + nb * block_bytes;
        switch (rows) {
          case 6: bf16_dots_tall<6>(xi, k_dim, wb, groups, sums); break;
          case 5: bf16_dots_tall<5>(xi, k_dim, wb, groups, sums); break;
          case 4: bf16_dots_tall<4>(xi, k_dim, wb, groups, sums); break;
          case 3: bf16_dots_tall<3>(xi, k_dim, wb, groups, sums); break;
          case 2: bf16_dots_tall<2>(xi, k_dim, wb, groups, sums); break;
          default: bf16_dots_tall<1>(xi, k_dim, wb, groups, sums); break;
        }
        store(i, rows, nb * 16, 2, sums);
      });
  return out;
}
#endif  // !__AVX512BF16__

#if !(defined(__AVX512F__) && defined(__AVX512BW__))
// ---- 8 floats at a time: the AVX-512 set's ops on CPUs that lack it -------------------------

#include "cpu_ops_entry.h"  // the entry points both kernel files share

// Sleef's vector exp, exported by libtorch_cpu: the one aten's float ops use, so the same bits.
extern "C" __m256 Sleef_expf8_u10(__m256);
extern "C" __m256 Sleef_logf8_u10(__m256);

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(bf16* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16_bits(v)); }

inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The value a float takes once stored as T: rounding to bf16 between two ops, as aten does.
inline __m256 round_as(__m256 v, const float*) { return v; }
inline __m256 round_as(__m256 v, const bf16*) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(to_bf16_bits(v)), 16));
}

// fn(d, rows) for each 8 elements d.. of `count` rows; the last dim % 8 through zero-padded
// copies (then d = 0 and rows are the copies), written back to the rows whose bit is set in
// `written`. These ops' rows are whole vectors in every model here but not in every test.
template <typename T, typename Fn>
inline void for_each_8(int64_t dim, T* const* rows, int count, unsigned written, Fn&& fn) {
  int64_t d = 0;
  for (; d + 8 <= dim; d += 8) fn(d, rows);
  if (d == dim) return;
  alignas(32) T tail[4][8] = {};
  T* tails[4];
  for (int i = 0; i < count; ++i) std::copy(rows[i] + d, rows[i] + dim, tails[i] = tail[i]);
  fn(0, tails);
  for (int i = 0; i < count; ++i)
    if (written >> i & 1) std::copy(tail[i], tail[i] + (dim - d), rows[i] + d);
}

// ---- RMSNorm (cpu_ops.cpp's, 8 lanes) ---------------------------------------------------------
// out = weight * T(x * rsqrt(mean(x^2) + eps)), x in float32; with a residual, residual =
// T(x + residual) first and the norm is of the new residual.
template <typename T>
void rms_norm_rows(const T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t dim, double eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* sum_rows[2] = {const_cast<T*>(x + r * dim), residual ? residual + r * dim : nullptr};
      __m256 sq = _mm256_setzero_ps();
      for_each_8(dim, sum_rows, residual ? 2 : 1, 0b10, [&](int64_t d, T* const* p) {
        __m256 v = load8(p[0] + d);
        if (residual) {
          v = round_as(_mm256_add_ps(v, load8(p[1] + d)), p[0]);
          store8(p[1] + d, v);
        }
        sq = _mm256_fmadd_ps(v, v, sq);
      });
      const T* in = residual ? sum_rows[1] : sum_rows[0];
      const __m256 inv = _mm256_set1_ps(1.0f / std::sqrt(sum8(sq) / static_cast<float>(dim) + static_cast<float>(eps)));
      T* norm_rows[3] = {const_cast<T*>(in), const_cast<T*>(weight), out + r * dim};
      for_each_8(dim, norm_rows, 3, 0b100, [&](int64_t d, T* const* p) {
        store8(p[2] + d, _mm256_mul_ps(load8(p[1] + d), round_as(_mm256_mul_ps(load8(p[0] + d), inv), p[0])));
      });
    }
  });
}

// ---- RoPE, "rotate half" layout, in place (cpu_ops.cpp's, 8 lanes) ---------------------------
// x1' = x1*c - x2*s, x2' = x2*c + x1*s with c, s rounded to T first and every product and sum
// rounded to T, as the aten ops of layers/rotary.py do in T: the same bits.
template <typename T>
void rotate_heads(T* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t token_stride, const float* cos,
                  const float* sin, const int64_t* positions) {
  const int64_t half = head_dim / 2;
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        T* head = x + t * token_stride + h * head_dim;
        const float* cs[2] = {cos + positions[t] * half, sin + positions[t] * half};
        int64_t d = 0;
        auto rotate = [&](const float* c_row, const float* s_row, T* x1p, T* x2p) {
          const __m256 c = round_as(_mm256_loadu_ps(c_row), head), s = round_as(_mm256_loadu_ps(s_row), head);
          const __m256 x1 = load8(x1p), x2 = load8(x2p);
          store8(x1p, _mm256_sub_ps(round_as(_mm256_mul_ps(x1, c), head), round_as(_mm256_mul_ps(x2, s), head)));
          store8(x2p, _mm256_add_ps(round_as(_mm256_mul_ps(x2, c), head), round_as(_mm256_mul_ps(x1, s), head)));
        };
        for (; d + 8 <= half; d += 8) rotate(cs[0] + d, cs[1] + d, head + d, head + half + d);
        if (d < half) {  // a partial vector: through zero-padded copies
          alignas(32) float c_tail[8] = {}, s_tail[8] = {};
          alignas(32) T x1_tail[8] = {}, x2_tail[8] = {};
          std::copy(cs[0] + d, cs[0] + half, c_tail), std::copy(cs[1] + d, cs[1] + half, s_tail);
          std::copy(head + d, head + half, x1_tail), std::copy(head + half + d, head + head_dim, x2_tail);
          rotate(c_tail, s_tail, x1_tail, x2_tail);
          std::copy(x1_tail, x1_tail + (half - d), head + d), std::copy(x2_tail, x2_tail + (half - d), head + half + d);
        }
      }
  });
}

// ---- SwiGLU: T(T(silu(gate)) * up), silu(g) = g / (1 + exp(-g)) with Sleef's exp, as aten's ----
template <typename T>
void silu_mul_rows(const T* gate_up, T* out, int64_t rows, int64_t width) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* gate_up_out[3] = {const_cast<T*>(gate_up + r * 2 * width), const_cast<T*>(gate_up + r * 2 * width + width),
                     out + r * width};
      for_each_8(width, gate_up_out, 3, 0b100, [&](int64_t d, T* const* p) {
        const __m256 g = load8(p[0] + d);
        const __m256 e = Sleef_expf8_u10(_mm256_sub_ps(_mm256_setzero_ps(), g));
        const __m256 silu = round_as(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), p[0]);
        store8(p[2] + d, _mm256_mul_ps(silu, load8(p[1] + d)));
      });
    }
  });
}

// ---- sampling: Gumbel-max at a temperature (cpu_ops.cpp's gumbel_sample, 8 lanes) -----------
// sampling/sampler.py's _plain_random_sample: the noise of sampling/random.py bit for bit (its
// 32-bit hash and Sleef's logf, aten's log), so the same tokens and ranks; the logsumexp in
// another order (in double), so logprobs to float32 rounding. As in cpu_ops.cpp, only the tokens that can
// still win get noise: x >= max(x) - (high - low) are kept, the near-top ones' noise bounds the
// winner, and only kept tokens within that bound are drawn. AVX2 has no compress, and appending
// every kept token lane by lane cost more than the passes over the row (most of a 49,152-token
// vocabulary is kept at temperature 1): so the row is read again for the few contenders, and
// once more to count the rank, both by vector compares.

constexpr uint32_t kLowbiasC1 = 0x7FEB352Du, kLowbiasC2 = 0x846CA68Bu;  // sampling/random.py's

inline __m256i lowbias32(__m256i x, bool finish) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int32_t>(kLowbiasC1)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int32_t>(kLowbiasC2)));
  if (finish) x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  return x;
}

// log(-log(u)) for the uniforms of random.uniform(): x - this is x + Gumbel noise.
inline __m256 log_neg_log_uniform(__m256i key, __m256i token) {
  const __m256i token_hash = lowbias32(_mm256_xor_si256(token, _mm256_set1_epi32(static_cast<int32_t>(0x9E3779B9u))), true);
  __m256i bits = lowbias32(_mm256_xor_si256(key, token_hash), false);
  bits = _mm256_or_si256(_mm256_srli_epi32(bits, 9), _mm256_set1_epi32(0x3F800000));
  const __m256 u = _mm256_sub_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(1.0f - 5.9604644775390625e-08f));
  return Sleef_logf8_u10(_mm256_sub_ps(_mm256_setzero_ps(), Sleef_logf8_u10(u)));
}

inline float max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// The first maximum over values seen 8 at a time: per lane the best value and its id (strict >,
// so a lane keeps its earliest), then the smallest id among the lanes at the top.
struct FirstMax {
  __m256 best = _mm256_set1_ps(-INFINITY);
  __m256i best_id = _mm256_setzero_si256();
  inline void update(__m256 values, __m256i ids) {
    const __m256 better = _mm256_cmp_ps(values, best, _CMP_GT_OQ);
    best = _mm256_blendv_ps(best, values, better);
    best_id = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(best_id), _mm256_castsi256_ps(ids), better));
  }
  inline int32_t id() const {
    alignas(32) float values[8];
    alignas(32) int32_t ids[8];
    _mm256_store_ps(values, best), _mm256_store_si256(reinterpret_cast<__m256i*>(ids), best_id);
    const float top = max8(best);
    int32_t first = INT32_MAX;
    for (int i = 0; i < 8; ++i)
      if (values[i] == top) first = std::min(first, ids[i]);
    return first == INT32_MAX ? 0 : first;
  }
};

const __m256i kLane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);

// fn(v, values, lanes): a row's values as floats, 8 at a time, and the bit mask of the lanes in
// the row; the last vector is padded with -inf (never a maximum, nothing to a sum of exps).
template <typename T, typename Fn>
inline void for_each_8_of_row(const T* row, int64_t vocab, Fn&& fn) {
  int64_t v = 0;
  for (; v + 8 <= vocab; v += 8) fn(v, load8(row + v), 0xFFu);
  if (v < vocab) {
    alignas(32) float tail[8];
    for (int i = 0; i < 8; ++i) tail[i] = v + i < vocab ? static_cast<float>(row[v + i]) : -INFINITY;
    fn(v, _mm256_load_ps(tail), (1u << (vocab - v)) - 1);
  }
}

// The first maximum of x - log(-log u) over count (x, id) pairs; the buffers have 8 spare slots.
inline FirstMax noisy_max(float* x, int32_t* ids, int64_t count, __m256i key) {
  for (int64_t i = count; i < count + 8; ++i) x[i] = -INFINITY, ids[i] = 0;
  FirstMax noisy;
  for (int64_t i = 0; i < count; i += 8) {
    const __m256i id = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ids + i));
    noisy.update(_mm256_sub_ps(_mm256_loadu_ps(x + i), log_neg_log_uniform(key, id)), id);
  }
  return noisy;
}

// Bounds of log(-log(u)) over the uniforms random.uniform() can make, (2m + 1) * 2^-24, computed
// as log_neg_log_uniform computes them.
inline std::pair<float, float> log_neg_log_bounds() {
  auto at = [](float u) {
    return _mm256_cvtss_f32(Sleef_logf8_u10(_mm256_sub_ps(_mm256_setzero_ps(), Sleef_logf8_u10(_mm256_set1_ps(u)))));
  };
  return {at(1.0f - 5.9604644775390625e-08f), at(5.9604644775390625e-08f)};
}

constexpr float kNearTop = 8.0f;  // cpu_ops.cpp's: the near-top tokens' noise bounds the winner

struct SampleScratch {
  std::vector<float> noisy_x;
  std::vector<int32_t> noisy_ids;
  explicit SampleScratch(int64_t vocab) : noisy_x(vocab + 8), noisy_ids(vocab + 8) {}
};

// Appends the (x, id) of the lanes set in `mask` to x_out / ids_out at *count.
inline void append_lanes(unsigned mask, __m256 x, int64_t v, float* x_out, int32_t* ids_out, int64_t* count) {
  alignas(32) float xs[8];
  _mm256_store_ps(xs, x);
  for (; mask; mask &= mask - 1) {
    const int lane = __builtin_ctz(mask);
    x_out[*count] = xs[lane], ids_out[(*count)++] = static_cast<int32_t>(v + lane);
  }
}

template <typename T>
void gumbel_sample_row(const T* row, int64_t vocab, float temperature, int32_t row_key, bool processed, float low,
                       float high, SampleScratch& scratch, int64_t* token_id, float* chosen_logprob, int64_t* rank_out) {
  const bool unit = temperature == 1.0f;  // x = logits / 1 is the logits: no divisions, the same bits
  const __m256 t = _mm256_set1_ps(temperature);
  auto scaled = [&](__m256 raw) { return unit ? raw : _mm256_div_ps(raw, t); };
  auto lanes_where = [](__m256 a, __m256 b, unsigned lanes) {  // a >= b, in the row's lanes
    return lanes & static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GE_OQ)));
  };
  __m256 x_max = _mm256_set1_ps(-INFINITY), raw_max = _mm256_set1_ps(-INFINITY);
  for_each_8_of_row(row, vocab, [&](int64_t, __m256 raw, unsigned) {
    x_max = _mm256_max_ps(x_max, scaled(raw));
    raw_max = _mm256_max_ps(raw_max, raw);
  });
  const float top_x = max8(x_max);
  const float mx = processed || unit ? top_x : max8(raw_max);
  // the tokens that can win: x >= threshold (a kept token scores at most x - low, the top one at least top_x - high)
  float threshold = top_x - (high - low) - 1e-3f * (1.0f + std::fabs(top_x));
  if (!std::isfinite(threshold)) threshold = -INFINITY;  // an infinite logit: keep every token
  const __m256 keep = _mm256_set1_ps(threshold);
  float* noisy_x = scratch.noisy_x.data();
  int32_t* noisy_ids = scratch.noisy_ids.data();
  // the logsumexp's sum and the near-top tokens. In double: 8 float32 lanes of ~6,000 terms each
  // lost up to 1e-4 of a logprob when a few large terms sit in the lanes beside thousands of small
  // ones (a tied top, the test's one_top)
  const __m256 near_top = _mm256_set1_ps(top_x - kNearTop);
  __m256d sum = _mm256_setzero_pd();
  int64_t top_count = 0;
  for_each_8_of_row(row, vocab, [&](int64_t v, __m256 raw, unsigned lanes) {
    const __m256 x = scaled(raw), source = processed ? x : raw;
    const __m256 e = Sleef_expf8_u10(_mm256_sub_ps(source, _mm256_set1_ps(mx)));
    sum = _mm256_add_pd(sum, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(e)), _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1))));
    if (const unsigned near = lanes_where(x, near_top, lanes)) append_lanes(near, x, v, noisy_x, noisy_ids, &top_count);
  });
  const __m256i key = _mm256_set1_epi32(row_key);
  // the near-top best bounds the winner: only kept tokens with x - low >= it can win or tie
  const float best = max8(noisy_max(noisy_x, noisy_ids, top_count, key).best);
  float bound = best - 1e-3f * (1.0f + std::fabs(best));  // the margin covers rounding
  if (!std::isfinite(bound)) bound = -INFINITY;
  const __m256 contend = _mm256_set1_ps(bound), low_v = _mm256_set1_ps(low);
  int64_t contenders = 0;
  for_each_8_of_row(row, vocab, [&](int64_t v, __m256 raw, unsigned lanes) {
    const __m256 x = scaled(raw);
    if (const unsigned may_win = lanes_where(x, keep, lanes) & lanes_where(_mm256_sub_ps(x, low_v), contend, lanes))
      append_lanes(may_win, x, v, noisy_x, noisy_ids, &contenders);
  });
  const int32_t token = noisy_max(noisy_x, noisy_ids, contenders, key).id();
  const float chosen_raw = static_cast<float>(row[token]);
  const float chosen = processed && !unit ? chosen_raw / temperature : chosen_raw;
  // the rank: the kept tokens scoring >= the chosen one (x = raw / T grows with raw: that is all of them)
  int64_t rank = 0;
  const __m256 chosen_v = _mm256_set1_ps(chosen);
  for_each_8_of_row(row, vocab, [&](int64_t, __m256 raw, unsigned lanes) {
    const __m256 x = scaled(raw), source = processed ? x : raw;
    rank += __builtin_popcount(lanes_where(x, keep, lanes) & lanes_where(source, chosen_v, lanes));
  });
  *token_id = token;
  alignas(32) double sums[4];
  _mm256_store_pd(sums, sum);
  *chosen_logprob = chosen - (mx + static_cast<float>(std::log((sums[0] + sums[1]) + (sums[2] + sums[3]))));
  *rank_out = rank;
}

template <typename T>
void gumbel_sample_rows(const T* logits, int64_t rows, int64_t vocab, const float* temperature, const int32_t* keys,
                        bool processed, int64_t* token_ids, float* chosen_logprobs, int64_t* ranks) {
  const auto [low, high] = log_neg_log_bounds();
  at::parallel_for(0, rows, 1, [&, low = low, high = high](int64_t begin, int64_t end) {
    SampleScratch scratch(vocab);
    for (int64_t r = begin; r < end; ++r)
      gumbel_sample_row(logits + r * vocab, vocab, temperature[r], keys[r], processed, low, high, scratch,
                        token_ids + r, chosen_logprobs + r, ranks + r);
  });
}

// Greedy rows: the first maximum of each row (torch's max(dim=-1).indices for finite logits).
template <typename T>
void argmax_rows(const T* logits, int64_t rows, int64_t vocab, int64_t* out) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      FirstMax top;
      for_each_8_of_row(logits + r * vocab, vocab, [&](int64_t v, __m256 values, unsigned) {
        top.update(values, _mm256_add_epi32(kLane, _mm256_set1_epi32(static_cast<int32_t>(v))));
      });
      out[r] = top.id();
    }
  });
}

constexpr int64_t kPrefetchPositions = 8;  // the pages are cold: fetch K and V rows this far ahead

// ---- paged decode attention ------------------------------------------------------------------
// One new token per sequence against its cached context, read in place from the pool's pages
// through the block table (the PyTorch path gathers the pages into a padded batch first, then
// runs SDPA with a mask). An item is one sequence and one kv head with its `group` query heads;
// items are split between the threads by their positions. Per query row: scores = (q * scale).K
// in float32, softmax (Sleef's exp, as aten's), then P.V in float32; out rounded to T once.

// The item's query rows are taken GR at a time (GR <= 3), so each K and V row is read and
// widened once per GR rows rather than once per row; and its scores P positions at a time, so
// the dot products are GR x P independent FMA chains instead of one chain of head_dim / 8.

inline void prefetch_row(const void* row, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(static_cast<const char*>(row) + b, _MM_HINT_T0);
}

// 4 vectors' sums, in order
inline __m128 sum4x8(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // a b c d | a b c d (halves)
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// scores[r][t] = q_scaled[r] . K[t] for GR rows (q_scaled: float32, vecs vectors a row) and P
// positions from t; prefetching the K rows kPrefetchPositions ahead.
template <int GR, int P, typename T>
inline void score_positions(const float* q_scaled, int64_t head_dim, int vecs, const T* const* k_rows, int64_t t,
                            int64_t n, int64_t row_bytes, float* scores) {
  __m256 acc[GR][4];
  for (int r = 0; r < GR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int j = 0; j < P; ++j)
    if (t + j + kPrefetchPositions < n) prefetch_row(k_rows[t + j + kPrefetchPositions], row_bytes);
  for (int c = 0; c < vecs; ++c) {
    __m256 k[P];
    for (int j = 0; j < P; ++j) k[j] = load8(k_rows[t + j] + c * 8);
    for (int r = 0; r < GR; ++r) {
      const __m256 qv = _mm256_loadu_ps(q_scaled + r * head_dim + c * 8);
      for (int j = 0; j < P; ++j) acc[r][j] = _mm256_fmadd_ps(qv, k[j], acc[r][j]);
    }
  }
  for (int r = 0; r < GR; ++r) {
    alignas(16) float four[4];
    _mm_store_ps(four, sum4x8(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
    for (int j = 0; j < P; ++j) scores[r * n + t + j] = four[j];
  }
}

// out[r]'s vectors c0..c0 + CV = inv_sum[r] * sum_u p[r][u] V[u], for GR rows
template <int GR, int CV, typename T>
inline void weigh_values(const float* p, int64_t n, const T* const* v_rows, int c0, bool prefetch, int64_t row_bytes,
                         const float* inv_sum, int64_t head_dim, T* out) {
  __m256 sums[GR][CV];
  for (int r = 0; r < GR; ++r)
    for (int c = 0; c < CV; ++c) sums[r][c] = _mm256_setzero_ps();
  for (int64_t u = 0; u < n; ++u) {
    if (prefetch && u + kPrefetchPositions < n) prefetch_row(v_rows[u + kPrefetchPositions], row_bytes);
    __m256 v[CV];
    for (int c = 0; c < CV; ++c) v[c] = load8(v_rows[u] + (c0 + c) * 8);
    for (int r = 0; r < GR; ++r) {
      const __m256 pr = _mm256_broadcast_ss(p + r * n + u);
      for (int c = 0; c < CV; ++c) sums[r][c] = _mm256_fmadd_ps(pr, v[c], sums[r][c]);
    }
  }
  for (int r = 0; r < GR; ++r)
    for (int c = 0; c < CV; ++c)
      store8(out + r * head_dim + (c0 + c) * 8, _mm256_mul_ps(sums[r][c], _mm256_set1_ps(inv_sum[r])));
}

// GR query rows of one item (GR of its group's heads): scores, softmax, then P.V into out.
template <int GR, typename T>
void decode_rows(const float* q_scaled, int64_t head_dim, const T* const* k_rows, const T* const* v_rows, int64_t n,
                 float* scores, bool first_rows, T* out) {
  const int vecs = static_cast<int>(head_dim / 8);
  const int64_t row_bytes = head_dim * static_cast<int64_t>(sizeof(T));
  constexpr int P = GR == 3 ? 3 : 4;  // GR x P <= 12 accumulators
  int64_t t = 0;
  for (; t + P <= n; t += P) score_positions<GR, P>(q_scaled, head_dim, vecs, k_rows, t, n, row_bytes, scores);
  for (; t < n; ++t) score_positions<GR, 1>(q_scaled, head_dim, vecs, k_rows, t, n, row_bytes, scores);
  float inv_sum[GR];
  for (int r = 0; r < GR; ++r) {  // softmax, in place: scores become exp(s - max)
    float* s = scores + r * n;
    float max_score = -INFINITY;
    for (int64_t u = 0; u < n; ++u) max_score = std::max(max_score, s[u]);
    const __m256 m = _mm256_set1_ps(max_score);
    __m256 sum = _mm256_setzero_ps();
    int64_t u = 0;
    for (; u + 8 <= n; u += 8) {
      const __m256 e = Sleef_expf8_u10(_mm256_sub_ps(_mm256_loadu_ps(s + u), m));
      _mm256_storeu_ps(s + u, e);
      sum = _mm256_add_ps(sum, e);
    }
    float total = sum8(sum);
    for (; u < n; ++u) total += (s[u] = std::exp(s[u] - max_score));
    inv_sum[r] = 1.0f / total;
  }
  // P.V 4 vectors (32 dims) at a time, GR x 4 accumulators; head_dim % 16 == 0, so 2 may remain.
  // The V rows are prefetched on the item's first pass over them.
  int c0 = 0;
  for (; c0 + 4 <= vecs; c0 += 4)
    weigh_values<GR, 4>(scores, n, v_rows, c0, first_rows && c0 == 0, row_bytes, inv_sum, head_dim, out);
  if (c0 < vecs) weigh_values<GR, 2>(scores, n, v_rows, c0, first_rows && c0 == 0, row_bytes, inv_sum, head_dim, out);
}

template <typename T>
void decode_item(const T* q, int64_t head_dim, const T* const* k_rows, const T* const* v_rows, int64_t n,
                 int64_t group, float scale, float* scores, float* q_scaled, T* out) {
  for (int64_t i = 0; i < group * head_dim; i += 8)
    _mm256_storeu_ps(q_scaled + i, _mm256_mul_ps(load8(q + i), _mm256_set1_ps(scale)));
  for (int64_t r = 0; r < group;) {
    const int64_t rows = std::min<int64_t>(3, group - r);
    const float* qs = q_scaled + r * head_dim;
    T* o = out + r * head_dim;
    if (rows == 3) decode_rows<3>(qs, head_dim, k_rows, v_rows, n, scores, r == 0, o);
    else if (rows == 2) decode_rows<2>(qs, head_dim, k_rows, v_rows, n, scores, r == 0, o);
    else decode_rows<1>(qs, head_dim, k_rows, v_rows, n, scores, r == 0, o);
    r += rows;
  }
}

// A paged pool pair [num_blocks, block_size, Hkv, D] and how to find a position's rows in it.
template <typename T>
struct PagedKV {
  const T *k_cache, *v_cache;
  int64_t block_size, token_stride, head_dim;
  PagedKV(const T* k, const T* v, int64_t block_size, int64_t kv_heads, int64_t head_dim)
      : k_cache(k), v_cache(v), block_size(block_size), token_stride(kv_heads * head_dim), head_dim(head_dim) {}
  // kv head `head`'s K and V rows at positions first .. first + n - 1, through a block table
  void rows(const int64_t* table, int64_t first, int64_t n, int64_t head, std::vector<const T*>& k_rows,
            std::vector<const T*>& v_rows) const {
    k_rows.resize(n), v_rows.resize(n);
    for (int64_t t = 0; t < n; ++t) {
      const int64_t pos = first + t;
      const int64_t offset =
          (table[pos / block_size] * block_size + pos % block_size) * token_stride + head * head_dim;
      k_rows[t] = k_cache + offset, v_rows[t] = v_cache + offset;
    }
  }
};

template <typename T>
void decode_attention(const T* q, int64_t q_stride, const T* k_cache, const T* v_cache, const int64_t* block_tables,
                      int64_t max_blocks, const int64_t* context_lens, T* out, int64_t num_seqs, int64_t num_heads,
                      int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, int64_t window) {
  const int64_t group = num_heads / num_kv_heads, items = num_seqs * num_kv_heads;
  const PagedKV<T> pool(k_cache, v_cache, block_size, num_kv_heads, head_dim);
  auto first_position = [&](int64_t b) { return window > 0 ? std::max<int64_t>(0, context_lens[b] - window) : 0; };
  // contiguous item ranges of about equal positions per thread: contexts differ
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  const std::vector<int64_t> bounds = equal_work_bounds(items, threads, [&](int64_t i) {
    const int64_t b = i / num_kv_heads;
    return context_lens[b] - first_position(b) + 16;
  });
  at::parallel_for(0, threads, 1, [&](int64_t first_thread, int64_t last_thread) {
    std::vector<const T*> k_rows, v_rows;
    std::vector<float> scores, q_scaled(group * head_dim);
    for (int64_t item = bounds[first_thread]; item < bounds[last_thread]; ++item) {
      const int64_t b = item / num_kv_heads, h = item % num_kv_heads;
      const int64_t first = first_position(b), n = context_lens[b] - first;
      pool.rows(block_tables + b * max_blocks, first, n, h, k_rows, v_rows);
      scores.resize(std::min<int64_t>(group, 3) * n);
      const T* qi = q + b * q_stride + h * group * head_dim;
      T* oi = out + (b * num_heads + h * group) * head_dim;
      decode_item(qi, head_dim, k_rows.data(), v_rows.data(), n, group, scale, scores.data(), q_scaled.data(), oi);
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t sliding_window) {
  // query [B, H, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks]; context_lens [B]
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && query.scalar_type() == k_cache.scalar_type() &&
              v_cache.scalar_type() == k_cache.scalar_type(), "paged_decode_attention: contiguous pools of the query's dtype");
  const int64_t head_dim = query.size(2);
  TORCH_CHECK(head_dim % 16 == 0 && head_dim <= 256, "paged_decode_attention: head_dim ", head_dim,
              " (AVX2: a multiple of 16 up to 256)");
  const at::Tensor q = query.stride(2) == 1 && query.stride(1) == head_dim ? query : query.contiguous();
  const at::Tensor tables = block_tables.contiguous(), lens = context_lens.contiguous();
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong,
              "paged_decode_attention: int64 block tables and lengths");
  auto out = at::empty(q.sizes(), q.options());
  PINFER_DISPATCH(q.scalar_type(), "paged_decode_attention", [&] {
    decode_attention<scalar_t>(q.data_ptr<scalar_t>(), q.stride(0), k_cache.data_ptr<scalar_t>(),
                               v_cache.data_ptr<scalar_t>(), tables.data_ptr<int64_t>(), tables.size(1),
                               lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), q.size(0), q.size(1), k_cache.size(2),
                               head_dim, k_cache.size(1), static_cast<float>(scale), sliding_window);
  });
  return out;
}
// ---- int8 linears (model/quantization.py's Int8Linear): w8a8, exact int32 sums ----------------
// cpu_ops.cpp's int8 kernels multiply on vpdpbusd (AVX512-VNNI). AVX2's byte multiply,
// vpmaddubsw, takes unsigned x signed bytes and saturates its int16 pair sums; with the
// weight's magnitude as the unsigned side (|w| <= 128) and the input's bytes carrying the sign
// (sign(w) x, |x| <= 127) each pair sum is at most 2 * 128 * 127 = 32512, so none saturates and
// the sums are exact: then vpmaddwd by ones adds the pairs into int32 lanes, one per column.
// Quantization as the PyTorch path's: x_scale = max|x| / 127, xq = round(x / x_scale) (half to
// even); out = float(sum xq w) * x_scale * w_scale in that order, so the same bits.

// One row's quantization (cpu_ops_entry.h)
template <typename T>
float quantize_row(const T* x, int64_t k_dim, int8_t* xq, int8_t offset) {
  __m256 mx = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  int64_t k = 0;
  for (; k + 8 <= k_dim; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(load8(x + k), abs_mask));
  float m = max8(mx);
  for (int64_t r = k; r < k_dim; ++r) m = std::max(m, std::abs(static_cast<float>(x[r])));
  const float x_scale = std::max(m, 1e-12f) / 127.0f;
  const __m256 s = _mm256_set1_ps(x_scale);
  for (k = 0; k + 8 <= k_dim; k += 8) {
    const __m256 q = _mm256_round_ps(_mm256_div_ps(load8(x + k), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i v = _mm256_cvtps_epi32(q);  // 8 int32 -> 8 bytes, in order
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(xq + k), _mm_add_epi8(_mm_packs_epi16(w, w), _mm_set1_epi8(offset)));
  }
  for (; k < k_dim; ++k)
    xq[k] = static_cast<int8_t>(static_cast<int32_t>(std::nearbyint(static_cast<float>(x[k]) / x_scale)) + offset);
  return x_scale;
}

at::Tensor dequantize_rows(const at::Tensor& acc, const at::Tensor& x_scale, const at::Tensor& w_scale,
                           at::ScalarType dtype) {
  // acc int32 [M, N] (torch._int_mm's result) -> float(acc) * x_scale[m] * w_scale[n], as dtype
  TORCH_CHECK(acc.dim() == 2 && acc.is_contiguous() && acc.scalar_type() == at::kInt && w_scale.is_contiguous() &&
              w_scale.scalar_type() == at::kFloat && w_scale.numel() == acc.size(1) &&
              x_scale.scalar_type() == at::kFloat && x_scale.numel() == acc.size(0),
              "dequantize_rows: int32 [M, N] sums, float32 scales [M] and [N]");
  const int64_t rows = acc.size(0), n_dim = acc.size(1);
  const at::Tensor xs = x_scale.contiguous();
  auto out = at::empty({rows, n_dim}, acc.options().dtype(dtype));
  PINFER_DISPATCH(dtype, "dequantize_rows", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const float* ws = w_scale.data_ptr<float>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int32_t* a = acc.data_ptr<int32_t>() + r * n_dim;
        const float s = xs.data_ptr<float>()[r];
        int64_t n = 0;
        for (; n + 8 <= n_dim; n += 8) {
          const __m256 v = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + n)));
          store8(op + r * n_dim + n, _mm256_mul_ps(_mm256_mul_ps(v, _mm256_set1_ps(s)), _mm256_loadu_ps(ws + n)));
        }
        for (; n < n_dim; ++n) op[r * n_dim + n] = static_cast<scalar_t>(static_cast<float>(a[n]) * s * ws[n]);
      }
    });
  });
  return out;
}

// The GEMM on the packed weight [N / 16, K / 4, 16, 4] (kernels.pack_for_gemm, cpu_ops.cpp's
// VNNI layout): a 64-byte group holds k..k+3 of 16 columns, a 32-bit lane per column; each
// 32-byte half of it, 8 columns, is one vector. Times a row's 4 bytes broadcast, vpmaddubsw and
// vpmaddwd give each column's 4-k sum in its lane. Tile: MR rows x NV vectors, w at the tile's
// first vector; vector v lies at (v / 2) blocks + (v % 2) halves from it (at batch 1 a tile
// spans two blocks).
template <int MR, int NV>
__attribute__((noinline)) void int8_dots(const int8_t* x, int64_t x_stride, const int8_t* w, int64_t block_bytes,
                                         int64_t groups, __m256i* sums) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_si256();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i wv[NV], magnitude[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      wv[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (v / 2) * block_bytes + g * 64 + (v % 2) * 32));
      magnitude[v] = _mm256_abs_epi8(wv[v]);  // -128 -> 0x80, which is 128 unsigned
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t four;
      std::memcpy(&four, x + i * x_stride + 4 * g, 4);
      const __m256i xv = _mm256_set1_epi32(four);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const __m256i pairs = _mm256_maddubs_epi16(magnitude[v], _mm256_sign_epi8(xv, wv[v]));
        acc[i][v] = _mm256_add_epi32(acc[i][v], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) sums[i * NV + v] = acc[i][v];
}

constexpr int kInt8TileRows = 4;

at::Tensor int8_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_sums,
                     const at::Tensor& w_scale) {
  // x [M, K]; packed int8 [N / 16, K / 4, 16, 4]; w_sums int32 [N] (the VNNI kernel's; unused
  // here, the schema is shared); w_scale float32 [N]
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && packed.is_contiguous() && packed.dim() == 4,
              "int8_gemm: x [M, K] contiguous, weight packed [N / 16, K / 4, 16, 4]");
  TORCH_CHECK(packed.size(1) * 4 == x.size(1) && packed.size(2) == 16 && packed.size(3) == 4,
              "int8_gemm: weight packed for K = ", packed.size(1) * 4, ", input has K = ", x.size(1));
  const int64_t m_dim = x.size(0), k_dim = x.size(1), n_blocks = packed.size(0), n_dim = n_blocks * 16;
  TORCH_CHECK(packed.scalar_type() == at::kChar && w_sums.numel() == n_dim && w_scale.numel() == n_dim &&
              w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous(),
              "int8_gemm: int8 weight, ", n_dim, " float32 scales");
  const int64_t groups = k_dim / 4, block_bytes = groups * 64;
  std::vector<int8_t> xq(m_dim * k_dim);
  std::vector<float> xs(m_dim);
  auto out = at::empty({m_dim, n_dim}, x.options());
  PINFER_DISPATCH(x.scalar_type(), "int8_gemm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, m_dim, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) xs[r] = quantize_row(xp + r * k_dim, k_dim, xq.data() + r * k_dim);
    });
    const int8_t* w = packed.data_ptr<int8_t>();
    const float* ws = w_scale.data_ptr<float>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // the PyTorch path's float(exact) * x_scale * w_scale, in that order
    auto store = [&](int64_t row, int rows, int64_t column, int vectors, const __m256i* sums) {
      for (int i = 0; i < rows; ++i)
        for (int j = 0; j < vectors; ++j) {
          const int64_t n = column + 8 * j;
          const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(sums[i * vectors + j]), _mm256_set1_ps(xs[row + i]));
          store8(op + (row + i) * n_dim + n, _mm256_mul_ps(v, _mm256_loadu_ps(ws + n)));
        }
    };
    // input rows per pass over a thread's columns: ~192 KB, kept in L2 while the weights stream
    const int64_t panel_rows = std::max<int64_t>(kInt8TileRows, kPanelBytes / k_dim / kInt8TileRows * kInt8TileRows);
    gemm_blocks(
        m_dim, n_blocks, panel_rows, kInt8TileRows,
        [&](int64_t nb, int blocks) {
          alignas(32) __m256i sums[4];
          if (blocks == 2) int8_dots<1, 4>(xq.data(), k_dim, w + nb * block_bytes, block_bytes, groups, sums);
          else int8_dots<1, 2>(xq.data(), k_dim, w + nb * block_bytes, block_bytes, groups, sums);
          store(0, 1, nb * 16, 2 * blocks, sums);
        },
        [&](int64_t i, int rows, int64_t nb) {
          alignas(32) __m256i sums[kInt8TileRows * 2];
          const int8_t* xi = xq.data() + i * k_dim;
          const int8_t* wb = w + nb * block_bytes;
          switch (rows) {
            case 4: int8_dots<4, 2>(xi, k_dim, wb, block_bytes, groups, sums); break;
            case 3: int8_dots<3, 2>(xi, k_dim, wb, block_bytes, groups, sums); break;
            case 2: int8_dots<2, 2>(xi, k_dim, wb, block_bytes, groups, sums); break;
            default: int8_dots<1, 2>(xi, k_dim, wb, block_bytes, groups, sums); break;
          }
          store(i, rows, nb * 16, 2, sums);
        });
  });
  return out;
}

// ---- prefill attention: a step's prefill sequences in one call ------------------------------
// cpu_ops.cpp's paged_prefill_attention_batch, by the decode path's arithmetic: each new token
// of a sequence is a decode item against its causal prefix (position p sees keys 0..p), read in
// place from the pages. Work: (sequence, kv head, token) items, split between the threads by
// their key counts. Each key row is read once per token instead of once per block of tokens,
// so it suits short prompts, where SDPA pays for padding and per-sequence calls; the Python
// side sends longer prompts to SDPA (model/attention/paged.py).
// seqs [B, 4] int64: (row of block_tables, first query row, q_len, context_len); out [T, H, D]
// receives the sequences' rows, the others left as they are.
void paged_prefill_attention_batch(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_tables, const at::Tensor& seqs, double scale,
                                   at::Tensor& out) {
  const int64_t head_dim = query.size(2), num_heads = query.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && query.scalar_type() == k_cache.scalar_type() &&
              v_cache.scalar_type() == k_cache.scalar_type() && out.scalar_type() == query.scalar_type(),
              "paged_prefill_attention_batch: contiguous pools of the query's dtype");
  TORCH_CHECK(head_dim % 16 == 0 && head_dim <= 256 && num_heads % kv_heads == 0,
              "paged_prefill_attention_batch: head_dim ", head_dim, " (AVX2: a multiple of 16 up to 256)");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == query.sizes(), "paged_prefill_attention_batch: out [T, H, D]");
  const at::Tensor q = query.stride(2) == 1 && query.stride(1) == head_dim ? query : query.contiguous();
  const at::Tensor tables = block_tables.contiguous(), info = seqs.contiguous();
  TORCH_CHECK(tables.scalar_type() == at::kLong && info.scalar_type() == at::kLong && info.dim() == 2 &&
              info.size(1) == 4, "paged_prefill_attention_batch: int64 block_tables and seqs [B, 4]");
  const int64_t count = info.size(0), max_blocks = tables.size(1), block_size = k_cache.size(1);
  const int64_t* s = info.data_ptr<int64_t>();
  std::vector<int64_t> first_item(count + 1, 0);  // items: (sequence, kv head, token), sequence-major
  check_prefill_seqs(s, count, tables, q.size(0), block_size);
  for (int64_t i = 0; i < count; ++i) first_item[i + 1] = first_item[i] + kv_heads * s[4 * i + 2];
  const int64_t items = first_item[count], group = num_heads / kv_heads;
  struct Item { int64_t seq, head, token; };
  auto item_at = [&](int64_t item) {
    const int64_t i = std::upper_bound(first_item.begin(), first_item.end(), item) - first_item.begin() - 1;
    const int64_t q_len = s[4 * i + 2], rest = item - first_item[i];
    return Item{i, rest / q_len, rest % q_len};
  };
  auto keys_of = [&](const Item& it) { return s[4 * it.seq + 3] - s[4 * it.seq + 2] + it.token + 1; };
  // contiguous item ranges of about equal key counts per thread
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  const std::vector<int64_t> bounds =
      equal_work_bounds(items, threads, [&](int64_t item) { return keys_of(item_at(item)) + 16; });
  PINFER_DISPATCH(q.scalar_type(), "paged_prefill_attention_batch", [&] {
    const PagedKV<scalar_t> pool(k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), block_size, kv_heads,
                                 head_dim);
    const scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, threads, 1, [&](int64_t first_thread, int64_t last_thread) {
      std::vector<const scalar_t*> k_rows, v_rows;
      std::vector<float> scores, q_scaled(group * head_dim);
      int64_t rows_of = -1;  // the (sequence, kv head) whose rows k_rows / v_rows hold
      for (int64_t item = bounds[first_thread]; item < bounds[last_thread]; ++item) {
        const Item it = item_at(item);
        const int64_t row = s[4 * it.seq], start = s[4 * it.seq + 1], context_len = s[4 * it.seq + 3];
        if (rows_of != it.seq * kv_heads + it.head) {
          rows_of = it.seq * kv_heads + it.head;
          pool.rows(tables.data_ptr<int64_t>() + row * max_blocks, 0, context_len, it.head, k_rows, v_rows);
          scores.resize(std::min<int64_t>(group, 3) * context_len);
        }
        const int64_t t = start + it.token;
        decode_item(qp + t * q.stride(0) + it.head * group * head_dim, head_dim, k_rows.data(), v_rows.data(),
                    keys_of(it), group, static_cast<float>(scale), scores.data(), q_scaled.data(),
                    op + (t * num_heads + it.head * group) * head_dim);
      }
    });
  });
}

// ---- the decoder stack (decode_layers, cpu_ops_entry.h) on bf16 or int8 linears and bf16 pools
at::Tensor stack_linear(const at::Tensor& x, at::TensorList weights, int64_t first, int64_t kind,
                        const at::Tensor& bias) {
  TORCH_CHECK(kind == kBf16 || kind == kInt8, "decode_layers: the AVX2 build has bf16 and int8 linears");
  if (kind == kBf16) return bf16_gemm(x, weights[first], bias.numel() ? c10::optional<at::Tensor>(bias) : c10::nullopt);
  const at::Tensor out = int8_gemm(x, weights[first], weights[first + 1], weights[first + 2]);
  return bias.numel() ? out + bias : out;  // the quantized linears add their bias after the matmul, in x's dtype
}

at::Tensor stack_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& k_scale, const at::Tensor&,
                           const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                           const at::Tensor& context_lens, double scale, int64_t sliding_window) {
  TORCH_CHECK(!k_scale.defined(), "decode_layers: the AVX2 build has no int8 KV pools");
  at::Tensor k_pool = k_cache, v_pool = v_cache;
  store_kv(k, v, k_pool, v_pool, slot_mapping);
  return paged_decode_attention(q, k_pool, v_pool, block_tables, context_lens, scale, sliding_window);
}
#endif  // no AVX-512

}  // namespace

TORCH_LIBRARY_FRAGMENT(pinfer, m) {
#if !defined(__AVX512BF16__)
  m.def("bf16_gemm(Tensor x, Tensor packed, Tensor? bias) -> Tensor", &bf16_gemm);
#endif
#if !(defined(__AVX512F__) && defined(__AVX512BW__))
  define_entry_ops(m);
  m.def(kDecodeLayersSchema, &decode_layers);
  m.def("paged_prefill_attention_batch(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seqs, float scale, Tensor(a!) out) -> ()", &paged_prefill_attention_batch);
  m.def("dequantize_rows(Tensor acc, Tensor x_scale, Tensor w_scale, ScalarType dtype) -> Tensor", &dequantize_rows);
  m.def("int8_gemm(Tensor x, Tensor packed, Tensor w_sums, Tensor w_scale) -> Tensor", &int8_gemm);
#endif
}
#endif  // AVX2 and FMA
