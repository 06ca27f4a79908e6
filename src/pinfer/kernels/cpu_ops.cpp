// pinfer's CPU kernels (AVX-512), registered as torch.ops.pinfer.*; see kernels/__init__.py.
//
// Each one fuses what takes several aten ops in the PyTorch path, and exists because a
// profile showed that path's cost: decode spent its time outside the matmuls in small
// per-layer ops, in the decode attention's page gather + SDPA, in ~20 sampler passes over
// [batch, vocab], and (int8) in the activation quantization around torch._int_mm; then in
// the matmuls (oneDNN below the read rate at batch 1) and in the Python between the ops.
// Arithmetic is float32 (int32 for int8 dot products); values are rounded to bf16 (to
// nearest even) exactly where the PyTorch path rounds them. So the residual adds, RoPE,
// SwiGLU, the KV store, the int8 linears and the sampled tokens and ranks have the PyTorch
// path's bits; the norms (their mean), attention, the bf16 GEMM and logprobs differ from it
// by float32 summation order. tests/model/test_cpu_kernels.py checks each against that path.
//
// Built with -march=native by kernels/__init__.py, once per machine; without AVX-512 the file
// still compiles, available() says false and only row_keys is built here (cpu_ops_avx2.cpp has
// a few of the others for AVX2 CPUs); the engine keeps the PyTorch path for the rest.
// Where the CPU has AMX (Sapphire Rapids and later), the GEMMs run on its tiles from 8-16 rows.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define PINFER_AVX512 1
#else
#define PINFER_AVX512 0
#endif

namespace {

bool available() { return PINFER_AVX512 == 1; }

#if PINFER_AVX512

using bf16 = at::BFloat16;

#include "cpu_ops_entry.h"  // the entry points both kernel files share

// Sleef's vector exp and log, exported by libtorch_cpu: the ones aten's float ops use, so that
// results computed with them here have aten's bits.
extern "C" __m512 Sleef_expf16_u10(__m512);
extern "C" __m512 Sleef_logf16_u10(__m512);

// ---- 16 floats at a time --------------------------------------------------------------------

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16_masked(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16_masked(const bf16* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// float32 -> bf16 bits, round to nearest even; NaN stays a (quiet) NaN, as in c10::BFloat16.
inline __m256i to_bf16_bits(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(bf16* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits(v)); }
inline void store16_masked(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16_masked(bf16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, to_bf16_bits(v)); }

// The value a float takes once stored as T: rounding to bf16 between two ops, as aten does.
inline __m512 round_as(__m512 v, const float*) { return v; }
inline __m512 round_as(__m512 v, const bf16*) {
  __m512i bits = _mm512_cvtepu16_epi32(to_bf16_bits(v));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}

// exp(x) for x <= 0 (softmax after subtracting the max): 2^n * p(r), |r| <= ln2 / 2, degree-6
// Taylor polynomial; relative error ~2e-7, i.e. about float32's own.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

// ---- RMSNorm ----------------------------------------------------------------------------------
// out = weight * T(x * rsqrt(mean(x^2) + eps)), x in float32: transformers' LlamaRMSNorm.
// With a residual: residual = T(x + residual) first, and the norm is of the new residual.

template <typename T>
void rms_norm_rows(const T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t dim, double eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * dim;
      T* src = residual ? residual + r * dim : nullptr;
      __m512 sq = _mm512_setzero_ps();
      for (int64_t d = 0; d < dim; d += 16) {
        __mmask16 m = tail_mask(dim - d);
        __m512 v = load16_masked(xr + d, m);
        if (src) {
          v = round_as(_mm512_add_ps(v, load16_masked(src + d, m)), xr);
          store16_masked(src + d, v, m);
        }
        sq = _mm512_fmadd_ps(v, v, sq);
      }
      const T* in = src ? src : xr;
      // mean in float32 as aten's mean does it (sum, then divide), then rsqrt.
      float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(sq) / static_cast<float>(dim) + static_cast<float>(eps));
      __m512 inv_v = _mm512_set1_ps(inv);
      for (int64_t d = 0; d < dim; d += 16) {
        __mmask16 m = tail_mask(dim - d);
        __m512 y = round_as(_mm512_mul_ps(load16_masked(in + d, m), inv_v), xr);
        store16_masked(out + r * dim + d, _mm512_mul_ps(load16_masked(weight + d, m), y), m);
      }
    }
  });
}

// ---- RoPE, "rotate half" layout, in place ------------------------------------------------------
// x1' = x1*c - x2*s, x2' = x2*c + x1*s with c, s rounded to T first and every product and
// sum rounded to T, as the aten ops of layers/rotary.py do in T.

template <typename T>
void rotate_heads(T* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t token_stride, const float* cos,
                  const float* sin, const int64_t* positions) {
  int64_t half = head_dim / 2;
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c_row = cos + positions[t] * half;
      const float* s_row = sin + positions[t] * half;
      for (int64_t h = 0; h < heads; ++h) {
        T* head = x + t * token_stride + h * head_dim;
        for (int64_t d = 0; d < half; d += 16) {
          __mmask16 m = tail_mask(half - d);
          __m512 c = round_as(load16_masked(c_row + d, m), head);
          __m512 s = round_as(load16_masked(s_row + d, m), head);
          __m512 x1 = load16_masked(head + d, m), x2 = load16_masked(head + half + d, m);
          __m512 a = _mm512_sub_ps(round_as(_mm512_mul_ps(x1, c), head), round_as(_mm512_mul_ps(x2, s), head));
          __m512 b = _mm512_add_ps(round_as(_mm512_mul_ps(x2, c), head), round_as(_mm512_mul_ps(x1, s), head));
          store16_masked(head + d, a, m);
          store16_masked(head + half + d, b, m);
        }
      }
    }
  });
}

// ---- paged decode attention ------------------------------------------------------------------
// One new token per sequence against its keys in the paged pool, read in place through the
// block table (no gather). Work item: (sequence, kv head) with its G = H / Hkv query heads.
// Pools hold the model's dtype, or int8 with a float32 scale per (slot, kv head) (Int8KV in
// model/attention/base.py): the scale pool is laid out as the pool without its head_dim axis.

constexpr int64_t kPrefetch = 16;  // positions ahead; measured best of 4, 8, 16, 32 (B=64 rollout)

// Into L2: an item's rows are read once per query row of their group, and its K and V together
// (~100 KB at 200 positions) outgrow L1. T1 over T0 was 15-20% faster at B=64.
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t offset = 0; offset < bytes; offset += 64) _mm_prefetch(c + offset, _MM_HINT_T1);
}

// The batch's work items and where each reads. An item is one sequence's span of kv heads: all
// of them when there are enough sequences to keep the threads busy, so each position's K/V row
// is read whole and in order (the heads of a position are adjacent in the pool); else one kv
// head, for parallelism at small batch.
struct DecodeItems {
  const int64_t* block_tables;
  const int64_t* context_lens;
  int64_t num_heads, head_dim, block_size, max_blocks, window;
  int64_t group, span, spans_per_seq, rows, token_stride, block_stride, count;

  DecodeItems(const int64_t* tables, const int64_t* lens, int64_t num_seqs, int64_t heads, int64_t kv_heads,
              int64_t dim, int64_t bs, int64_t max_blocks_, int64_t window_)
      : block_tables(tables), context_lens(lens), num_heads(heads), head_dim(dim), block_size(bs),
        max_blocks(max_blocks_), window(window_) {
    group = heads / kv_heads;
    span = num_seqs >= 2 * at::get_num_threads() ? kv_heads : 1;
    spans_per_seq = kv_heads / span;
    rows = span * group;  // query rows of an item: head h0 + r / group for row r
    token_stride = kv_heads * dim;  // between positions of one block
    block_stride = bs * token_stride;
    count = num_seqs * spans_per_seq;
  }
  int64_t seq(int64_t item) const { return item / spans_per_seq; }
  int64_t first_head(int64_t item) const { return (item % spans_per_seq) * span; }
  // (first position, count) of an item's window
  std::pair<int64_t, int64_t> positions(int64_t item) const {
    const int64_t len = context_lens[seq(item)];
    const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
    return {first, len - first};
  }
  // fn(begin, end) once per thread, on contiguous ranges of items of about equal work (positions
  // plus a fixed cost per item) rather than equal counts: contexts differ, and an even split by
  // count leaves one thread waiting for the other
  template <typename Fn>
  void parallel_ranges(Fn&& fn) const {
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
    constexpr int64_t kItemCost = 16;  // positions' worth: the query rows, softmax setup, row lists
    const std::vector<int64_t> bounds =
        equal_work_bounds(count, threads, [&](int64_t item) { return positions(item).second + kItemCost; });
    at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) fn(bounds[r], bounds[r + 1]);
    });
  }
  // where an item's row of position pos starts in a pool (its first kv head), in elements;
  // divided by head_dim, in its scale pool
  int64_t pool_offset(int64_t item, int64_t pos) const {
    const int64_t* table = block_tables + seq(item) * max_blocks;
    return table[pos / block_size] * block_stride + (pos % block_size) * token_stride + first_head(item) * head_dim;
  }
};

// An item's pool rows, one pointer per position at its first kv head (and for int8 pools, the
// rows' scales).
struct ItemRows {
  std::vector<const char*> k, v;
  std::vector<const float*> k_scale, v_scale;
  int64_t row_bytes = 0;

  template <typename E>
  void build(const DecodeItems& items, int64_t item, const E* k_cache, const E* v_cache, const float* k_scales,
             const float* v_scales) {
    const auto [first, n] = items.positions(item);
    k.resize(n), v.resize(n);
    k_scale.resize(k_scales ? n : 0), v_scale.resize(k_scales ? n : 0);
    row_bytes = items.span * items.head_dim * static_cast<int64_t>(sizeof(E));
    // block by block: the divisions of a pool offset once per block, not once per position
    const int64_t scale_stride = items.token_stride / items.head_dim;  // a position's scales: one per kv head
    int64_t t = 0;
    for (int64_t pos = first; t < n;) {
      int64_t offset = items.pool_offset(item, pos), scale_offset = offset / items.head_dim;
      const int64_t in_block = std::min(n - t, items.block_size - pos % items.block_size);
      for (int64_t i = 0; i < in_block; ++i, ++t, offset += items.token_stride, scale_offset += scale_stride) {
        k[t] = reinterpret_cast<const char*>(k_cache + offset);
        v[t] = reinterpret_cast<const char*>(v_cache + offset);
        if (k_scales) k_scale[t] = k_scales + scale_offset, v_scale[t] = v_scales + scale_offset;
      }
      pos += in_block;
    }
  }
  template <typename E>
  const E* const* k_as() const { return reinterpret_cast<const E* const*>(k.data()); }
  template <typename E>
  const E* const* v_as() const { return reinterpret_cast<const E* const*>(v.data()); }
};

// The next work item's K and V rows (and scales), fetched a cache line of each per step() while
// the current item computes. Without it memory idles during an item's compute (all but its
// first query row, the softmax and P.V run on cached rows) and the compute waits during its
// first pass: the two were about equal at B=64, so overlapping them is worth up to 2x.
// Lines of K and of V per 16 positions of a query row in Q.K, and per position of a kv head
// in P.V: spread over both phases, so memory stays busy through P.V too. The next item's rows
// are span * D * 2 bytes, 6 lines a position for SmolLM2 at B=64 (span 3): its Q.K's 9 rows
// and P.V's 3 heads fetch 9 * 8 / 16 + 3 = 7.5 lines a position, a next item as long as this
// one. Measured (examples/kernel_microbench.py's pools from memory, B=64, 60-190 positions,
// bf16, min of 4-6 runs): 12 + 0 (Q.K only) 0.41 ms a layer, 8 + 1 0.36, 4 + 1 0.35, 8 + 2 0.36.
constexpr int kNextItemLinesPerChunk = 8;
constexpr int kNextItemLinesPerValueRow = 1;

struct NextItemPrefetcher {
  const char* const* k_rows = nullptr;
  const char* const* v_rows = nullptr;
  const float* const* k_scales = nullptr;  // null: no scales (a pool in the model's dtype)
  const float* const* v_scales = nullptr;
  int64_t n = 0, lines = 0, t = 0, line = 0;

  void reset(const ItemRows* next) {
    n = next ? static_cast<int64_t>(next->k.size()) : 0, t = 0, line = 0;
    if (!next) return;
    k_rows = next->k.data(), v_rows = next->v.data(), lines = (next->row_bytes + 63) / 64;
    k_scales = next->k_scale.empty() ? nullptr : next->k_scale.data();
    v_scales = next->v_scale.empty() ? nullptr : next->v_scale.data();
  }
  inline void step(int count) {
    for (int i = 0; i < count && t < n; ++i) {
      if (line == 0 && k_scales) {  // a position's scales: a few bytes, mostly one line per block
        _mm_prefetch(reinterpret_cast<const char*>(k_scales[t]), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(v_scales[t]), _MM_HINT_T1);
      }
      _mm_prefetch(k_rows[t] + line * 64, _MM_HINT_T1);
      _mm_prefetch(v_rows[t] + line * 64, _MM_HINT_T1);
      if (++line == lines) line = 0, ++t;
    }
  }
};

