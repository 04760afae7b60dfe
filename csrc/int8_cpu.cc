// y = x @ dequant(W).T on the CPU, reading the int8 / int4 weight bytes as they are held.
//
// XLA:CPU has no integer-by-float dot: it converts a held int8 kernel to a float32 array inside the
// program and multiplies that, so a decode step writes and reads four bytes per weight besides the one
// it holds (docs/benchmarks.md, "Quantized weights"). These two XLA FFI handlers read each weight byte
// once per call and widen it in registers:
//
//   CogvlmInt8Matmul(x f32[R, D], w s8[F, D], scale f32[F, 1])        -> y f32[R, F]
//       y[r, o] = (sum_i x[r, i] * w[o, i]) * scale[o]
//   CogvlmInt4Matmul(x f32[R, D], w u8[F, D/2], scale f32[F, D/G])    -> y f32[R, F]
//       w[o, j] holds inputs 2j (low nibble) and 2j+1 (high nibble), signed; group k of G consecutive
//       inputs has scale[o, k]; y[r, o] = sum_i x[r, i] * (q[o, i] * scale[o, i / G])
//
// These are the products cogvlm_jax/models/quantize.py defines (``product_kernel``), in another
// summation order. Every weight row is read once per call whatever R: the rows of x are taken in blocks
// of four against one weight row, which stays in L1 for the next block. The output columns are split
// over XLA's intra-op thread pool. The inner loops have AVX-512 and AVX2+FMA versions (intrinsics in
// functions compiled for that instruction set only) and a portable one; which runs is decided when the
// library loads, from the CPU it runs on (__builtin_cpu_supports): the build itself assumes no more than
// baseline x86-64.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Dot products of RB rows of x against one weight row: out[r] = sum_i x[r * ldx + i] * w[i]. Each row
// keeps U vector accumulators (U * RB independent FMA chains, enough to hide the FMA latency at one row),
// added together at the end; the tail past the last full vector step is scalar.
inline float LoadW(const int8_t* w, int64_t i) { return static_cast<float>(w[i]); }
inline float LoadW(const float* w, int64_t i) { return w[i]; }

template <int RB, typename W>
void DotRowsScalar(const float* __restrict x, int64_t ldx, const W* __restrict w, int64_t d, float* out) {
  for (int r = 0; r < RB; ++r) {
    float s[4] = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 4 <= d; i += 4)
      for (int l = 0; l < 4; ++l) s[l] += x[r * ldx + i + l] * LoadW(w, i + l);
    float t = (s[0] + s[1]) + (s[2] + s[3]);
    for (; i < d; ++i) t += x[r * ldx + i] * LoadW(w, i);
    out[r] = t;
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define COGVLM_X86 1
#define AVX512 __attribute__((target("avx512f")))
#define AVX2 __attribute__((target("avx2,fma")))

AVX512 inline __m512 Load16(const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}
AVX512 inline __m512 Load16(const float* w) { return _mm512_loadu_ps(w); }

template <int RB, typename W>
AVX512 void DotRows512(const float* __restrict x, int64_t ldx, const W* __restrict w, int64_t d, float* out) {
  constexpr int U = RB >= 3 ? 1 : 4 / RB;
  __m512 acc[RB][U];
  for (int r = 0; r < RB; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 * U <= d; i += 16 * U) {
    for (int u = 0; u < U; ++u) {
      const __m512 wv = Load16(w + i + 16 * u);
      for (int r = 0; r < RB; ++r)
        acc[r][u] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * ldx + i + 16 * u), wv, acc[r][u]);
    }
  }
  for (int r = 0; r < RB; ++r) {
    __m512 a = acc[r][0];
    for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[r][u]);
    float t = _mm512_reduce_add_ps(a);
    for (int64_t j = i; j < d; ++j) t += x[r * ldx + j] * LoadW(w, j);
    out[r] = t;
  }
}

AVX2 inline __m256 Load8(const int8_t* w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}
AVX2 inline __m256 Load8(const float* w) { return _mm256_loadu_ps(w); }

