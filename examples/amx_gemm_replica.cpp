// A standalone replica of kernels/cpu_ops.cpp's amx_gemm on its decode path (64 rows, one pass
// over k, the next pair's weights prefetched into L2 during the first row tile, a bf16
// epilogue), over SmolLM2's 121 bf16 matrices in one buffer of 2 MiB pages, to try changes to
// the decode GEMM in seconds instead of an extension build and an engine run.
//
//   g++ -O3 -march=native -fopenmp -o /tmp/amx_gemm_replica examples/amx_gemm_replica.cpp
//   for v in 0 1 2 3 4 5 6 7 9 11; do VARIANT=$v /tmp/amx_gemm_replica; done
//
// VARIANT: 0 the engine's structure (a parallel region per matrix); 1 as 0 without the software
// prefetch; 2 as 0 without the epilogue; 3 one parallel region for all matrices, a barrier after
// each; 4 as 3 without the barriers; 5 as 4, and a thread's last pair prefetches its first pair
// of the next matrix; 6 as 5 with the barriers; 7 as 3 with each tile's epilogue deferred until
// the next tile's dots are issued (double-buffered sums); 9 as 3 without the head's epilogue;
// 11 as 4 without any epilogue; 12 as 3 with the tile's output lines prefetched for writing
// before its dots; 13 as 3 with the epilogue's stores into one small buffer (not the output). AHEAD: pairs ahead to prefetch (1). SAME=N: all 121 matrices
// N x 576. HUGE_OUT=1: the output on 2 MiB pages. Prints the best of 12 rounds, ms, and the weights' read rate. Linux x86-64 with AMX.
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
constexpr int64_t kAmxChunkBytes = 64, kAmxWeightTileBytes = 1024;
static int V = 0;
static int AHEAD = 1;
double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
void cfg() {
  alignas(64) uint8_t config[64] = {};
  config[0] = 1;
  for (int t = 0; t < 8; ++t) config[16 + 2 * t] = 64, config[48 + t] = 16;
  _tile_loadconfig(config);
}
template <int MT, int NT>
__attribute__((noinline)) void amx_dots(const uint8_t* x, int64_t x_stride, const uint8_t* w, int64_t block_bytes,
                                        int64_t chunks, const uint8_t* prefetch, uint8_t* acc) {
  const int64_t row_bytes = NT * 64, second = 16 * row_bytes;
  _tile_zero(0); if (NT > 1) _tile_zero(1); if (MT > 1) _tile_zero(2); if (MT > 1 && NT > 1) _tile_zero(3);
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(4, x + c * kAmxChunkBytes, x_stride);
    _tile_loadd(6, w + c * kAmxWeightTileBytes, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT > 1) { _tile_loadd(7, w + block_bytes + c * kAmxWeightTileBytes, 64); _tile_dpbf16ps(1, 4, 7); }
    if constexpr (MT > 1) { _tile_loadd(5, x + 16 * x_stride + c * kAmxChunkBytes, x_stride); _tile_dpbf16ps(2, 5, 6); }
    if constexpr (MT > 1 && NT > 1) { _tile_dpbf16ps(3, 5, 7); }
    if (prefetch != nullptr)
      for (int j = 0; j < NT; ++j)
        for (int64_t line = 0; line < kAmxWeightTileBytes; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(prefetch + j * block_bytes + c * kAmxWeightTileBytes + line), _MM_HINT_T1);
  }
  _tile_stored(0, acc, row_bytes); if (NT > 1) _tile_stored(1, acc + 64, row_bytes);
  if (MT > 1) _tile_stored(2, acc + second, row_bytes); if (MT > 1 && NT > 1) _tile_stored(3, acc + second + 64, row_bytes);
}
inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }
static bool EPI = true;
// next_w: the next matrix's weights for this thread's first pair (prefetched during the last pair)
void gemm_thread(int t, int nt, const uint8_t* x, int64_t m_dim, int64_t x_stride, const uint8_t* w, int64_t n_blocks, int64_t chunks, uint16_t* out, const uint8_t* next_w) {
  const int64_t block_bytes = chunks * kAmxWeightTileBytes, n_dim = n_blocks * 16;
  {
    const int64_t per = (n_blocks + nt - 1) / nt, begin = t * per, end = std::min(n_blocks, begin + per);
    cfg();
    alignas(64) uint8_t accs[2][4096];
    alignas(64) uint16_t scratch[32 * 32];
    int64_t p_i = -1, p_nb = 0; int p_nr = 0; int slot = 0;
    auto epi = [&](int64_t i, int64_t nb, int nr, const uint8_t* acc) {
      for (int r = 0; r < 32; ++r)
        for (int j = 0; j < nr; ++j)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(V == 13 ? scratch + (r * 2 + j) * 16 : out + (i + r) * n_dim + (nb + j) * 16),
                              to_bf16(_mm512_load_ps(reinterpret_cast<const float*>(acc + (r * nr + j) * 64))));
    };
    const int64_t pairs = (end - begin + 1) / 2;
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t nb = begin + 2 * p;
      const int nr = (int)std::min<int64_t>(2, end - nb);
      const uint8_t* next = nb + 2 * AHEAD < end ? w + (nb + 2 * AHEAD) * block_bytes : next_w;
      if (V == 1) next = nullptr;
      for (int64_t i = 0; i < m_dim; i += 32) {
        const uint8_t* pf = i == 0 ? next : nullptr;
        uint8_t* acc = accs[slot];
        if (V == 12)  // the tile's output lines into L1 for writing while its dots run
          for (int r = 0; r < 32; ++r) _m_prefetchw(out + (i + r) * n_dim + nb * 16);
        if (nr > 1) amx_dots<2, 2>(x + i * x_stride, x_stride, w + nb * block_bytes, block_bytes, chunks, pf, acc);
        else amx_dots<2, 1>(x + i * x_stride, x_stride, w + nb * block_bytes, block_bytes, chunks, pf, acc);
        if (V == 14) {  // the next tile's output lines, for writing, a tile ahead
          const int64_t ni = i + 32 < m_dim ? i + 32 : 0, nnb = i + 32 < m_dim ? nb : nb + 2;
          if (nnb < end)
            for (int r = 0; r < 32; ++r) _m_prefetchw(out + (ni + r) * n_dim + nnb * 16);
        }
        if (!EPI || (V == 9 && n_blocks == 3072)) continue;
        if (V >= 7) {  // the previous tile's epilogue while this one's dots run
          if (p_i >= 0) epi(p_i, p_nb, p_nr, accs[slot ^ 1]);
          p_i = i, p_nb = nb, p_nr = nr, slot ^= 1;
        } else {
          epi(i, nb, nr, acc);
        }
      }
    }
    if (p_i >= 0) epi(p_i, p_nb, p_nr, accs[slot ^ 1]);
  }
}
struct Mat { const uint8_t* w; int64_t n_blocks, chunks; };
// the first pair of thread t's part of m (what the prefetch of a part's last pair points at)
const uint8_t* first_pair(const Mat& m, int t, int nt) {
  const int64_t per = (m.n_blocks + nt - 1) / nt;
  return m.w + t * per * m.chunks * kAmxWeightTileBytes;
}
uint8_t* huge(size_t bytes) {
  size_t r = (bytes + (2 << 20) - 1) / (2 << 20) * (2 << 20);
  auto* p = static_cast<uint8_t*>(std::aligned_alloc(2 << 20, r));
  madvise(p, r, MADV_HUGEPAGE);
  return p;
}
int main() {
  syscall(SYS_arch_prctl, 0x1023, 18);
  V = getenv("VARIANT") ? atoi(getenv("VARIANT")) : 0;
  AHEAD = getenv("AHEAD") ? atoi(getenv("AHEAD")) : 1;
  std::vector<std::pair<int64_t, int64_t>> shapes;
  for (int l = 0; l < 30; ++l) for (auto s : {std::pair<int64_t,int64_t>{960, 576}, {576, 576}, {3072, 576}, {576, 1536}}) shapes.push_back(s);
  shapes.push_back({49152, 576});
  if (getenv("SAME")) for (auto& s : shapes) s = {atoi(getenv("SAME")), 576};
  size_t total = 0; std::vector<size_t> off;
  for (auto [n, k] : shapes) { off.push_back(total); total += n * k * 2; }
  uint8_t* w = huge(total);
  uint32_t st = 1;
  uint16_t* q = reinterpret_cast<uint16_t*>(w);
  for (size_t i = 0; i < total / 2; ++i) { st = st * 1664525u + 1013904223u; q[i] = 0x3c00 | ((st >> 16) & 0x80ff); }
  uint8_t* x = huge(64 * 1536 * 2);
  for (int i = 0; i < 64 * 1536; ++i) reinterpret_cast<uint16_t*>(x)[i] = 0x3f80;
  // HUGE_OUT: the output on 2 MiB pages too (a tile's 32 rows of a wide output are 32 pages apart)
  std::vector<uint16_t> out_small(getenv("HUGE_OUT") ? 0 : 64 * 49152);
  uint16_t* out_data = getenv("HUGE_OUT") ? reinterpret_cast<uint16_t*>(huge(64 * 49152 * 2)) : out_small.data();
  std::memset(out_data, 0, 64 * 49152 * 2);
  EPI = V != 2 && V != 11;
  std::vector<Mat> mats;
  for (size_t m = 0; m < shapes.size(); ++m) mats.push_back({w + off[m], shapes[m].first / 16, shapes[m].second * 2 / 64});
  const int nt = omp_get_max_threads();
  double best = 1e9;
  for (int r = 0; r < 12; ++r) {
    double t0 = now();
    if (V <= 2) {
      for (size_t m = 0; m < mats.size(); ++m) {
#pragma omp parallel num_threads(nt)
        { cfg(); gemm_thread(omp_get_thread_num(), nt, x, 64, mats[m].chunks * 64, mats[m].w, mats[m].n_blocks, mats[m].chunks, out_data, nullptr); _tile_release(); }
      }
    } else {
#pragma omp parallel num_threads(nt)
      {
        const int t = omp_get_thread_num();
        cfg();
        for (size_t m = 0; m < mats.size(); ++m) {
          const uint8_t* nw = (V == 5 || V == 6) && m + 1 < mats.size() ? first_pair(mats[m + 1], t, nt) : nullptr;
          gemm_thread(t, nt, x, 64, mats[m].chunks * 64, mats[m].w, mats[m].n_blocks, mats[m].chunks, out_data, nw);
          if (V == 3 || V == 6 || V == 7 || V == 9 || V == 12 || V == 13 || V == 14) {
#pragma omp barrier
          }
        }
        _tile_release();
      }
    }
    best = std::min(best, now() - t0);
  }
  std::printf("variant %d ahead %d: %.2f ms (%.1f GB/s)\n", V, AHEAD, best * 1e3, total / best / 1e9);
}