// Runs item_fn(item, rows, next_item) for items begin..end of one thread, with rows built one
// item ahead and next_item pointed at them, so that each item streams in the next one's pages.
template <typename E, typename Fn>
void pipelined_items(const DecodeItems& items, int64_t begin, int64_t end, const E* k_cache, const E* v_cache,
                     const float* k_scales, const float* v_scales, Fn&& item_fn) {
  if (begin >= end) return;
  ItemRows rows, next_rows;
  NextItemPrefetcher next_item;
  rows.build(items, begin, k_cache, v_cache, k_scales, v_scales);
  for (int64_t item = begin; item < end; ++item) {
    if (item + 1 < end) {
      next_rows.build(items, item + 1, k_cache, v_cache, k_scales, v_scales);
      next_item.reset(&next_rows);
    } else {
      next_item.reset(nullptr);
    }
    item_fn(item, rows, next_item);
    std::swap(rows, next_rows);
  }
}

// scores [rows][n] -> exp(s - max) in place, and 1 / sum per row
inline void softmax_rows(float* scores, float* inv_sum, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * n;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < n; t += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, tail_mask(n - t), s + t));
    __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += 16) {
      __mmask16 k = tail_mask(n - t);
      __m512 e = _mm512_maskz_mov_ps(k, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + t), m)));
      _mm512_mask_storeu_ps(s + t, k, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv_sum[r] = 1.0f / _mm512_reduce_add_ps(sum);
  }
}

// lane t = the sum of v[t]'s 16 lanes: 15 adds of shuffled halves; the tree leaves the lanes
// permuted, the last step puts them in order.
inline __m512 sum_each_of_16(__m512* v) {
  for (int i = 0; i < 8; ++i)
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 4], 0x88), _mm512_shuffle_f32x4(v[i], v[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)
    v[i] = _mm512_add_ps(_mm512_shuffle_ps(v[i], v[i + 2], 0x44), _mm512_shuffle_ps(v[i], v[i + 2], 0xEE));
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], 0x88), _mm512_shuffle_ps(v[0], v[1], 0xDD));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15), z);
}

// Q.K of an item, 16 positions at a time: start_row(row) loads a query row, dot(kp) returns its
// products with the key row at kp in 16 lanes; the 16 positions' lanes are then summed by one
// shuffle tree instead of 16 horizontal sums. scores[row][t] = finish(row, t0, sums of t0..).
template <typename E, typename StartRow, typename Dot, typename Finish>
__attribute__((always_inline)) inline void item_scores(const E* const* k_rows, int64_t n, int64_t span, int64_t group, int64_t head_dim,
                        float* scores, NextItemPrefetcher& next_item, StartRow&& start_row, Dot&& dot,
                        Finish&& finish) {
  const int64_t row_elements = span * head_dim;
  for (int64_t t = 0; t < std::min<int64_t>(n, kPrefetch); ++t) prefetch_bytes(k_rows[t], row_elements * sizeof(E));
  for (int64_t h = 0; h < span; ++h)
    for (int64_t r = 0; r < group; ++r) {
      const int64_t row = h * group + r;
      const bool first_pass = row == 0;  // the one that fetches the pages: prefetch ahead of it
      start_row(row);
      for (int64_t t0 = 0; t0 < n; t0 += 16) {
        const int64_t count = std::min<int64_t>(16, n - t0);
        next_item.step(kNextItemLinesPerChunk);
        __m512 dots[16];
        for (int u = 0; u < 16; ++u) {
          dots[u] = _mm512_setzero_ps();
          if (u < count) {
            if (first_pass && t0 + u + kPrefetch < n) prefetch_bytes(k_rows[t0 + u + kPrefetch], row_elements * sizeof(E));
            dots[u] = dot(k_rows[t0 + u] + h * head_dim);
          }
        }
        _mm512_mask_storeu_ps(scores + row * n + t0, tail_mask(count), finish(row, t0, sum_each_of_16(dots)));
      }
    }
}

// P.V of an item, each row's accumulators in registers: out[row] = inv_sum[row] *
// sum_t scores[row][t] * value(t), value(vp, vv) loading position t's row (at vp) as C16
// float vectors. kEvenOdd: vv[2c] and vv[2c + 1] hold the even and the odd elements of the
// row's 32 elements from 32c (a bf16 row's halves of each 32-bit lane, split by one shift and
// one mask instead of two widening loads); the products are the same, only the lanes differ,
// and the store puts the elements back in order. next_item streams the next item's rows in.
template <int C16, bool kEvenOdd = false, typename E, typename T, typename Load>
__attribute__((always_inline)) inline void item_values(const E* const* v_rows, int64_t n, int64_t span, int64_t group, const float* scores,
                        const float* inv_sum, T* out, NextItemPrefetcher& next_item, Load&& load) {
  constexpr int64_t D = C16 * 16;
  constexpr int R = C16 >= 16 ? 1 : 16 / C16;  // rows per P.V pass: 16 accumulators
  for (int64_t t = 0; t < std::min<int64_t>(n, kPrefetch); ++t) prefetch_bytes(v_rows[t], span * D * sizeof(E));
  for (int64_t h = 0; h < span; ++h)
    for (int64_t r0 = 0; r0 < group; r0 += R) {
      const int64_t rr = std::min<int64_t>(R, group - r0), row0 = h * group + r0;
      const bool first_pass = row0 == 0;
      __m512 acc[R][C16];
      for (int i = 0; i < R; ++i)
        for (int c = 0; c < C16; ++c) acc[i][c] = _mm512_setzero_ps();
      for (int64_t t = 0; t < n; ++t) {
        if (first_pass && t + kPrefetch < n) prefetch_bytes(v_rows[t + kPrefetch], span * D * sizeof(E));
        next_item.step(kNextItemLinesPerValueRow);
        __m512 vv[C16];
        load(v_rows[t] + h * D, vv);
        for (int i = 0; i < R; ++i) {
          if (i >= rr) break;
          const __m512 p = _mm512_set1_ps(scores[(row0 + i) * n + t]);
          for (int c = 0; c < C16; ++c) acc[i][c] = _mm512_fmadd_ps(p, vv[c], acc[i][c]);
        }
      }
      for (int64_t i = 0; i < rr; ++i) {
        const __m512 inv = _mm512_set1_ps(inv_sum[row0 + i]);
        if constexpr (kEvenOdd) {
          static_assert(std::is_same_v<T, bf16>, "even/odd lanes: bf16 rows");
          // lane j of the pair: even element 2j in the low 16 bits, odd 2j + 1 in the high ones
          const __m512i to_order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23,
                                                    7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
          for (int c = 0; c < C16; c += 2) {
            const __m512i halves = _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16_bits(_mm512_mul_ps(acc[i][c], inv))),
                                                      to_bf16_bits(_mm512_mul_ps(acc[i][c + 1], inv)), 1);
            _mm512_storeu_si512(out + (row0 + i) * D + c * 16, _mm512_permutexvar_epi16(to_order, halves));
          }
        } else {
          for (int c = 0; c < C16; ++c) store16(out + (row0 + i) * D + c * 16, _mm512_mul_ps(acc[i][c], inv));
        }
      }
    }
}

#if defined(__AVX512BF16__)
// bf16 decode, one work item: Q.K on vdpbf16ps (bf16 pairs, float32 sums; the scale after the
// sum); P.V in float32 FMAs in the same order as the generic loop, so the same bits.
// q: the item's span * group query rows [rows][D]; k_rows/v_rows[t]: position t's row in the
// pool at the item's first kv head; out: the item's rows. scores: [rows][n] scratch.
template <int VECS>  // D / 32: bf16 registers per head row
void bf16_decode_item(const bf16* q, const bf16* const* k_rows, const bf16* const* v_rows, int64_t n, int64_t span,
                      int64_t group, float scale, float* scores, float* inv_sum, bf16* out,
                      NextItemPrefetcher& next_item) {
  constexpr int64_t D = VECS * 32;
  const __m512 scale_v = _mm512_set1_ps(scale);
  __m512i qv[VECS];
  item_scores(k_rows, n, span, group, D, scores, next_item,
              [&](int64_t row) {
                for (int c = 0; c < VECS; ++c) qv[c] = _mm512_loadu_si512(q + row * D + c * 32);
              },
              [&](const bf16* kp) {
                __m512 acc = _mm512_setzero_ps();
                for (int c = 0; c < VECS; ++c)
                  acc = _mm512_dpbf16_ps(acc, (__m512bh)qv[c], (__m512bh)_mm512_loadu_si512(kp + c * 32));
                return acc;
              },
              [&](int64_t, int64_t, __m512 sums) { return _mm512_mul_ps(sums, scale_v); });
  softmax_rows(scores, inv_sum, span * group, n);
  item_values<VECS * 2, true>(v_rows, n, span, group, scores, inv_sum, out, next_item, [](const bf16* vp, __m512* vv) {
    for (int c = 0; c < VECS; ++c) {
      const __m512i pairs = _mm512_loadu_si512(vp + c * 32);
      vv[2 * c] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      vv[2 * c + 1] = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    }
  });
}
#endif

#if defined(__AVX512VNNI__)
// int8 pool decode, one work item. Each query row is quantized as the int8 linears quantize
// activations (scale max|q| / 127; llama.cpp quantizes Q likewise against a q8_0 cache), and
// Q.K runs on vpdpbusd: the key bytes, offset by 128 to unsigned (k ^ 0x80), against the
// signed query bytes, minus 128 * sum(q); exact in int32, then float(dot) * q_scale *
// k_scale[t] * scale. P.V in float32: p * v_scale[t] * float(v).
template <int V64, typename T>  // V64 = D / 64: 64-byte key rows
void int8_decode_item(const T* q, const ItemRows& rows, int64_t n, int64_t span, int64_t group, float scale,
                      float* scores, float* inv_sum, float* kv_scales, int8_t* q_int8, float* q_scale, int32_t* q_sum,
                      T* out, NextItemPrefetcher& next_item) {
  constexpr int64_t D = V64 * 64;
  const int64_t item_rows = span * group;
  // the rows' scales, [span][n] for K then for V: contiguous, so a chunk's are one vector load
  float* k_scales = kv_scales;
  float* v_scales = kv_scales + span * n;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < span; ++h) k_scales[h * n + t] = rows.k_scale[t][h], v_scales[h * n + t] = rows.v_scale[t][h];
  for (int64_t row = 0; row < item_rows; ++row) {
    q_scale[row] = quantize_row(q + row * D, D, q_int8 + row * D) * scale;
    int32_t sum = 0;
    for (int64_t i = 0; i < D; ++i) sum += q_int8[row * D + i];
    q_sum[row] = 128 * sum;
  }
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i qv[V64];
  item_scores(rows.k_as<int8_t>(), n, span, group, D, scores, next_item,
              [&](int64_t row) {
                for (int c = 0; c < V64; ++c) qv[c] = _mm512_loadu_si512(q_int8 + row * D + c * 64);
              },
              [&](const int8_t* kp) {
                __m512i acc = _mm512_setzero_si512();
                for (int c = 0; c < V64; ++c)
                  acc = _mm512_dpbusd_epi32(acc, _mm512_xor_si512(_mm512_loadu_si512(kp + c * 64), offset), qv[c]);
                return _mm512_cvtepi32_ps(acc);  // lane sums < 2^24: exact, and so is the tree's float sum
              },
              [&](int64_t row, int64_t t0, __m512 sums) {
                const __m512 dots = _mm512_sub_ps(sums, _mm512_set1_ps(static_cast<float>(q_sum[row])));
                return _mm512_mul_ps(_mm512_mul_ps(dots, _mm512_set1_ps(q_scale[row])),
                                     _mm512_maskz_loadu_ps(tail_mask(n - t0), k_scales + (row / group) * n + t0));
              });
  softmax_rows(scores, inv_sum, item_rows, n);
  for (int64_t row = 0; row < item_rows; ++row)  // v's scales folded into the probabilities
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 m = tail_mask(n - t);
      float* p = scores + row * n + t;
      _mm512_mask_storeu_ps(p, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p),
                                                _mm512_maskz_loadu_ps(m, v_scales + (row / group) * n + t)));
    }
  item_values<V64 * 4>(rows.v_as<int8_t>(), n, span, group, scores, inv_sum, out, next_item, [](const int8_t* vp, __m512* vv) {
    for (int c = 0; c < V64 * 4; ++c)
      vv[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vp + c * 16))));
  });
}
#endif