template <int RB, typename W>
AVX2 void DotRows256(const float* __restrict x, int64_t ldx, const W* __restrict w, int64_t d, float* out) {
  constexpr int U = RB >= 3 ? 2 : 8 / RB / 2 * 2;  // vectors of 8 per row per step: 4, 4, 2, 2
  __m256 acc[RB][U];
  for (int r = 0; r < RB; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 * U <= d; i += 8 * U) {
    for (int u = 0; u < U; ++u) {
      const __m256 wv = Load8(w + i + 8 * u);
      for (int r = 0; r < RB; ++r)
        acc[r][u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + i + 8 * u), wv, acc[r][u]);
    }
  }
  for (int r = 0; r < RB; ++r) {
    __m256 a = acc[r][0];
    for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[r][u]);
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    float t = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
    for (int64_t j = i; j < d; ++j) t += x[r * ldx + j] * LoadW(w, j);
    out[r] = t;
  }
}
// Packed int4 pairs -> the dequantized float row (q * scale of its group), 32 inputs (16 bytes) a step
// where the group is a multiple of 32; the caller handles other groups.
AVX512 void UnpackRow512(const uint8_t* packed, const float* scale, int64_t d, int64_t g, float* row) {
  const __m512i eight = _mm512_set1_epi32(8), low = _mm512_set1_epi32(0xF);
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t i = 0; i < d; i += 32) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2)));
    const __m512i lo = _mm512_sub_epi32(_mm512_xor_si512(_mm512_and_si512(b, low), eight), eight);
    const __m512i hi = _mm512_sub_epi32(_mm512_xor_si512(_mm512_srli_epi32(b, 4), eight), eight);
    const __m512 s = _mm512_set1_ps(scale[i / g]);
    _mm512_storeu_ps(row + i, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_permutex2var_epi32(lo, first, hi)), s));
    _mm512_storeu_ps(row + i + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_permutex2var_epi32(lo, second, hi)), s));
  }
}

AVX2 void UnpackRow256(const uint8_t* packed, const float* scale, int64_t d, int64_t g, float* row) {
  const __m256i eight = _mm256_set1_epi32(8), low = _mm256_set1_epi32(0xF);
  for (int64_t i = 0; i < d; i += 16) {  // 8 bytes: 16 inputs
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + i / 2)));
    const __m256i lo = _mm256_sub_epi32(_mm256_xor_si256(_mm256_and_si256(b, low), eight), eight);
    const __m256i hi = _mm256_sub_epi32(_mm256_xor_si256(_mm256_srli_epi32(b, 4), eight), eight);
    const __m256i a = _mm256_unpacklo_epi32(lo, hi), c = _mm256_unpackhi_epi32(lo, hi);
    const __m256 s = _mm256_set1_ps(scale[i / g]);
    _mm256_storeu_ps(row + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_permute2x128_si256(a, c, 0x20)), s));
    _mm256_storeu_ps(row + i + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_permute2x128_si256(a, c, 0x31)), s));
  }
}
#endif

enum class Isa { kScalar, kAvx2, kAvx512 };

// The instruction set of the CPU this runs on (not the build machine's). COGVLM_CPU_KERNEL_ISA=avx2 or
// =scalar caps it, so that every version can be tested on one machine (tests/test_int8_cpu.py).
Isa DetectIsa() {
  const char* cap = std::getenv("COGVLM_CPU_KERNEL_ISA");
  const bool scalar = cap && std::strcmp(cap, "scalar") == 0, avx2 = cap && std::strcmp(cap, "avx2") == 0;
  if (scalar) return Isa::kScalar;
#ifdef COGVLM_X86
  __builtin_cpu_init();
  if (!avx2 && __builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

const Isa kIsa = DetectIsa();

}  // namespace

// The version the products run (0 portable, 1 AVX2+FMA, 2 AVX-512), for tests and benchmarks.
extern "C" int CogvlmCpuKernelIsa() { return static_cast<int>(kIsa); }

namespace {

template <int RB, typename W>
inline void DotRows(const float* x, int64_t ldx, const W* w, int64_t d, float* out) {
#ifdef COGVLM_X86
  if (kIsa == Isa::kAvx512) return DotRows512<RB>(x, ldx, w, d, out);
  if (kIsa == Isa::kAvx2) return DotRows256<RB>(x, ldx, w, d, out);
#endif
  DotRowsScalar<RB>(x, ldx, w, d, out);
}

// The vector unpacking of an int4 row where the CPU and the group allow it; false: the caller's loop.
inline bool UnpackRowVector(const uint8_t* packed, const float* scale, int64_t d, int64_t g, float* row) {
#ifdef COGVLM_X86
  if (kIsa == Isa::kAvx512 && g % 32 == 0) return UnpackRow512(packed, scale, d, g, row), true;
  if (kIsa == Isa::kAvx2 && g % 16 == 0) return UnpackRow256(packed, scale, d, g, row), true;
#endif
  return false;
}

// One weight row against every row of x: dots[r] for r < rows.
template <typename W>
inline void RowAgainstAll(const float* x, int64_t rows, int64_t d, const W* w, float* dots) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) DotRows<4>(x + r * d, d, w, d, dots + r);
  switch (rows - r) {
    case 3: DotRows<3>(x + r * d, d, w, d, dots + r); break;
    case 2: DotRows<2>(x + r * d, d, w, d, dots + r); break;
    case 1: DotRows<1>(x + r * d, d, w, d, dots + r); break;
    default: break;
  }
}

