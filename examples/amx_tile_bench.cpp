// What one core's AMX tiles sustain where their operands come from: the bf16 2 x 2 register
// tile of kernels/cpu_ops.cpp's amx_dots (4 accumulators, 2 input row tiles, 2 weight tiles,
// one tile load a dot), with its operands in L1, in L2, and its weights streamed from memory.
//
//   g++ -O3 -march=native -fopenmp -o /tmp/amx_tile_bench examples/amx_tile_bench.cpp && /tmp/amx_tile_bench
//
// ns per TDPBF16PS (16 x 16 x 32 multiply-adds); the weights' read rate where they stream.
// Linux x86-64 with AMX only. Buffers 4 KiB-aligned: the same loop on buffers 16 bytes off a
// cache line ran 2.7x slower in L1 (every 64-byte tile row then spans two lines).
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

namespace {

constexpr long kChunks = 18;                    // K = 576 bf16, SmolLM2's hidden size
constexpr long kRowBytes = kChunks * 64;        // one input row
constexpr long kBlockBytes = kChunks * 1024;    // 16 packed weight columns
constexpr long kPairBytes = 2 * kBlockBytes;    // the register tile's 32 columns

void configure_tiles() {
  alignas(64) uint8_t config[64] = {};
  config[0] = 1;
  for (int t = 0; t < 8; ++t) config[16 + 2 * t] = 64, config[48 + t] = 16;
  _tile_loadconfig(config);
}

// 32 rows x 32 columns over `chunks` 64-byte chunks of k; prefetch: the bytes to pull into L2
// meanwhile (spread over the chunks), or null
__attribute__((noinline)) void tile_dots(const uint8_t* x, long x_stride, const uint8_t* w, long chunks,
                                         const uint8_t* prefetch, uint8_t* out) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (long c = 0; c < chunks; ++c) {
    _tile_loadd(4, x + c * 64, x_stride);
    _tile_loadd(6, w + c * 1024, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, w + kBlockBytes + c * 1024, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, x + 16 * x_stride + c * 64, x_stride);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
    if (prefetch != nullptr)
      for (long line = 0; line < kPairBytes / chunks; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(prefetch + c * (kPairBytes / chunks) + line), _MM_HINT_T1);
  }
  _tile_stored(0, out, 128);
  _tile_stored(1, out + 64, 128);
  _tile_stored(2, out + 2048, 128);
  _tile_stored(3, out + 2048 + 64, 128);
}

__attribute__((noinline)) void dots_only(long chunks, uint8_t* out) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (long c = 0; c < chunks; ++c) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, 128);
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

uint8_t* buffer(long bytes, bool huge) {
  auto* p = static_cast<uint8_t*>(std::aligned_alloc(2 << 20, bytes));
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);
  std::memset(p, 1, bytes);  // bf16 0x0101: small finite values
  return p;
}

// The decode-like loop: a 64-row input (two row tiles, 72 KB, in L2) against consecutive column
// pairs of a `region`-byte weight matrix (from L2 when small, from memory when large), on
// `threads` threads each with its own part. Returns ns per dot.
double decode_like(long region, int threads, long ahead, double* read_gb_s) {
  uint8_t* w = buffer(region, true);
  const long pairs = region / threads / kPairBytes - ahead;
  const long repeats = (288L << 20) / region;  // ~0.3 GB of weights a round
  double seconds = 0;
#pragma omp parallel num_threads(threads)
  {
    syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */);
    configure_tiles();
    uint8_t* x = buffer(64 * kRowBytes + (2 << 20), false);
    alignas(64) uint8_t out[4096];
    const uint8_t* part = w + omp_get_thread_num() * (region / threads);
    for (int timed = 0; timed < 2; ++timed) {  // the first round warms up
#pragma omp barrier
      const double start = now();
      for (long r = 0; r < repeats; ++r)
        for (long p = 0; p < pairs; ++p)
          for (int i = 0; i < 2; ++i)
            tile_dots(x + i * 32 * kRowBytes, kRowBytes, part + p * kPairBytes, kChunks,
                      ahead > 0 && i == 0 ? part + (p + ahead) * kPairBytes : nullptr, out);
#pragma omp barrier
      if (omp_get_thread_num() == 0) seconds = now() - start;
    }
    std::free(x);
  }
  std::free(w);
  const double dots = double(repeats) * pairs * 2 * kChunks * 4;  // per thread
  *read_gb_s = double(repeats) * pairs * kPairBytes * threads / seconds / 1e9;
  return seconds / dots * 1e9;
}

}  // namespace

int main() {
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) {
    std::puts("Linux did not grant the AMX tile state (no AMX on this CPU?)");
    return 1;
  }
  configure_tiles();
  alignas(64) uint8_t out[4096];
  {
    const long repeats = 200000;
    const double start = now();
    for (long r = 0; r < repeats; ++r) dots_only(kChunks, out);
    std::printf("dots alone (no loads):        %5.2f ns a dot\n", (now() - start) / (repeats * kChunks * 4) * 1e9);
  }
  {  // 32 rows x 8 chunks of input and a pair's 8 chunks of weights: 16 KB each, in L1
    uint8_t* x = buffer(1 << 20, false);
    uint8_t* w = buffer(1 << 20, false);
    const long repeats = 400000, chunks = 8;
    const double start = now();
    for (long r = 0; r < repeats; ++r) tile_dots(x, 512, w, chunks, nullptr, out);
    std::printf("operands in L1:               %5.2f ns a dot\n", (now() - start) / (repeats * chunks * 4) * 1e9);
    std::free(x), std::free(w);
  }
  double gb_s;
  std::printf("64 rows, weights in L2 (1 MB): %5.2f ns a dot\n", decode_like(1 << 20, 1, 0, &gb_s));
  for (int threads : {1, 2})
    for (long ahead : {0L, 1L, 4L}) {
      const double ns = decode_like(96L << 20, threads, ahead, &gb_s);
      std::printf("64 rows, weights from memory, %d thread(s), prefetch %ld pair(s) ahead: %5.2f ns a dot, %5.1f GB/s\n",
                  threads, ahead, ns, gb_s);
    }
}