template <typename T>
void decode_attention_impl(const T* q, const T* k_cache, const T* v_cache, const int64_t* block_tables,
                           const int64_t* context_lens, T* out, int64_t num_seqs, int64_t num_heads,
                           int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                           double scale, int64_t window, int64_t q_stride) {
  const DecodeItems items(block_tables, context_lens, num_seqs, num_heads, num_kv_heads, head_dim, block_size,
                          max_blocks, window);
  const int64_t group = items.group, span = items.span, rows = items.rows, chunks = head_dim / 16;
  items.parallel_ranges([&](int64_t begin, int64_t end) {
    std::vector<float> qf(rows * head_dim), acc(rows * head_dim), scores, inv_sum(rows);
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, bf16>) {
      if (head_dim == 64 || head_dim == 128 || head_dim == 256) {
        auto item_fn = head_dim == 64 ? bf16_decode_item<2> : head_dim == 128 ? bf16_decode_item<4> : bf16_decode_item<8>;
        pipelined_items<T>(items, begin, end, k_cache, v_cache, nullptr, nullptr,
                           [&](int64_t item, const ItemRows& item_rows, NextItemPrefetcher& next_item) {
          const int64_t b = items.seq(item), h0 = items.first_head(item), n = static_cast<int64_t>(item_rows.k.size());
          scores.resize(rows * n);
          item_fn(q + b * q_stride + h0 * group * head_dim, item_rows.k_as<bf16>(), item_rows.v_as<bf16>(), n, span,
                  group, static_cast<float>(scale), scores.data(), inv_sum.data(),
                  out + (b * num_heads + h0 * group) * head_dim, next_item);
        });
        return;
      }
    }
#endif
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = items.seq(item), h0 = items.first_head(item);
      const auto [first, n] = items.positions(item);
      scores.resize(rows * n);
      // The pages are cold (the layer's weights went through the caches since the last step)
      // and scattered: fetch a few positions ahead, or wait on each row's misses.
      auto at_pos = [&](const T* cache, int64_t pos) { return cache + items.pool_offset(item, pos); };
      for (int64_t r = 0; r < rows; ++r) {
        const T* qr = q + b * q_stride + (h0 * group + r) * head_dim;
        for (int64_t c = 0; c < chunks; ++c)
          store16(qf.data() + r * head_dim + c * 16, _mm512_mul_ps(load16(qr + c * 16), _mm512_set1_ps(scale)));
      }
      // fn(t, row of position first + t), in order, the rows kPrefetch positions ahead prefetched
      auto for_each_position = [&](const T* cache, auto&& fn) {
        const int64_t bytes = span * head_dim * sizeof(T);
        for (int64_t t = 0; t < std::min<int64_t>(n, kPrefetch); ++t) prefetch_bytes(at_pos(cache, first + t), bytes);
        for (int64_t t = 0; t < n; ++t) {
          if (t + kPrefetch < n) prefetch_bytes(at_pos(cache, first + t + kPrefetch), bytes);
          fn(t, at_pos(cache, first + t));
        }
      };
      for_each_position(k_cache, [&](int64_t t, const T* kp) {
        for (int64_t r = 0; r < rows; ++r) {
          const T* kh = kp + (r / group) * head_dim;
          __m512 dot = _mm512_setzero_ps();
          for (int64_t c = 0; c < chunks; ++c)
            dot = _mm512_fmadd_ps(load16(qf.data() + r * head_dim + c * 16), load16(kh + c * 16), dot);
          scores[r * n + t] = _mm512_reduce_add_ps(dot);
        }
      });
      softmax_rows(scores.data(), inv_sum.data(), rows, n);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for_each_position(v_cache, [&](int64_t t, const T* vp) {
        for (int64_t r = 0; r < rows; ++r) {
          const T* vh = vp + (r / group) * head_dim;
          const __m512 p = _mm512_set1_ps(scores[r * n + t]);
          float* a = acc.data() + r * head_dim;
          for (int64_t c = 0; c < chunks; ++c) store16(a + c * 16, _mm512_fmadd_ps(p, load16(vh + c * 16), load16(a + c * 16)));
        }
      });
      for (int64_t r = 0; r < rows; ++r) {
        T* o = out + (b * num_heads + h0 * group + r) * head_dim;
        for (int64_t c = 0; c < chunks; ++c)
          store16(o + c * 16, _mm512_mul_ps(load16(acc.data() + r * head_dim + c * 16), _mm512_set1_ps(inv_sum[r])));
      }
    }
  });
}

// A decode attention's inputs as the kernels read them: query rows may be strided (a view of
// the fused qkv output) but the heads of a row packed; block tables and lengths contiguous int64.
struct DecodeInputs {
  at::Tensor query, block_tables, context_lens;
  DecodeInputs(const at::Tensor& q, const at::Tensor& tables, const at::Tensor& lens)
      : query(q.stride(2) == 1 && q.stride(1) == q.size(2) ? q : q.contiguous()),
        block_tables(tables.contiguous()), context_lens(lens.contiguous()) {
    TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong);
  }
};

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t sliding_window) {
  // query [B, H, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks]; context_lens [B]
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && query.scalar_type() == k_cache.scalar_type());
  TORCH_CHECK(query.size(2) % 16 == 0, "head_dim must be a multiple of 16");
  const DecodeInputs in(query, block_tables, context_lens);
  const at::Tensor &q = in.query, &tables = in.block_tables, &lens = in.context_lens;
  auto out = at::empty(q.sizes(), q.options());
  PINFER_DISPATCH(q.scalar_type(), "paged_decode_attention", [&] {
    decode_attention_impl<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                                    tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
                                    q.size(0), q.size(1), k_cache.size(2), q.size(2), k_cache.size(1), tables.size(1),
                                    scale, sliding_window, q.stride(0));
  });
  return out;
}

#if defined(__AVX512VNNI__)
void check_int8_pool(const at::Tensor& cache, const at::Tensor& scales, const char* name) {
  TORCH_CHECK(cache.is_contiguous() && cache.scalar_type() == at::kChar, name, ": int8 pools");
  TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == at::kFloat && scales.numel() * cache.size(3) == cache.numel(),
              name, ": float32 scales [num_blocks, block_size, Hkv, 1]");
}

at::Tensor paged_decode_attention_int8(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& k_scales, const at::Tensor& v_scales,
                                       const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                       int64_t sliding_window) {
  // query [B, H, D] float32/bf16; caches int8 [num_blocks, block_size, Hkv, D] with scales [..., Hkv, 1]
  check_int8_pool(k_cache, k_scales, "paged_decode_attention_int8");
  check_int8_pool(v_cache, v_scales, "paged_decode_attention_int8");
  const int64_t head_dim = query.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128 || head_dim == 256, "paged_decode_attention_int8: head_dim 64, 128 or 256");
  const DecodeInputs in(query, block_tables, context_lens);
  const at::Tensor &q = in.query, &tables = in.block_tables, &lens = in.context_lens;
  auto out = at::empty(q.sizes(), q.options());
  const DecodeItems items(tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), q.size(0), q.size(1), k_cache.size(2),
                          head_dim, k_cache.size(1), tables.size(1), sliding_window);
  PINFER_DISPATCH(q.scalar_type(), "paged_decode_attention_int8", [&] {
    auto item_fn = head_dim == 64    ? int8_decode_item<1, scalar_t>
                   : head_dim == 128 ? int8_decode_item<2, scalar_t>
                                     : int8_decode_item<4, scalar_t>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t rows = items.rows;
    items.parallel_ranges([&](int64_t begin, int64_t end) {
      std::vector<float> scores, kv_scales, inv_sum(rows), q_scale(rows);
      std::vector<int8_t> q_int8(rows * head_dim);
      std::vector<int32_t> q_sum(rows);
      pipelined_items<int8_t>(items, begin, end, k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(),
                              k_scales.data_ptr<float>(), v_scales.data_ptr<float>(),
                              [&](int64_t item, const ItemRows& item_rows, NextItemPrefetcher& next_item) {
        const int64_t b = items.seq(item), h0 = items.first_head(item), n = static_cast<int64_t>(item_rows.k.size());
        scores.resize(rows * n);
        kv_scales.resize(2 * items.span * n);
        item_fn(qp + b * q.stride(0) + h0 * items.group * head_dim, item_rows, n, items.span, items.group,
                static_cast<float>(scale), scores.data(), inv_sum.data(), kv_scales.data(), q_int8.data(),
                q_scale.data(), q_sum.data(),
                op + (b * q.size(1) + h0 * items.group) * head_dim, next_item);
      });
    });
  });
  return out;
}
#endif

// ---- sampling: Gumbel-max at a temperature, with the chosen token's logprob and rank -------
// What sampling/sampler.py's _plain_random_sample computes, in two passes over each row (and
// two over the tokens that can win) instead of ~20 aten passes over [B, V]: the counter-based
// noise of sampling/random.py bit for bit (the same 32-bit hash, and Sleef's logf, which aten's
// log uses), so the same tokens; the logsumexp sums in another order with exp_nonpositive
// (relative error ~2e-7), so logprobs agree to float32 rounding. Only the tokens that can still
// win get noise (gumbel_sample_rows, gumbel_sample_row): ~10% of SmolLM2's vocabulary at T = 1.

#endif  // PINFER_AVX512: row_keys is scalar, built for every CPU

// sampling/random.py's lowbias32 multipliers, for the scalar and the vector mixer below
constexpr uint32_t kLowbiasC1 = 0x7FEB352Du, kLowbiasC2 = 0x846CA68Bu;

// sampling/random.py's row_keys, one row at a time: there it is ~60 aten ops on [B] tensors,
// ~0.4 ms of a batch-64 step.
inline uint32_t lowbias32_scalar(uint32_t x) {
  x ^= x >> 16;
  x *= kLowbiasC1;
  x ^= x >> 15;
  x *= kLowbiasC2;
  return x ^ (x >> 16);
}

at::Tensor row_keys(const at::Tensor& seeds, const at::Tensor& steps) {
  // seeds, steps [B] int64 -> keys [B] int32: the four 32-bit halves of step and seed absorbed in turn
  TORCH_CHECK(seeds.dim() == 1 && steps.sizes() == seeds.sizes() && seeds.scalar_type() == at::kLong &&
              steps.scalar_type() == at::kLong, "row_keys: seeds and steps [B] int64");
  auto seed = seeds.contiguous(), step = steps.contiguous();
  auto keys = at::empty(seeds.sizes(), seeds.options().dtype(at::kInt));
  constexpr uint32_t salts[4] = {0x68E31DA4u, 0xB5297A4Du, 0x1B56C4E9u, 0x2F3C6A75u};
  for (int64_t r = 0; r < seeds.numel(); ++r) {
    const uint64_t t = static_cast<uint64_t>(step.data_ptr<int64_t>()[r]), s = static_cast<uint64_t>(seed.data_ptr<int64_t>()[r]);
    const uint32_t words[4] = {static_cast<uint32_t>(t), static_cast<uint32_t>(t >> 32), static_cast<uint32_t>(s),
                               static_cast<uint32_t>(s >> 32)};
    uint32_t key = 0;
    for (int i = 0; i < 4; ++i) key = lowbias32_scalar(key ^ words[i] ^ salts[i]);
    keys.data_ptr<int32_t>()[r] = static_cast<int32_t>(key);
  }
  return keys;
}

#if PINFER_AVX512
inline __m512i lowbias32(__m512i x, bool finish) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int32_t>(kLowbiasC1)));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int32_t>(kLowbiasC2)));
  if (finish) x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  return x;
}

// log(-log(u)) for the uniforms of random.uniform(): x - this is x + Gumbel noise.
inline __m512 log_neg_log_uniform(__m512i key, __m512i token) {
  __m512i token_hash = lowbias32(_mm512_xor_si512(token, _mm512_set1_epi32(static_cast<int32_t>(0x9E3779B9u))), true);
  __m512i bits = lowbias32(_mm512_xor_si512(key, token_hash), false);
  bits = _mm512_or_si512(_mm512_srli_epi32(bits, 9), _mm512_set1_epi32(0x3F800000));
  __m512 u = _mm512_sub_ps(_mm512_castsi512_ps(bits), _mm512_set1_ps(1.0f - 5.9604644775390625e-08f));
  return Sleef_logf16_u10(_mm512_sub_ps(_mm512_setzero_ps(), Sleef_logf16_u10(u)));
}

// The first maximum over values seen 16 at a time: per lane the best value and its id (strict
// >, so a lane keeps its earliest), then the smallest id among the lanes at the top.
struct FirstMax {
  __m512 best = _mm512_set1_ps(-INFINITY);
  __m512i best_id = _mm512_setzero_si512();
  inline void update(__mmask16 m, __m512 values, __m512i ids) {
    const __mmask16 better = _mm512_mask_cmp_ps_mask(m, values, best, _CMP_GT_OQ);
    best = _mm512_mask_mov_ps(best, better, values);
    best_id = _mm512_mask_mov_epi32(best_id, better, ids);
  }
  inline int32_t id() const {
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(best));
    return _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(best, top, _CMP_EQ_OQ), best_id);
  }
};