void Int8Columns(const float* x, int64_t rows, int64_t d, const int8_t* w, const float* scale,
                 int64_t f, int64_t begin, int64_t end, float* y) {
  std::vector<float> dots(rows);
  for (int64_t o = begin; o < end; ++o) {
    RowAgainstAll(x, rows, d, w + o * d, dots.data());
    for (int64_t r = 0; r < rows; ++r) y[r * f + o] = dots[r] * scale[o];
  }
}

void Int4Columns(const float* x, int64_t rows, int64_t d, const uint8_t* w, const float* scale,
                 int64_t groups, int64_t f, int64_t begin, int64_t end, float* y) {
  const int64_t g = d / groups;
  std::vector<int8_t> q(d);
  std::vector<float> row(d);
  std::vector<float> dots(rows);
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* packed = w + o * (d / 2);
    const float* s = scale + o * groups;
    if (!UnpackRowVector(packed, s, d, g, row.data())) {
      for (int64_t j = 0; j < d / 2; ++j) {  // sign-extend both nibbles: (v ^ 8) - 8
        q[2 * j] = static_cast<int8_t>(((packed[j] & 0xF) ^ 8) - 8);
        q[2 * j + 1] = static_cast<int8_t>(((packed[j] >> 4) ^ 8) - 8);
      }
      for (int64_t k = 0; k < groups; ++k)  // the dequantized weight, as quantize.dequantize rounds it
        for (int64_t i = k * g; i < (k + 1) * g; ++i) row[i] = static_cast<float>(q[i]) * s[k];
    }
    RowAgainstAll(x, rows, d, row.data(), dots.data());
    for (int64_t r = 0; r < rows; ++r) y[r * f + o] = dots[r];
  }
}

// Runs body(begin, end) over [0, n) in chunks on the caller and the pool's threads. Chunks are claimed
// from a shared counter, so the caller finishes every chunk no pool thread has started (a busy pool
// cannot stall it), then waits only for chunks already running. Late tasks find nothing to claim.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t min_chunk, Body body) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads() + 1);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads * 4, n / std::max<int64_t>(1, min_chunk)));
  if (chunks == 1) {
    body(0, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, chunks, body]() {
    int64_t mine = 0;
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks; ++mine) body(n * c / chunks, n * (c + 1) / chunks);
    if (mine) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->done += mine;
      state->cv.notify_all();
    }
  };
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == chunks; });
}

constexpr int64_t kMinChunkBytes = 1 << 16;  // weight bytes per chunk below which threads cost more

ffi::Error CheckShapes(ffi::Buffer<ffi::F32> x, int64_t w_rows, int64_t w_cols, ffi::Buffer<ffi::F32> scale,
                       ffi::ResultBuffer<ffi::F32> y, int64_t d, const char* name) {
  auto xd = x.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || sd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument(std::string(name) + ": x, scale and y must be 2-D");
  if (sd[0] != w_rows || yd[0] != xd[0] || yd[1] != w_rows || w_cols <= 0 || d != xd[1])
    return ffi::Error::InvalidArgument(std::string(name) + ": shapes of x, w, scale, y do not agree");
  return ffi::Error::Success();
}

ffi::Error Int8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                    ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("CogvlmInt8Matmul: w must be 2-D");
  const int64_t f = wd[0], d = wd[1], rows = x.dimensions()[0];
  if (auto e = CheckShapes(x, f, d, scale, y, d, "CogvlmInt8Matmul"); e.failure()) return e;
  if (scale.dimensions()[1] != 1) return ffi::Error::InvalidArgument("CogvlmInt8Matmul: scale must be [F, 1]");
  const float* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, f, std::max<int64_t>(1, kMinChunkBytes / std::max<int64_t>(1, d)),
              [=](int64_t b, int64_t e) { Int8Columns(xp, rows, d, wp, sp, f, b, e, yp); });
  return ffi::Error::Success();
}

ffi::Error Int4Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                    ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("CogvlmInt4Matmul: w must be 2-D");
  const int64_t f = wd[0], d = 2 * wd[1], rows = x.dimensions()[0];
  if (auto e = CheckShapes(x, f, d, scale, y, d, "CogvlmInt4Matmul"); e.failure()) return e;
  const int64_t groups = scale.dimensions()[1];
  if (groups <= 0 || d % groups)
    return ffi::Error::InvalidArgument("CogvlmInt4Matmul: the scale's groups must divide the input width");
  const float* xp = x.typed_data();
  const uint8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, f, std::max<int64_t>(1, kMinChunkBytes / std::max<int64_t>(1, d / 2)),
              [=](int64_t b, int64_t e) { Int4Columns(xp, rows, d, wp, sp, groups, f, b, e, yp); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CogvlmInt8Matmul, Int8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CogvlmInt4Matmul, Int4Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