// Bounds of log(-log(u)) over the uniforms random.uniform() can make, (2m + 1) * 2^-24: at
// u = 1 - 2^-24 (~ -16.6) and u = 2^-24 (~ 2.8), computed as log_neg_log_uniform computes them.
inline std::pair<float, float> log_neg_log_bounds() {
  auto at = [](float u) {
    return _mm512_cvtss_f32(Sleef_logf16_u10(_mm512_sub_ps(_mm512_setzero_ps(), Sleef_logf16_u10(_mm512_set1_ps(u)))));
  };
  return {at(1.0f - 5.9604644775390625e-08f), at(5.9604644775390625e-08f)};
}

// x within this of the row's top: the tokens whose noise bounds the winner's score (a few
// hundred of SmolLM2's at T = 1; any value is correct, this one makes the bound tight).
constexpr float kNearTop = 8.0f;

// One row of gumbel_sample_rows. kUnit: the temperature is 1, where x = logits / T is the
// logits themselves (a division by 1 is exact), so the divisions are skipped: the same bits.
template <typename T, bool kUnit>
void gumbel_sample_row(const T* row, int64_t vocab, float temperature, int32_t row_key, bool processed, float low,
                       float high, float* kept_x, float* kept_raw, int32_t* kept_ids, float* noisy_x,
                       int32_t* noisy_ids, int64_t* token_id, float* chosen_logprob, int64_t* rank_out) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 t = _mm512_set1_ps(temperature);
  const __m512i key = _mm512_set1_epi32(row_key);
  auto scaled = [&](__m512 raw) { return kUnit ? raw : _mm512_div_ps(raw, t); };
  // pass 1: the max of x = logits / T and of the logprob source
  __m512 x_max = _mm512_set1_ps(-INFINITY), raw_max = _mm512_set1_ps(-INFINITY);
  for (int64_t v = 0; v < vocab; v += 16) {
    __mmask16 m = tail_mask(vocab - v);
    __m512 raw = load16_masked(row + v, m);
    x_max = _mm512_mask_max_ps(x_max, m, x_max, scaled(raw));
    if (!kUnit) raw_max = _mm512_mask_max_ps(raw_max, m, raw_max, raw);
  }
  const float top_x = _mm512_reduce_max_ps(x_max);
  const float mx = processed || kUnit ? top_x : _mm512_reduce_max_ps(raw_max);
  float threshold = top_x - (high - low) - 1e-3f * (1.0f + std::fabs(top_x));
  if (!std::isfinite(threshold)) threshold = -INFINITY;  // an infinite logit: keep every token
  // pass 2: the tokens that can win, in order (with their logprob source where that is not x),
  // the few near the top (for the bound below), and the logsumexp's sum of the source
  const bool keep_raw = !processed && !kUnit;
  const __m512 near_top = _mm512_set1_ps(top_x - kNearTop);
  __m512 sum = _mm512_setzero_ps();
  int64_t kept = 0, top_count = 0;
  for (int64_t v = 0; v < vocab; v += 16) {
    __mmask16 m = tail_mask(vocab - v);
    __m512 raw = load16_masked(row + v, m);
    __m512 x = scaled(raw);
    const __m512i ids = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(v)));
    __mmask16 may_win = _mm512_mask_cmp_ps_mask(m, x, _mm512_set1_ps(threshold), _CMP_GE_OQ);
    // compress in registers, then a plain store (the buffers have 16 spare): the compress
    // straight to memory is microcoded on AMD Zen 4, and made this pass slower than the noise
    _mm512_storeu_ps(kept_x + kept, _mm512_maskz_compress_ps(may_win, x));
    if (keep_raw) _mm512_storeu_ps(kept_raw + kept, _mm512_maskz_compress_ps(may_win, raw));
    _mm512_storeu_si512(kept_ids + kept, _mm512_maskz_compress_epi32(may_win, ids));
    kept += __builtin_popcount(may_win);
    __mmask16 top = _mm512_mask_cmp_ps_mask(may_win, x, near_top, _CMP_GE_OQ);
    if (top) {
      _mm512_storeu_ps(noisy_x + top_count, _mm512_maskz_compress_ps(top, x));
      _mm512_storeu_si512(noisy_ids + top_count, _mm512_maskz_compress_epi32(top, ids));
      top_count += __builtin_popcount(top);
    }
    __m512 source = processed ? x : raw;
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_sub_ps(source, _mm512_set1_ps(mx)))));
  }
  auto noisy_max = [&](int64_t count) {  // the first maximum of x - log(-log u) over noisy_x/ids
    FirstMax noisy;
    for (int64_t i = 0; i < count; i += 16) {
      __mmask16 m = tail_mask(count - i);
      __m512 x = _mm512_maskz_loadu_ps(m, noisy_x + i);
      __m512i ids = _mm512_maskz_loadu_epi32(m, noisy_ids + i);
      noisy.update(m, _mm512_sub_ps(x, log_neg_log_uniform(key, ids)), ids);
    }
    return noisy;
  };
  // The best score near the top, best, bounds the winner's from below; a kept token scores at
  // most x - low, so only those with x - low >= best can win or tie: a tenth of the vocabulary
  // rather than the kept ~40% (SmolLM2 at T = 1). The rest get no noise.
  const float best = _mm512_reduce_max_ps(noisy_max(top_count).best);
  float bound = best - 1e-3f * (1.0f + std::fabs(best));  // the margin covers rounding, as above
  if (!std::isfinite(bound)) bound = -INFINITY;  // no finite best (an infinite logit): all kept
  int64_t contenders = 0;
  for (int64_t i = 0; i < kept; i += 16) {
    __mmask16 m = tail_mask(kept - i);
    __m512 x = _mm512_maskz_loadu_ps(m, kept_x + i);
    __mmask16 may_win = _mm512_mask_cmp_ps_mask(m, _mm512_sub_ps(x, _mm512_set1_ps(low)), _mm512_set1_ps(bound),
                                                _CMP_GE_OQ);
    _mm512_storeu_ps(noisy_x + contenders, _mm512_maskz_compress_ps(may_win, x));
    _mm512_storeu_si512(noisy_ids + contenders,
                        _mm512_maskz_compress_epi32(may_win, _mm512_maskz_loadu_epi32(m, kept_ids + i)));
    contenders += __builtin_popcount(may_win);
  }
  const int32_t token = noisy_max(contenders).id();
  const float chosen_raw = static_cast<float>(row[token]);
  const float chosen = processed && !kUnit ? chosen_raw / temperature : chosen_raw;
  // the rank, how many tokens score >= the chosen one: all of them are kept (the chosen token
  // has x >= threshold, and x = raw / T never decreases as raw grows), so only those are counted
  const float* kept_source = keep_raw ? kept_raw : kept_x;
  int64_t rank = 0;
  for (int64_t i = 0; i < kept; i += 16) {
    __mmask16 m = tail_mask(kept - i);
    rank += __builtin_popcount(_mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, kept_source + i),
                                                       _mm512_set1_ps(chosen), _CMP_GE_OQ));
  }
  *token_id = token;
  *chosen_logprob = chosen - (mx + std::log(_mm512_reduce_add_ps(sum)));
  *rank_out = rank;
}

template <typename T>
void gumbel_sample_rows(const T* logits, int64_t rows, int64_t vocab, const float* temperature, const int32_t* keys,
                        bool processed, int64_t* token_ids, float* chosen_logprobs, int64_t* ranks) {
  // A token scores x - log(-log u) <= x - low, and the largest x scores at least x_max - high, so
  // a token with x < x_max - (high - low) never wins (strictly below: not even a tie): the rest
  // are kept, at temperature 1 about 40% of SmolLM2's vocabulary, and gumbel_sample_row bounds
  // the winner tighter before it draws the noise (a hash and two logs, most of the work). The
  // margin covers the rounding of x - log(-log u).
  const auto [low, high] = log_neg_log_bounds();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    // scratch, every element written before it is read: not zeroed (5 x 200 KB a call)
    auto floats = [&] { return std::unique_ptr<float[]>(new float[vocab + 16]); };
    auto ids = [&] { return std::unique_ptr<int32_t[]>(new int32_t[vocab + 16]); };
    auto kept_x = floats(), kept_raw = floats(), noisy_x = floats();
    auto kept_ids = ids(), noisy_ids = ids();
    for (int64_t r = begin; r < end; ++r) {
      auto row_fn = temperature[r] == 1.0f ? gumbel_sample_row<T, true> : gumbel_sample_row<T, false>;
      row_fn(logits + r * vocab, vocab, temperature[r], keys[r], processed, low, high, kept_x.get(), kept_raw.get(),
             kept_ids.get(), noisy_x.get(), noisy_ids.get(), token_ids + r, chosen_logprobs + r, ranks + r);
    }
  });
}

// Greedy rows: the first maximum of each row (torch's max(dim=-1).indices for finite logits;
// a NaN never wins here). torch's index-tracking reductions ran ~100 us for one row of 49k.
template <typename T>
void argmax_rows(const T* logits, int64_t rows, int64_t vocab, int64_t* out) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t r = begin; r < end; ++r) {
      const T* row = logits + r * vocab;
      FirstMax top;
      for (int64_t v = 0; v < vocab; v += 16) {
        __mmask16 m = tail_mask(vocab - v);
        top.update(m, load16_masked(row + v, m), _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(v))));
      }
      out[r] = top.id();
    }
  });
}

// ---- SwiGLU's silu(gate) * up -------------------------------------------------------------
// gate_up [T, 2I] -> [T, I]; silu as aten computes it (x / (1 + exp(-x)) in float32, Sleef's
// expf), rounded to T, then the product rounded to T: the bits of F.silu(gate) * up.

inline __m512 neg_exp(__m512 g) { return Sleef_expf16_u10(_mm512_sub_ps(_mm512_setzero_ps(), g)); }

// T(T(g / (1 + e)) * up), e = exp(-g)
template <typename T>
inline __m512 silu_times(__m512 g, __m512 e, __m512 up, const T* as) {
  return _mm512_mul_ps(round_as(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), as), up);
}

template <typename T>
void silu_mul_rows(const T* gate_up, T* out, int64_t rows, int64_t width) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = gate_up + r * 2 * width;
      const T* up = gate + width;
      T* o = out + r * width;
      int64_t d = 0;
      // four vectors at a time, their exps first, so that the calls' latencies overlap:
      // 0.060 -> 0.043 ms for SmolLM2's [64, 3072] (the minimum of repeated calls, as
      // examples/kernel_microbench.py's SwiGLU line times it)
      for (; d + 64 <= width; d += 64) {
        __m512 g[4], e[4];
        for (int i = 0; i < 4; ++i) g[i] = load16(gate + d + 16 * i);
        for (int i = 0; i < 4; ++i) e[i] = neg_exp(g[i]);
        for (int i = 0; i < 4; ++i) store16(o + d + 16 * i, silu_times(g[i], e[i], load16(up + d + 16 * i), gate));
      }
      for (; d < width; d += 16) {
        const __mmask16 m = tail_mask(width - d);
        const __m512 g = load16_masked(gate + d, m);
        store16_masked(o + d, silu_times(g, neg_exp(g), load16_masked(up + d, m), gate), m);
      }
    }
  });
}

#if defined(__AVX512VNNI__)
void store_kv_int8(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                   at::Tensor& k_scales, at::Tensor& v_scales, const at::Tensor& slot_mapping) {
  // key/value [T, Hkv, D] float32/bf16, rows may be strided; int8 pools as in paged_decode_attention_int8:
  // each head row quantized as Int8KV.store quantizes it (quantize_row), so the same bits
  check_int8_pool(k_cache, k_scales, "store_kv_int8");
  check_int8_pool(v_cache, v_scales, "store_kv_int8");
  const int64_t heads = key.size(1), head_dim = key.size(2);
  TORCH_CHECK(key.scalar_type() == value.scalar_type() && key.stride(2) == 1 && key.stride(1) == head_dim &&
              value.stride(2) == 1 && value.stride(1) == head_dim && k_cache.size(2) == heads &&
              k_cache.size(3) == head_dim);
  auto slots = checked_slots(slot_mapping, k_cache, "store_kv_int8");
  const int64_t* slot = slots.data_ptr<int64_t>();
  PINFER_DISPATCH(key.scalar_type(), "store_kv_int8", [&] {
    int8_t* k_rows = k_cache.data_ptr<int8_t>();
    int8_t* v_rows = v_cache.data_ptr<int8_t>();
    float* k_row_scales = k_scales.data_ptr<float>();
    float* v_row_scales = v_scales.data_ptr<float>();
    at::parallel_for(0, key.size(0), kStoreGrain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        if (t + kStoreAhead < end) {
          const int64_t ahead = slot[t + kStoreAhead] * heads;
          prefetch_for_write(k_rows + ahead * head_dim, heads * head_dim);
          prefetch_for_write(v_rows + ahead * head_dim, heads * head_dim);
          prefetch_for_write(k_row_scales + ahead, heads * 4);
          prefetch_for_write(v_row_scales + ahead, heads * 4);
        }
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t row = slot[t] * heads + h;
          k_row_scales[row] = quantize_row(key.data_ptr<scalar_t>() + t * key.stride(0) + h * head_dim, head_dim,
                                           k_rows + row * head_dim);
          v_row_scales[row] = quantize_row(value.data_ptr<scalar_t>() + t * value.stride(0) + h * head_dim, head_dim,
                                           v_rows + row * head_dim);
        }
      }
    });
  });
}
#endif

// ---- int8 linears (model/quantization.py's Int8Linear) ----------------------------------------
// w8a8 with per-row scales: x_scale = max|x_row| / 127, xq = round(x / x_scale) (half to even),
// y = float(sum xq * w) * x_scale * w_scale, rounded to x's dtype: the same ops in the same
// order as the PyTorch path (an int32 sum is exact), so the same bits.

template <typename T>
float quantize_row(const T* x, int64_t k_dim, int8_t* xq, int8_t offset) {
  __m512 mx = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_dim; k += 16)
    mx = _mm512_max_ps(mx, _mm512_abs_ps(load16_masked(x + k, tail_mask(k_dim - k))));
  const float x_scale = std::max(_mm512_reduce_max_ps(mx), 1e-12f) / 127.0f;
  const __m512 s = _mm512_set1_ps(x_scale);
  for (int64_t k = 0; k < k_dim; k += 16) {
    __mmask16 m = tail_mask(k_dim - k);
    __m512 q = _mm512_roundscale_ps(_mm512_div_ps(load16_masked(x + k, m), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m128i bytes = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(q));
    _mm_mask_storeu_epi8(xq + k, m, _mm_add_epi8(bytes, _mm_set1_epi8(offset)));  // + offset, mod 256
  }
  return x_scale;
}

at::Tensor dequantize_rows(const at::Tensor& acc, const at::Tensor& x_scale, const at::Tensor& w_scale,
                           at::ScalarType dtype) {
  // acc int32 [M, N] (torch._int_mm's result) -> float(acc) * x_scale[m] * w_scale[n], as dtype
  TORCH_CHECK(acc.is_contiguous() && acc.scalar_type() == at::kInt && w_scale.is_contiguous() &&
              w_scale.scalar_type() == at::kFloat && x_scale.scalar_type() == at::kFloat);
  const int64_t rows = acc.size(0), n_dim = acc.size(1);
  auto xs = x_scale.contiguous();
  auto out = at::empty({rows, n_dim}, acc.options().dtype(dtype));
  PINFER_DISPATCH(dtype, "dequantize_rows", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int32_t* a = acc.data_ptr<int32_t>() + r * n_dim;
        const __m512 s = _mm512_set1_ps(xs.data_ptr<float>()[r]);
        for (int64_t n = 0; n < n_dim; n += 16) {
          __mmask16 m = tail_mask(n_dim - n);
          __m512 v = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, a + n));
          v = _mm512_mul_ps(_mm512_mul_ps(v, s), _mm512_maskz_loadu_ps(m, w_scale.data_ptr<float>() + n));
          store16_masked(op + r * n_dim + n, v, m);
        }
      }
    });
  });
  return out;
}

// ---- GEMMs on weights packed for the dot-product instructions --------------------------------
// The weight is laid out [N / 16, K / P, 16, P]: P = 4 int8 (vpdpbusd) or 2 bf16 (vdpbf16ps)
// values of one column fill a 32-bit lane, so one 64-byte load is a "group" of P k's for 16
// columns. Each group is multiplied by the same 4 bytes of an input row broadcast to all
// lanes, and each lane accumulates one output: no horizontal sums. Register tile: up to 6
// rows x 4 blocks of 16 columns (24 accumulators), the epilogue (rescale, bias, rounding)
// after it. One kernel for every M: at batch 1 it streams the weight at the machine's read
// rate (4 streams); examples/kernel_microbench.py compares it with oneDNN.
constexpr int kGemmRows = 6, kGemmBlocks = 4;
constexpr int64_t kGemmPanelRows = 192;  // input rows per pass over a thread's weight columns (in L2)

// The tile's dot products, out of line and with its loops unrolled by pragma: else GCC 12
// spills most of the 24 accumulators to the stack inside the k loop (seen in objdump).
#define PINFER_UNROLL _Pragma("GCC unroll 8")
template <class Dot, int MR, int NR>
__attribute__((noinline)) void packed_dots(const uint8_t* x, int64_t x_stride, const uint8_t* w, int64_t groups,
                                           const uint8_t* prefetch, uint8_t* dots) {
  const int64_t block_bytes = groups * 64;
  typename Dot::Acc acc[MR][NR];
  PINFER_UNROLL for (int i = 0; i < MR; ++i)
    PINFER_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = Dot::zero();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i wv[NR];
    PINFER_UNROLL for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_si512(w + j * block_bytes + g * 64);
    if (prefetch != nullptr)
      PINFER_UNROLL for (int j = 0; j < NR; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(prefetch + j * block_bytes + g * 64), _MM_HINT_T1);
    PINFER_UNROLL for (int i = 0; i < MR; ++i) {
      int32_t four;
      std::memcpy(&four, x + i * x_stride + g * 4, 4);
      const __m512i xv = _mm512_set1_epi32(four);
      PINFER_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = Dot::dot(acc[i][j], xv, wv[j]);
    }
  }
  PINFER_UNROLL for (int i = 0; i < MR; ++i)
    PINFER_UNROLL for (int j = 0; j < NR; ++j) Dot::store(dots + (i * NR + j) * 64, acc[i][j]);
}

template <class Dot, int MR>
void packed_dots_rows(int nr, const uint8_t* x, int64_t x_stride, const uint8_t* w, int64_t groups,
                      const uint8_t* prefetch, uint8_t* dots) {
  switch (nr) {
    case 4: packed_dots<Dot, MR, 4>(x, x_stride, w, groups, prefetch, dots); break;
    case 3: packed_dots<Dot, MR, 3>(x, x_stride, w, groups, prefetch, dots); break;
    case 2: packed_dots<Dot, MR, 2>(x, x_stride, w, groups, prefetch, dots); break;
    default: packed_dots<Dot, MR, 1>(x, x_stride, w, groups, prefetch, dots); break;
  }
}

// The tile loop both GEMM kinds share: each thread takes a range of the N / 16 column blocks,
// and for each panel of input rows (kept in L2 across the thread's blocks) walks its blocks
// tile_blocks at a time and the panel tile_rows at a time; tile(row, rows, block, blocks,
// prefetch) computes one tile. prefetch: the next tile's columns (block_bytes each), handed to
// the first row-tile of each panel, which streams them into L2 while this tile's are in use
// (the weights come from memory at every step).
template <class Tile>
void gemm_tiles(int64_t m_dim, int64_t n_blocks, int tile_rows, int tile_blocks, const uint8_t* w,
                int64_t block_bytes, const Tile& tile) {
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < m_dim; m0 += kGemmPanelRows) {
      const int64_t m1 = std::min(m_dim, m0 + kGemmPanelRows);
      for (int64_t nb = begin; nb < end; nb += tile_blocks) {
        const int nr = static_cast<int>(std::min<int64_t>(tile_blocks, end - nb));
        const uint8_t* next_blocks = nb + tile_blocks < end ? w + (nb + tile_blocks) * block_bytes : nullptr;
        for (int64_t i = m0; i < m1; i += tile_rows) {
          const int mr = static_cast<int>(std::min<int64_t>(tile_rows, m1 - i));
          tile(i, mr, nb, nr, i == m0 ? next_blocks : nullptr);
        }
      }
    }
  });
}

// out rows x blocks tiles; epilogue(row, rows, block, blocks, dots) writes a tile's outputs from
// its dots, [rows][blocks][16] accumulators (int32 or float32) in 64-byte rows.
template <class Dot, class Epilogue>
void packed_gemm(const uint8_t* x, int64_t m_dim, int64_t x_stride, const uint8_t* w, int64_t n_blocks,
                 int64_t groups, const Epilogue& epilogue) {
  gemm_tiles(m_dim, n_blocks, kGemmRows, kGemmBlocks, w, groups * 64,
             [&](int64_t i, int mr, int64_t nb, int nr, const uint8_t* prefetch) {
               alignas(64) uint8_t dots[kGemmRows * kGemmBlocks * 64];
               const uint8_t* xi = x + i * x_stride;
               const uint8_t* wb = w + nb * groups * 64;
               switch (mr) {
                 case 6: packed_dots_rows<Dot, 6>(nr, xi, x_stride, wb, groups, prefetch, dots); break;
                 case 5: packed_dots_rows<Dot, 5>(nr, xi, x_stride, wb, groups, prefetch, dots); break;
                 case 4: packed_dots_rows<Dot, 4>(nr, xi, x_stride, wb, groups, prefetch, dots); break;
                 case 3: packed_dots_rows<Dot, 3>(nr, xi, x_stride, wb, groups, prefetch, dots); break;
                 case 2: packed_dots_rows<Dot, 2>(nr, xi, x_stride, wb, groups, prefetch, dots); break;
                 default: packed_dots_rows<Dot, 1>(nr, xi, x_stride, wb, groups, prefetch, dots); break;
               }
               epilogue(i, mr, nb, nr, dots);
             });
}

void check_packed(const at::Tensor& x, const at::Tensor& packed, int64_t per_lane, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && packed.is_contiguous() && packed.dim() == 4, name,
              ": x [M, K] contiguous, weight packed [N / 16, K / P, 16, P]");
  TORCH_CHECK(packed.size(1) * per_lane == x.size(1) && packed.size(2) == 16 && packed.size(3) == per_lane, name,
              ": weight packed for K = ", packed.size(1) * per_lane, ", input has K = ", x.size(1));
}

// ---- the same GEMMs on AMX tiles (Sapphire Rapids and later) ---------------------------------
// Eight tile registers of 16 rows x 64 bytes. One TDPBUSD (int8) or TDPBF16PS (bf16) multiplies
// a tile of 16 input rows x 64 bytes of k (64 int8 / 32 bf16 values) by a tile of the packed
// weight, and the packing above is already that instruction's second operand: 16 groups of P
// k's for 16 columns are 1,024 contiguous bytes, so no repacking. Register tile: 2 x 16 rows x
// 2 blocks of 16 columns (4 accumulator tiles, 2 input, 2 weight), blocked by amx_gemm below,
// and the AVX-512 kernel's epilogues. The sums are the same (exact int32 for int8; bf16
// products summed in float32, in another order than vdpbf16ps's). Input rows are padded to a
// multiple of 16 (the pad rows' outputs are dropped). Used from 16 rows for int8 and 8 for bf16
// (examples/kernel_microbench.py's crossovers): below, the weights' read rate bounds both
// kernels and the AVX-512 one needs no padding.
int64_t amx_padded_rows(int64_t m_dim) { return (m_dim + 15) / 16 * 16; }

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__) && defined(__linux__)
#define PINFER_AMX 1
constexpr int kAmxTileRows = 32, kAmxTileBlocks = 2;
constexpr int64_t kAmxChunkBytes = 64, kAmxWeightTileBytes = 16 * 64;

std::atomic<bool> amx_allowed{true};

// Linux hands a process the AMX register state only on request (ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA, which oneDNN makes too); without it the first tile instruction faults.
bool amx_ready() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return granted && amx_allowed.load(std::memory_order_relaxed);
}

bool amx_fits(int64_t m_dim, int64_t k_bytes, int64_t min_rows) {
  return m_dim >= min_rows && k_bytes % kAmxChunkBytes == 0 && amx_ready();
}

// every tile 16 rows x 64 bytes (palette 1); set on each thread before its tiles, released
// after (the configuration is per thread, and oneDNN's kernels change it between our calls)
struct AmxThreadScope {
  AmxThreadScope() {
    alignas(64) uint8_t config[64] = {};
    config[0] = 1;
    for (int t = 0; t < 8; ++t) {
      config[16 + 2 * t] = 64;  // bytes per row
      config[48 + t] = 16;      // rows
    }
    _tile_loadconfig(config);
  }
  ~AmxThreadScope() { _tile_release(); }
};

struct AmxInt8 {};
struct AmxBf16 {};
// GCC's tile intrinsics paste their operands into the instruction text: literal numbers only
#define PINFER_TILE_DOT(KIND, C, A, B)                   \
  if constexpr (std::is_same_v<KIND, AmxInt8>) {        \
    _tile_dpbusd(C, A, B);                               \
  } else {                                               \
    _tile_dpbf16ps(C, A, B);                             \
  }

// tiles 0-3 accumulate (row tile i, block j) at 2i + j, 4-5 hold input rows, 6-7 weight blocks;
// resume: start from the sums in acc (an earlier part of k) instead of zero. acc: the tile's
// sums, [rows][NT blocks][64 bytes] (the epilogue's layout).
template <class Kind, int MT, int NT>
__attribute__((noinline)) void amx_dots(const uint8_t* x, int64_t x_stride, const uint8_t* w, int64_t block_bytes,
                                        int64_t chunks, const uint8_t* prefetch, bool resume, uint8_t* acc) {
  const int64_t row_bytes = NT * 64, second = 16 * row_bytes;
  if (resume) {
    _tile_loadd(0, acc, row_bytes);
    if constexpr (NT > 1) _tile_loadd(1, acc + 64, row_bytes);
    if constexpr (MT > 1) _tile_loadd(2, acc + second, row_bytes);
    if constexpr (MT > 1 && NT > 1) _tile_loadd(3, acc + second + 64, row_bytes);
  } else {
    _tile_zero(0);
    if constexpr (NT > 1) _tile_zero(1);
    if constexpr (MT > 1) _tile_zero(2);
    if constexpr (MT > 1 && NT > 1) _tile_zero(3);
  }
  // each load just before the first dot that reads it (an ad-hoc standalone loop with the rows
  // in L2: 9.2 ns a dot vs 10.1 with all four loads first)
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(4, x + c * kAmxChunkBytes, x_stride);
    _tile_loadd(6, w + c * kAmxWeightTileBytes, 64);
    PINFER_TILE_DOT(Kind, 0, 4, 6)
    if constexpr (NT > 1) {
      _tile_loadd(7, w + block_bytes + c * kAmxWeightTileBytes, 64);
      PINFER_TILE_DOT(Kind, 1, 4, 7)
    }
    if constexpr (MT > 1) {
      _tile_loadd(5, x + 16 * x_stride + c * kAmxChunkBytes, x_stride);
      PINFER_TILE_DOT(Kind, 2, 5, 6)
    }
    if constexpr (MT > 1 && NT > 1) { PINFER_TILE_DOT(Kind, 3, 5, 7) }
    if (prefetch != nullptr)
      for (int j = 0; j < NT; ++j)
        for (int64_t line = 0; line < kAmxWeightTileBytes; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(prefetch + j * block_bytes + c * kAmxWeightTileBytes + line),
                       _MM_HINT_T1);
  }
  _tile_stored(0, acc, row_bytes);
  if constexpr (NT > 1) _tile_stored(1, acc + 64, row_bytes);
  if constexpr (MT > 1) _tile_stored(2, acc + second, row_bytes);
  if constexpr (MT > 1 && NT > 1) _tile_stored(3, acc + second + 64, row_bytes);
}

// amx_gemm's blocking. Decode (up to kAmxPanelRows rows): each thread's column pairs in turn,
// every pair's weights over the whole of k, from memory once, with the next pair's prefetched
// into L2. Prefill (more rows): the rows go in panels of kAmxPanelRows, and k in passes of
// kAmxPassBytes of the panel's rows (24 KB: in L1 with a pair's weights for the pass beside
// them), each tile's sums stored between passes; a thread's columns go in groups of
// kAmxGroupBytes of weights (in L2 across the panels). Without the passes every tile load came
// from L2 (a 32 x 32 tile reads 36 KB of rows and 36 KB of weights at K = 576, more than L1's
// 48 KB). The 120 layer matrices at 1,500 rows: 209-223 ms vs 236-241 before (1,002 rows: 139-143
// vs 160-170; ad-hoc, one process each, alternated). At 64 rows the passes cost 6-12%, so decode
// keeps one pass, and so does a panel whose rows fit L1 whole (int8 at K = 576).
constexpr int64_t kAmxPanelRows = 64;
constexpr int64_t kAmxPassBytes = 24 << 10;
constexpr int64_t kAmxL1Bytes = 48 << 10;
constexpr int64_t kAmxGroupBytes = 768 << 10;

// packed_gemm on tiles; x has rows up to the next multiple of 16 (readable, any values)
template <class Kind, class Epilogue>
void amx_gemm(const uint8_t* x, int64_t m_dim, int64_t x_stride, const uint8_t* w, int64_t n_blocks,
              int64_t chunks, const Epilogue& epilogue) {
  constexpr int64_t kTileSums = kAmxTileRows * kAmxTileBlocks * 64;
  const int64_t block_bytes = chunks * kAmxWeightTileBytes;
  const int64_t panel = std::min(amx_padded_rows(m_dim), kAmxPanelRows);
  const bool one_pass = m_dim <= panel || panel * chunks * kAmxChunkBytes <= kAmxL1Bytes;
  const int64_t pass_chunks =
      one_pass ? chunks : std::clamp<int64_t>(kAmxPassBytes / (panel * kAmxChunkBytes), 1, chunks);
  const int64_t passes = (chunks + pass_chunks - 1) / pass_chunks;
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    AmxThreadScope scope;
    const int64_t group = std::min(std::max<int64_t>(2, kAmxGroupBytes / block_bytes / 2 * 2), end - begin);
    const int64_t pairs = (group + 1) / 2, row_tiles = (panel + kAmxTileRows - 1) / kAmxTileRows;
    // each (row tile, pair) tile's sums between passes, in the epilogue's layout
    thread_local std::vector<uint8_t> storage;
    storage.resize(row_tiles * pairs * kTileSums + 64);
    uint8_t* sums = storage.data() + (-reinterpret_cast<uintptr_t>(storage.data()) & 63);
    for (int64_t g0 = begin; g0 < end; g0 += group) {
      const int64_t g1 = std::min(end, g0 + group), g_pairs = (g1 - g0 + 1) / 2;
      for (int64_t m0 = 0; m0 < m_dim; m0 += panel) {
        const int64_t m1 = std::min(m_dim, m0 + panel);
        for (int64_t pass = 0; pass < passes; ++pass) {
          const int64_t c0 = pass * pass_chunks, n_c = std::min(pass_chunks, chunks - c0);
          for (int64_t p = 0; p < g_pairs; ++p) {
            const int64_t nb = g0 + 2 * p;
            const int nr = static_cast<int>(std::min<int64_t>(2, g1 - nb));
            // the next pair's weights for this pass (or the next pass's first, or, after the
            // last panel, the next group's first), streamed into L2 during the first row tile
            const uint8_t* next = nullptr;
            if (p + 1 < g_pairs) next = w + (nb + 2) * block_bytes + c0 * kAmxWeightTileBytes;
            else if (pass + 1 < passes) next = w + g0 * block_bytes + (c0 + n_c) * kAmxWeightTileBytes;
            else if (m1 == m_dim && g1 < end) next = w + g1 * block_bytes;
            for (int64_t i = m0; i < m1; i += kAmxTileRows) {
              const int mr = static_cast<int>(std::min<int64_t>(kAmxTileRows, m1 - i));
              uint8_t* acc = sums + (((i - m0) / kAmxTileRows) * pairs + p) * kTileSums;
              const uint8_t* xi = x + i * x_stride + c0 * kAmxChunkBytes;
              const uint8_t* wb = w + nb * block_bytes + c0 * kAmxWeightTileBytes;
              const uint8_t* prefetch = i == m0 ? next : nullptr;
              const bool resume = pass > 0;
              if (mr > 16) {
                if (nr > 1) amx_dots<Kind, 2, 2>(xi, x_stride, wb, block_bytes, n_c, prefetch, resume, acc);
                else amx_dots<Kind, 2, 1>(xi, x_stride, wb, block_bytes, n_c, prefetch, resume, acc);
              } else {
                if (nr > 1) amx_dots<Kind, 1, 2>(xi, x_stride, wb, block_bytes, n_c, prefetch, resume, acc);
                else amx_dots<Kind, 1, 1>(xi, x_stride, wb, block_bytes, n_c, prefetch, resume, acc);
              }
              if (pass + 1 == passes) epilogue(i, mr, nb, nr, acc);
            }
          }
        }
      }
    }
  });
}

#else
#define PINFER_AMX 0
bool amx_fits(int64_t, int64_t, int64_t) { return false; }
#endif

// Whether the GEMMs may use AMX (tests compare both paths); returns whether they can now.
bool use_amx(bool allow) {
#if PINFER_AMX
  amx_allowed = allow;
  return amx_ready();
#else
  return false;
#endif
}

#if defined(__AVX512VNNI__)
// int8: vpdpbusd multiplies unsigned by signed bytes, so the input goes in as xq + 128 and
// 128 * sum(w) comes off (Int8Linear.qweight_sums) before the rescale.
struct Int8Dot {
  using Acc = __m512i;
  static Acc zero() { return _mm512_setzero_si512(); }
  static Acc dot(Acc acc, __m512i x, __m512i w) { return _mm512_dpbusd_epi32(acc, x, w); }
  static void store(uint8_t* p, Acc acc) { _mm512_store_si512(p, acc); }
};

// xq + 128 as unsigned bytes (vpdpbusd's unsigned operand), in the same pass as the rounding
template <typename T>
float quantize_row_unsigned(const T* x, int64_t k_dim, uint8_t* xu) {
  return quantize_row(x, k_dim, reinterpret_cast<int8_t*>(xu), static_cast<int8_t>(-128));
}

at::Tensor int8_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_sums,
                     const at::Tensor& w_scale) {
  // x [M, K]; packed int8 [N / 16, K / 4, 16, 4]; w_sums int32 [N] = sum over k; w_scale float32 [N]
  check_packed(x, packed, 4, "int8_gemm");
  const int64_t m_dim = x.size(0), k_dim = x.size(1), n_blocks = packed.size(0), n_dim = n_blocks * 16;
  TORCH_CHECK(packed.scalar_type() == at::kChar && w_sums.numel() == n_dim && w_scale.numel() == n_dim &&
              w_scale.scalar_type() == at::kFloat);
  const bool amx = amx_fits(m_dim, k_dim, 16);
  const int64_t x_rows = amx ? amx_padded_rows(m_dim) : m_dim;
  auto xu = at::empty({x_rows, k_dim}, x.options().dtype(at::kByte));
  if (x_rows > m_dim) xu.narrow(0, m_dim, x_rows - m_dim).zero_();
  auto x_scale = at::empty({m_dim}, x.options().dtype(at::kFloat));
  auto out = at::empty({m_dim, n_dim}, x.options());
  PINFER_DISPATCH(x.scalar_type(), "int8_gemm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    uint8_t* xup = xu.data_ptr<uint8_t>();
    float* xs = x_scale.data_ptr<float>();
    at::parallel_for(0, m_dim, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        xs[r] = quantize_row_unsigned(xp + r * k_dim, k_dim, xup + r * k_dim);
    });
    const int32_t* sums = w_sums.data_ptr<int32_t>();
    const float* ws = w_scale.data_ptr<float>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // the PyTorch path's float(exact) * x_scale * w_scale, in that order
    auto epilogue = [&](int64_t row, int rows, int64_t block, int blocks, const uint8_t* dots) {
      for (int j = 0; j < blocks; ++j) {
        const int64_t n = (block + j) * 16;
        const __m512i offset = _mm512_slli_epi32(_mm512_loadu_si512(sums + n), 7);  // 128 * sum(w)
        const __m512 w_s = _mm512_loadu_ps(ws + n);
        for (int i = 0; i < rows; ++i) {
          const __m512i dot = _mm512_load_si512(dots + (i * blocks + j) * 64);
          const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot, offset));
          store16(op + (row + i) * n_dim + n, _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(xs[row + i])), w_s));
        }
      }
    };
    const uint8_t* w = reinterpret_cast<const uint8_t*>(packed.data_ptr<int8_t>());
#if PINFER_AMX
    if (amx) {
      amx_gemm<AmxInt8>(xup, m_dim, k_dim, w, n_blocks, k_dim / kAmxChunkBytes, epilogue);
      return;
    }
#endif
    packed_gemm<Int8Dot>(xup, m_dim, k_dim, w, n_blocks, k_dim / 4, epilogue);
  });
  return out;
}
#endif

#if defined(__AVX512VNNI__)
// ---- int4 weights x int8 activations (W4A8) ---------------------------------------------------
// What llama.cpp does for Q4_1 x Q8: w = q * s + z per group of 32 k's (q 0..15), the input
// row quantized to int8 (quantize_row, one scale per row), and per group
//   sum_k x w = x_scale * (s * sum_k xq q + z * sum_k xq),
// the first sum exact in int32 by vpdpbusd (the nibbles, unsigned, times the bytes of xq). The
// weight is laid out [N/16, K/32, 5, 64 bytes]: per 16 columns and group, four 64-byte loads
// of nibbles, lane j holding column j's 8 k's 8v..8v+7 (low nibbles 8v..8v+3, high 8v+4..8v+7),
// then the group's s and z as bf16, 16 of each; one stream, 0.625 bytes a weight.
constexpr int64_t kInt4Group = 32, kInt4GroupBytes = 5 * 64;

template <int MR, int NR, typename T>
__attribute__((noinline)) void int4_tile(const int8_t* xq, int64_t k_dim, const int32_t* xsums, const float* xs,
                                         const uint8_t* w, int64_t groups, int64_t block_stride,
                                         const uint8_t* prefetch, T* out, int64_t out_stride) {
  __m512 acc[MR][NR];
  PINFER_UNROLL for (int i = 0; i < MR; ++i)
    PINFER_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < groups; ++g) {
    __m512i dots[MR][NR];
    PINFER_UNROLL for (int i = 0; i < MR; ++i)
      PINFER_UNROLL for (int j = 0; j < NR; ++j) dots[i][j] = _mm512_setzero_si512();
    if (prefetch != nullptr)
      PINFER_UNROLL for (int j = 0; j < NR; ++j)
        PINFER_UNROLL for (int c = 0; c < 5; ++c)
          _mm_prefetch(reinterpret_cast<const char*>(prefetch + j * block_stride + g * kInt4GroupBytes + c * 64),
                       _MM_HINT_T1);
    PINFER_UNROLL for (int v = 0; v < 4; ++v) {
      __m512i lo[NR], hi[NR];
      PINFER_UNROLL for (int j = 0; j < NR; ++j) {
        const __m512i packed = _mm512_loadu_si512(w + j * block_stride + g * kInt4GroupBytes + v * 64);
        lo[j] = _mm512_and_si512(packed, low4);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low4);
      }
      PINFER_UNROLL for (int i = 0; i < MR; ++i) {
        int32_t first, second;
        std::memcpy(&first, xq + i * k_dim + g * kInt4Group + v * 8, 4);
        std::memcpy(&second, xq + i * k_dim + g * kInt4Group + v * 8 + 4, 4);
        const __m512i x0 = _mm512_set1_epi32(first), x1 = _mm512_set1_epi32(second);
        PINFER_UNROLL for (int j = 0; j < NR; ++j)
          dots[i][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dots[i][j], lo[j], x0), hi[j], x1);
      }
    }
    PINFER_UNROLL for (int j = 0; j < NR; ++j) {
      const uint8_t* sz = w + j * block_stride + g * kInt4GroupBytes + 4 * 64;
      const __m512 s = load16(reinterpret_cast<const bf16*>(sz)), z = load16(reinterpret_cast<const bf16*>(sz) + 16);
      PINFER_UNROLL for (int i = 0; i < MR; ++i) {
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[i][j]), s, acc[i][j]);
        acc[i][j] = _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(xsums[i * groups + g])), z, acc[i][j]);
      }
    }
  }
  PINFER_UNROLL for (int i = 0; i < MR; ++i)
    PINFER_UNROLL for (int j = 0; j < NR; ++j)
      store16(out + i * out_stride + j * 16, _mm512_mul_ps(acc[i][j], _mm512_set1_ps(xs[i])));
}

template <int MR, typename T>
void int4_tile_rows(int nr, const int8_t* xq, int64_t k_dim, const int32_t* xsums, const float* xs, const uint8_t* w,
                    int64_t groups, int64_t block_stride, const uint8_t* prefetch, T* out, int64_t out_stride) {
  switch (nr) {
    case 4: int4_tile<MR, 4>(xq, k_dim, xsums, xs, w, groups, block_stride, prefetch, out, out_stride); break;
    case 3: int4_tile<MR, 3>(xq, k_dim, xsums, xs, w, groups, block_stride, prefetch, out, out_stride); break;
    case 2: int4_tile<MR, 2>(xq, k_dim, xsums, xs, w, groups, block_stride, prefetch, out, out_stride); break;
    default: int4_tile<MR, 1>(xq, k_dim, xsums, xs, w, groups, block_stride, prefetch, out, out_stride); break;
  }
}

at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& packed) {
  // x [M, K] float32/bf16; packed uint8 [N / 16, K / 32, 5, 64] (model/quantization.py pack_int4)
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && packed.is_contiguous() && packed.dim() == 4 &&
                  packed.scalar_type() == at::kByte && packed.size(2) == 5 && packed.size(3) == 64,
              "int4_gemm: x [M, K] contiguous, weight packed uint8 [N / 16, K / 32, 5, 64]");
  const int64_t m_dim = x.size(0), k_dim = x.size(1), n_blocks = packed.size(0), n_dim = n_blocks * 16;
  const int64_t groups = packed.size(1);
  TORCH_CHECK(groups * kInt4Group == k_dim, "int4_gemm: weight packed for K = ", groups * kInt4Group,
              ", input has K = ", k_dim);
  auto xq = at::empty({m_dim, k_dim}, x.options().dtype(at::kChar));
  auto xsums = at::empty({m_dim, groups}, x.options().dtype(at::kInt));
  auto x_scale = at::empty({m_dim}, x.options().dtype(at::kFloat));
  auto out = at::empty({m_dim, n_dim}, x.options());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const int64_t block_stride = groups * kInt4GroupBytes;
  // Rows share each unpacked weight vector. Tiles that fit the 32 registers (float and int32
  // accumulators, unpacked nibbles): 1-2 rows x 4 blocks of 16 columns (batch 1: four weight
  // streams), else 4 rows x 2 blocks.
  const int rows_per_tile = m_dim <= 2 ? static_cast<int>(m_dim) : 4, blocks_per_tile = m_dim <= 2 ? 4 : 2;
  PINFER_DISPATCH(x.scalar_type(), "int4_gemm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    int8_t* xqp = xq.data_ptr<int8_t>();
    int32_t* sums = xsums.data_ptr<int32_t>();
    float* xs = x_scale.data_ptr<float>();
    at::parallel_for(0, m_dim, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        xs[r] = quantize_row(xp + r * k_dim, k_dim, xqp + r * k_dim);
        for (int64_t g = 0; g < groups; ++g) {
          int32_t sum = 0;
          for (int64_t k = 0; k < kInt4Group; ++k) sum += xqp[r * k_dim + g * kInt4Group + k];
          sums[r * groups + g] = sum;
        }
      }
    });
    scalar_t* op = out.data_ptr<scalar_t>();
    gemm_tiles(m_dim, n_blocks, rows_per_tile, blocks_per_tile, w, block_stride,
               [&](int64_t i, int mr, int64_t nb, int nr, const uint8_t* prefetch) {
                 const int8_t* xi = xqp + i * k_dim;
                 const int32_t* si = sums + i * groups;
                 const uint8_t* wb = w + nb * block_stride;
                 scalar_t* oi = op + i * n_dim + nb * 16;
                 switch (mr) {
                   case 4: int4_tile_rows<4>(nr, xi, k_dim, si, xs + i, wb, groups, block_stride, prefetch, oi, n_dim); break;
                   case 3: int4_tile_rows<3>(nr, xi, k_dim, si, xs + i, wb, groups, block_stride, prefetch, oi, n_dim); break;
                   case 2: int4_tile_rows<2>(nr, xi, k_dim, si, xs + i, wb, groups, block_stride, prefetch, oi, n_dim); break;
                   default: int4_tile_rows<1>(nr, xi, k_dim, si, xs + i, wb, groups, block_stride, prefetch, oi, n_dim); break;
                 }
               });
  });
  return out;
}
#endif

#if defined(__AVX512BF16__)
// bf16: float32 accumulators, + bias, rounded to bf16 once (model/packed_linear.py's PackedLinear).
struct Bf16Dot {
  using Acc = __m512;
  static Acc zero() { return _mm512_setzero_ps(); }
  static Acc dot(Acc acc, __m512i x, __m512i w) { return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w); }
  static void store(uint8_t* p, Acc acc) { _mm512_store_ps(reinterpret_cast<float*>(p), acc); }
};

at::Tensor bf16_gemm(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  // x bf16 [M, K]; packed bf16 [N / 16, K / 2, 16, 2]; bias [N] (any float dtype) or None
  check_packed(x, packed, 2, "bf16_gemm");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16, "bf16_gemm: bfloat16 only");
  const int64_t m_dim = x.size(0), k_dim = x.size(1), n_blocks = packed.size(0), n_dim = n_blocks * 16;
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n_dim, "bf16_gemm: bias has ", bias->numel(), " values for ", n_dim, " outputs");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto out = at::empty({m_dim, n_dim}, x.options());
  bf16* op = out.data_ptr<bf16>();
  auto epilogue = [&](int64_t row, int rows, int64_t block, int blocks, const uint8_t* dots) {
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < blocks; ++j) {
        const int64_t n = (block + j) * 16;
        __m512 v = _mm512_load_ps(reinterpret_cast<const float*>(dots + (i * blocks + j) * 64));
        if (bp != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(bp + n));
        store16(op + (row + i) * n_dim + n, v);
      }
  };
  const uint8_t* w = reinterpret_cast<const uint8_t*>(packed.data_ptr<bf16>());
#if PINFER_AMX
  if (amx_fits(m_dim, k_dim * 2, 8)) {
    at::Tensor rows = x;
    if (amx_padded_rows(m_dim) > m_dim) {
      rows = at::zeros({amx_padded_rows(m_dim), k_dim}, x.options());
      rows.narrow(0, 0, m_dim).copy_(x);
    }
    amx_gemm<AmxBf16>(reinterpret_cast<const uint8_t*>(rows.data_ptr<bf16>()), m_dim, k_dim * 2, w, n_blocks,
                      k_dim * 2 / kAmxChunkBytes, epilogue);
    return out;
  }
#endif
  packed_gemm<Bf16Dot>(reinterpret_cast<const uint8_t*>(x.data_ptr<bf16>()), m_dim, k_dim * 2, w, n_blocks,
                       k_dim / 2, epilogue);
  return out;
}
#endif

// ---- paged prefill attention (bf16) ----------------------------------------------------------
// One sequence's new tokens against its whole context (cached prefix + themselves), causal,
// flash-style: blocks of 16 query rows x 16 keys, online softmax in float32. Q.K^T runs on
// vdpbf16ps with keys as the 16 lanes, so no horizontal sums: the keys of each kv head are
// first copied from the pages into [D/2, keys, 2] (pairs of dims, the instruction's layout),
// the values into [keys, D]. examples/kernel_microbench.py compares it with SDPA (flash, is_causal).

#if defined(__AVX512BF16__)
// o = o * alpha + sum_j p[j] * v[j] for n <= 16 value rows of CHUNKS * 16 dims
template <int CHUNKS>
inline void add_weighted_values(float* o, float alpha, const float* p, const bf16* v, int64_t n) {
  __m512 acc[CHUNKS];
  for (int c = 0; c < CHUNKS; ++c) acc[c] = _mm512_mul_ps(_mm512_loadu_ps(o + c * 16), _mm512_set1_ps(alpha));
  for (int64_t j = 0; j < n; ++j) {
    const __m512 pj = _mm512_set1_ps(p[j]);
    for (int c = 0; c < CHUNKS; ++c) acc[c] = _mm512_fmadd_ps(pj, load16(v + j * CHUNKS * 16 + c * 16), acc[c]);
  }
  for (int c = 0; c < CHUNKS; ++c) _mm512_storeu_ps(o + c * 16, acc[c]);
}

// One sequence's prefill, in two phases a caller runs on one thread or spreads over threads:
// gather (the context's keys and values copied out of the pages, by position) and items (one
// head x 16 query rows each).
struct PrefillSeq {
  const bf16* q;  // the sequence's first query row
  int64_t q_stride;
  const bf16 *k_cache, *v_cache;
  const int64_t* table;
  int64_t q_len, context_len, num_heads, num_kv_heads, head_dim, block_size;
  float scale;
  bf16* out;  // [q_len, num_heads, head_dim]
  int64_t group, pairs, chunks, keys, token_stride, page_stride, first_pos, row_blocks;
  std::vector<uint32_t>& k_pairs;  // [Hkv, D/2, keys]: bf16 pairs as 32-bit words
  std::vector<bf16>& values;  // [Hkv, keys, D]

  PrefillSeq(const bf16* q_, int64_t q_stride_, const bf16* k, const bf16* v, const int64_t* table_, int64_t q_len_,
             int64_t context_len_, int64_t heads, int64_t kv_heads, int64_t dim, int64_t bs, float scale_, bf16* out_,
             std::vector<uint32_t>& k_scratch, std::vector<bf16>& v_scratch)
      : q(q_), q_stride(q_stride_), k_cache(k), v_cache(v), table(table_), q_len(q_len_), context_len(context_len_),
        num_heads(heads), num_kv_heads(kv_heads), head_dim(dim), block_size(bs), scale(scale_), out(out_),
        k_pairs(k_scratch), values(v_scratch) {
    group = num_heads / num_kv_heads, pairs = head_dim / 2, chunks = head_dim / 16;
    keys = (context_len + 15) / 16 * 16;  // padded to whole key blocks (masked)
    token_stride = num_kv_heads * head_dim, page_stride = block_size * token_stride;
    first_pos = context_len - q_len;  // position of query row 0
    row_blocks = (q_len + 15) / 16;
    k_pairs.assign(num_kv_heads * pairs * keys, 0);
    values.assign(num_kv_heads * keys * head_dim, bf16(0.0f));
  }
  int64_t num_items() const { return num_heads * row_blocks; }

  void gather(int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t offset = table[t / block_size] * page_stride + (t % block_size) * token_stride;
      const uint32_t* kt = reinterpret_cast<const uint32_t*>(k_cache + offset);
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        for (int64_t p = 0; p < pairs; ++p) k_pairs[(h * pairs + p) * keys + t] = kt[h * pairs + p];
        std::memcpy(values.data() + (h * keys + t) * head_dim, v_cache + offset + h * head_dim, head_dim * sizeof(bf16));
      }
    }
  }

  void items(int64_t begin, int64_t end) {
    std::vector<float> o(16 * head_dim);
    float m[16], l[16], alpha[16], p[16][16];
    for (int64_t item = begin; item < end; ++item) {
      // Causal: row block rb costs ~rb + 1 key blocks. Items alternate the first and the last
      // row blocks (0, R-1, 1, R-2, ...), so the contiguous ranges the threads get cost the same.
      const int64_t h = item % num_heads, i = item / num_heads;
      const int64_t rb = i % 2 == 0 ? i / 2 : row_blocks - 1 - i / 2;
      const int64_t kv = h / group, r0 = rb * 16, rows = std::min<int64_t>(16, q_len - r0);
      const uint32_t* kh = k_pairs.data() + kv * pairs * keys;
      const bf16* vh = values.data() + kv * keys * head_dim;
      std::fill(o.begin(), o.end(), 0.0f);
      for (int64_t r = 0; r < rows; ++r) m[r] = -INFINITY, l[r] = 0.0f;
      const int64_t last_key = first_pos + r0 + rows - 1;  // the block's last row sees keys <= this
      for (int64_t k0 = 0; k0 <= last_key; k0 += 16) {
        // Three passes over the block's rows, so that the rows' independent work overlaps:
        // scores, then the online-softmax update, then P.V.
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t pos = first_pos + r0 + r;
          if (k0 > pos) continue;  // a key block past this row's position (later rows see more)
          const uint32_t* qr = reinterpret_cast<const uint32_t*>(q + (r0 + r) * q_stride + h * head_dim);
          // four independent sums, or each vdpbf16ps waits for the one before it
          __m512 part[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
          for (int64_t d = 0; d < pairs; d += 4)
            for (int u = 0; u < 4; ++u)
              part[u] = _mm512_dpbf16_ps(part[u], (__m512bh)_mm512_loadu_si512(kh + (d + u) * keys + k0),
                                         (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(qr[d + u])));
          __m512 sc = _mm512_add_ps(_mm512_add_ps(part[0], part[1]), _mm512_add_ps(part[2], part[3]));
          _mm512_storeu_ps(p[r], _mm512_mul_ps(sc, _mm512_set1_ps(scale)));
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t pos = first_pos + r0 + r;
          if (k0 > pos) { alpha[r] = 1.0f; continue; }
          const __mmask16 visible = tail_mask(pos - k0 + 1);  // keys k0 .. pos
          const __m512 sc = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), visible, p[r]);
          const float m_new = std::max(m[r], _mm512_reduce_max_ps(sc));
          // exp(m_old - m_new), ~0 on the first block (m_old = -inf: exp_nonpositive clamps to e^-87)
          alpha[r] = _mm512_cvtss_f32(exp_nonpositive(_mm512_set1_ps(m[r] - m_new)));
          const __m512 e = _mm512_maskz_mov_ps(visible, exp_nonpositive(_mm512_sub_ps(sc, _mm512_set1_ps(m_new))));
          l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(e);
          m[r] = m_new;
          _mm512_storeu_ps(p[r], e);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t pos = first_pos + r0 + r;
          if (k0 > pos) continue;
          const int64_t n = std::min<int64_t>(16, pos - k0 + 1);
          float* orow = o.data() + r * head_dim;
          switch (chunks) {  // the accumulators in registers need a compile-time count
            case 4: add_weighted_values<4>(orow, alpha[r], p[r], vh + k0 * head_dim, n); break;
            case 8: add_weighted_values<8>(orow, alpha[r], p[r], vh + k0 * head_dim, n); break;
            default: add_weighted_values<16>(orow, alpha[r], p[r], vh + k0 * head_dim, n); break;
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
        for (int64_t c = 0; c < chunks; ++c)
          store16(out + ((r0 + r) * num_heads + h) * head_dim + c * 16, _mm512_mul_ps(load16(o.data() + r * head_dim + c * 16), inv));
      }
    }
  }
};

// One sequence, both phases spread over the threads: a long prompt's TTFT.
void prefill_attention_bf16(const bf16* q, int64_t q_stride, const bf16* k_cache, const bf16* v_cache,
                            const int64_t* table, int64_t q_len, int64_t context_len, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, bf16* out) {
  std::vector<uint32_t> k_pairs;
  std::vector<bf16> values;
  PrefillSeq seq(q, q_stride, k_cache, v_cache, table, q_len, context_len, num_heads, num_kv_heads, head_dim,
                 block_size, scale, out, k_pairs, values);
  at::parallel_for(0, context_len, 64, [&](int64_t begin, int64_t end) { seq.gather(begin, end); });
  at::parallel_for(0, seq.num_items(), 1, [&](int64_t begin, int64_t end) { seq.items(begin, end); });
}

at::Tensor paged_prefill_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_table, int64_t context_len, double scale) {
  // query [Lq, H, D] bf16 (rows may be strided); caches [num_blocks, block_size, Hkv, D]; block_table [max_blocks]
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16);
  const int64_t head_dim = query.size(2);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && (head_dim == 64 || head_dim == 128 || head_dim == 256),
              "paged_prefill_attention: head_dim 64, 128 or 256");
  auto q = query.stride(2) == 1 && query.stride(1) == query.size(2) ? query : query.contiguous();
  auto table = block_table.contiguous();
  TORCH_CHECK(table.scalar_type() == at::kLong && context_len >= q.size(0));
  TORCH_CHECK(table.numel() * k_cache.size(1) >= context_len, "block table shorter than the context");
  auto out = at::empty(q.sizes(), q.options());
  prefill_attention_bf16(q.data_ptr<bf16>(), q.stride(0), k_cache.data_ptr<bf16>(), v_cache.data_ptr<bf16>(),
                         table.data_ptr<int64_t>(), q.size(0), context_len, q.size(1), k_cache.size(2), q.size(2),
                         k_cache.size(1), static_cast<float>(scale), out.data_ptr<bf16>());
  return out;
}

// A step's prefill sequences in one call: with at least two per thread, each thread takes whole
// sequences (contiguous ranges of about equal work, q_len x context_len), so one parallel region
// replaces two per sequence and the per-sequence calls from Python (~45 sequences x 30 layers
// in the rollout's first step); with fewer, each sequence spreads over the threads as above.
// The same arithmetic per sequence either way, so the same bits.
// seqs [B, 4] int64: (row of block_tables, first query row, q_len, context_len); out [T, H, D]
// receives the sequences' rows, the others left as they are.
void paged_prefill_attention_batch(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_tables, const at::Tensor& seqs, double scale,
                                   at::Tensor& out) {
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
              out.scalar_type() == at::kBFloat16);
  const int64_t head_dim = query.size(2), num_heads = query.size(1);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && (head_dim == 64 || head_dim == 128 || head_dim == 256),
              "paged_prefill_attention_batch: head_dim 64, 128 or 256");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == query.sizes(), "paged_prefill_attention_batch: out [T, H, D]");
  auto q = query.stride(2) == 1 && query.stride(1) == head_dim ? query : query.contiguous();
  auto tables = block_tables.contiguous();
  auto info = seqs.contiguous();
  TORCH_CHECK(tables.scalar_type() == at::kLong && info.scalar_type() == at::kLong && info.dim() == 2 &&
              info.size(1) == 4, "paged_prefill_attention_batch: int64 block_tables and seqs [B, 4]");
  const int64_t count = info.size(0), max_blocks = tables.size(1), block_size = k_cache.size(1);
  const int64_t* s = info.data_ptr<int64_t>();
  check_prefill_seqs(s, count, tables, q.size(0), block_size);
  const bf16* qp = q.data_ptr<bf16>();
  const bf16 *kp = k_cache.data_ptr<bf16>(), *vp = v_cache.data_ptr<bf16>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  bf16* op = out.data_ptr<bf16>();
  const int64_t q_stride = q.stride(0), kv_heads = k_cache.size(2);
  auto run_one = [&](int64_t i, bool spread, std::vector<uint32_t>& k_pairs, std::vector<bf16>& values) {
    const int64_t row = s[4 * i], start = s[4 * i + 1], q_len = s[4 * i + 2], context_len = s[4 * i + 3];
    const bf16* qs = qp + start * q_stride;
    bf16* os = op + start * num_heads * head_dim;
    if (spread) {
      prefill_attention_bf16(qs, q_stride, kp, vp, tp + row * max_blocks, q_len, context_len, num_heads, kv_heads,
                             head_dim, block_size, static_cast<float>(scale), os);
      return;
    }
    PrefillSeq seq(qs, q_stride, kp, vp, tp + row * max_blocks, q_len, context_len, num_heads, kv_heads, head_dim,
                   block_size, static_cast<float>(scale), os, k_pairs, values);
    seq.gather(0, context_len);
    seq.items(0, seq.num_items());
  };
  const int64_t threads = at::get_num_threads();
  if (count < 2 * threads) {
    std::vector<uint32_t> k_pairs;
    std::vector<bf16> values;
    for (int64_t i = 0; i < count; ++i) run_one(i, true, k_pairs, values);
    return;
  }
  const std::vector<int64_t> bounds =
      equal_work_bounds(count, threads, [&](int64_t i) { return s[4 * i + 2] * s[4 * i + 3]; });
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    std::vector<uint32_t> k_pairs;
    std::vector<bf16> values;
    for (int64_t r = first; r < last; ++r)
      for (int64_t i = bounds[r]; i < bounds[r + 1]; ++i) run_one(i, false, k_pairs, values);
  });
}
#endif

// ---- a decode step's whole decoder stack (decode_layers, cpu_ops_entry.h): its two hooks --------
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
at::Tensor stack_linear(const at::Tensor& x, at::TensorList weights, int64_t first, int64_t kind,
                        const at::Tensor& bias) {
  if (kind == kBf16) return bf16_gemm(x, weights[first], bias.numel() ? c10::optional<at::Tensor>(bias) : c10::nullopt);
  at::Tensor out = kind == kInt8 ? int8_gemm(x, weights[first], weights[first + 1], weights[first + 2])
                                 : int4_gemm(x, weights[first]);
  return bias.numel() ? out + bias : out;  // the quantized linears add their bias after the matmul, in x's dtype
}

at::Tensor stack_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& k_scale, const at::Tensor& v_scale,
                           const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                           const at::Tensor& context_lens, double scale, int64_t sliding_window) {
  at::Tensor k_pool = k_cache, v_pool = v_cache;  // the ops take their pools as mutable references
  if (k_scale.defined()) {
    at::Tensor k_scales = k_scale, v_scales = v_scale;
    store_kv_int8(k, v, k_pool, v_pool, k_scales, v_scales, slot_mapping);
    return paged_decode_attention_int8(q, k_pool, v_pool, k_scales, v_scales, block_tables, context_lens, scale,
                                       sliding_window);
  }
  store_kv(k, v, k_pool, v_pool, slot_mapping);
  return paged_decode_attention(q, k_pool, v_pool, block_tables, context_lens, scale, sliding_window);
}
#endif

#endif  // PINFER_AVX512

}  // namespace

TORCH_LIBRARY(pinfer, m) {
  m.def("available() -> bool", &available);
  m.def("row_keys(Tensor seeds, Tensor steps) -> Tensor", &row_keys);
#if PINFER_AVX512
  define_entry_ops(m);
  m.def("use_amx(bool allow) -> bool", &use_amx);
  m.def("dequantize_rows(Tensor acc, Tensor x_scale, Tensor w_scale, ScalarType dtype) -> Tensor", &dequantize_rows);
#if defined(__AVX512BF16__)
  m.def("paged_prefill_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_table, int context_len, "
        "float scale) -> Tensor", &paged_prefill_attention);
  m.def("paged_prefill_attention_batch(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seqs, float scale, Tensor(a!) out) -> ()", &paged_prefill_attention_batch);
  m.def("bf16_gemm(Tensor x, Tensor packed, Tensor? bias) -> Tensor", &bf16_gemm);
#endif
#if defined(__AVX512VNNI__)
  m.def("int8_gemm(Tensor x, Tensor packed, Tensor w_sums, Tensor w_scale) -> Tensor", &int8_gemm);
  m.def("int4_gemm(Tensor x, Tensor packed) -> Tensor", &int4_gemm);
  m.def("paged_decode_attention_int8(Tensor query, Tensor k_cache, Tensor v_cache, Tensor k_scales, Tensor v_scales, "
        "Tensor block_tables, Tensor context_lens, float scale, int sliding_window) -> Tensor",
        &paged_decode_attention_int8);
  m.def("store_kv_int8(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) k_scales, "
        "Tensor(d!) v_scales, Tensor slot_mapping) -> ()", &store_kv_int8);
#endif
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
  m.def(kDecodeLayersSchema, &decode_layers);
#endif
#endif
}
