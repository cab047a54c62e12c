// Paged decode attention on CPU: one query token per sequence attends to the keys/values its block
// table points at, read in place from the paged cache [Hk, num_blocks, block_size, d]. The reference
// (and the serving runtime before this kernel) first copies every sequence's blocks into a padded
// [Hk, b, S, d] tensor with index_select, then runs masked batched matmuls and a softmax over it: two
// extra trips through memory for the keys and values, plus the padding. Here each (sequence, kv head)
// pair is one task: the g query heads sharing that kv head are processed together, so each key and value
// row is read (and, for int8/bf16/fp16, converted to fp32) once for all g heads. The context is walked in
// chunks of whole blocks (kChunkTokens keys): per chunk, the scores go to a small per-thread buffer
// [g, chunk], a stable softmax (max subtracted, vectorised exp) runs over it in place, then the chunk's
// values are summed with those weights; chunks are merged with an online softmax.
// AVX2 builds score 8 keys at a time per head (8 FMA chains reduced together, `dot8`) and, for fp32
// caches, keep each head's accumulators in registers across a block's value rows; on the serving
// benchmark's decode shapes (b 256, 8/2 heads, d 32, 67 MB cache, 1 thread) a call went from 1.66 to
// 1.08-1.14 ms with them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#ifdef PUYU_CPU_AVX2
#include <immintrin.h>
#endif

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "serving_ops.h"
#include "cpu/common.h"

namespace puyu {
namespace {

// A cache row as opmath values: the row itself when it is already in opmath (fp32/fp64 caches), otherwise
// converted into `buf` (int8 codes are converted without their scale; the caller applies it).
template <int64_t D, typename kv_t, typename acc_t>
inline const acc_t* opmath_row(const kv_t* row, acc_t* buf, int64_t d) {
  if constexpr (std::is_same_v<kv_t, acc_t>) {
    return row;
  } else {
    const int64_t n = D > 0 ? D : d;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) buf[c] = static_cast<acc_t>(row[c]);
    return buf;
  }
}

// a . b over D (or d) elements. For a compile-time D the sum runs in W lanes and ends in a pairwise tree
// (the `omp simd` reduction ends in W serial scalar adds, which dominated the score pass at d = 32).
template <int64_t D, typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t d) {
  constexpr int64_t W = 32 / sizeof(acc_t);  // one AVX2 register
  if constexpr (D > 0 && D % W == 0) {
    acc_t lane[W] = {};
    for (int64_t c0 = 0; c0 < D; c0 += W) {
#pragma omp simd
      for (int64_t l = 0; l < W; ++l) lane[l] += a[c0 + l] * b[c0 + l];
    }
    for (int64_t w = W / 2; w > 0; w /= 2) {
      for (int64_t l = 0; l < w; ++l) lane[l] += lane[l + w];
    }
    return lane[0];
  } else {
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < d; ++c) s += a[c] * b[c];
    return s;
  }
}

#ifdef PUYU_CPU_AVX2
// The 8 dot products q . k_r of one query row with 8 consecutive key rows k_r (stride D), as one vector.
// Each product runs in its own register (8 independent FMA chains), and the 8 registers are reduced
// together by a horizontal-add tree (hadd, hadd, cross-lane add): ~1 reduction op per key instead of the
// ~5 a dot product ending in its own horizontal sum needs, which is what bounded the score pass at d = 32.
template <int64_t D>
inline __m256 dot8(const float* q, const float* k) {
  static_assert(D > 0 && D % 8 == 0, "dot8: head dim a multiple of 8");
  __m256 a[8];
  const __m256 q0 = _mm256_loadu_ps(q);
  for (int r = 0; r < 8; ++r) a[r] = _mm256_mul_ps(q0, _mm256_loadu_ps(k + r * D));
  for (int64_t c = 8; c < D; c += 8) {
    const __m256 qc = _mm256_loadu_ps(q + c);
    for (int r = 0; r < 8; ++r) a[r] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k + r * D + c), a[r]);
  }
  // per 128-bit lane: s01 = [a0 01, a0 23, a1 01, a1 23], then s0123 = [a0 0123, a1 0123, a2 0123, a3 0123]
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// The largest of 8 lanes (a NaN lane is passed over, as std::max(m, x) passes over a NaN x).
inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  m = _mm_max_ps(_mm_movehl_ps(m, m), m);
  return _mm_cvtss_f32(_mm_max_ss(_mm_movehdup_ps(m), m));
}
#endif

// Asks for the cache lines of `bytes` bytes at `p` ahead of use (into all cache levels): blocks sit at
// scattered addresses and are only a few KiB, too short for the hardware prefetcher to catch up on.
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

// The same into L2 only (locality 2). A thread asks for its next (sequence, kv head) pair's keys and
// values, all blocks, when it starts a pair: in the serving loop the cache is cold (the step's weights
// and activations pass through L3 between two reads of a layer's cache), and a decode call was bound by
// the latency of those misses, ~7 GB/s against ~23 GB/s this VM's DRAM gives one core. Measured on a
// decode call captured from the serving benchmark (b 256, mean context 113, 14.8 MB of K/V, L3 flushed
// before each call, 1 thread): 2.20 -> 1.55 ms; in the benchmark's loop decode calls went from 2.4 to
// 1.7 ms at 1 thread and 1.23 to 0.98 ms at 2. One pair further ahead, or no per-row L1 prefetches, was
// slower.
inline void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 2);
}

// Keys per chunk, rounded down to whole blocks. Within a chunk, two passes over the score buffer: the
// exps vectorise over the chunk, and the values are still in cache from their prefetch during the score
// pass. Across chunks, an online softmax (running max and sum; accumulators rescaled when the max grows)
// keeps the buffer and the distance between reading a block's keys and its values bounded. Serving-sized
// contexts fit one chunk. Measured at 1 thread (thread time, shared machine): b=256, Hq=8, Hk=2, d=32,
// contexts 20..210 about the same as one unbounded chunk (1.1-1.3 ms int8/bf16 KV); b=64, Hq=32, Hk=8,
// d=128, contexts up to 2048: 63 ms vs 70-76 ms in one chunk. Chunks of 64 or 128 keys were no better.
constexpr int64_t kChunkTokens = 256;

// D > 0: head dim known at compile time (fully unrolled row loops); D == 0: any head dim `d`.
// q/out [b, Hq, d] in scalar_t; caches [Hk, NB, bs, d] in kv_t (scalar_t, or int8_t with fp32 scales
// [Hk, NB, bs] in ksp/vsp); block tables [b, mb]; context lengths [b] (validated by the caller).
template <int64_t D, typename scalar_t, typename kv_t, typename acc_t = at::opmath_type<scalar_t>>
void paged_decode_kernel(const scalar_t* qp, const kv_t* kp, const kv_t* vp, const float* ksp, const float* vsp,
                         const int64_t* btp, const int64_t* clp, scalar_t* op, int64_t b, int64_t Hq, int64_t Hk,
                         int64_t d_runtime, int64_t NB, int64_t bs, int64_t mb, acc_t scale) {
  constexpr bool quantized = std::is_same_v<kv_t, int8_t>;
  const int64_t d = D > 0 ? D : d_runtime;
  const int64_t g = Hq / Hk;
  const int64_t chunk_blocks = std::max<int64_t>(1, kChunkTokens / bs);
  const int64_t chunk = chunk_blocks * bs;
  at::parallel_for(0, b * Hk, 1, [&](int64_t begin, int64_t end) {
    // Per-thread buffers: the scaled queries [g, d], the output accumulators [g, d], two converted cache
    // rows [2, d], one chunk's scores [g, chunk], the running max and sum of exp per query head [g].
    std::vector<acc_t> qf(g * d), acc(g * d), row(2 * d), scores(g * chunk), run_max(g), run_sum(g), tile(8 * d);
    acc_t* sc = scores.data();
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t i = pair / Hk, h = pair % Hk;
      const int64_t L = clp[i];
      const int64_t* table = btp + i * mb;
      const int64_t n_blocks = (L + bs - 1) / bs;
      auto k_block = [&](int64_t blk) { return kp + (h * NB + table[blk]) * bs * d; };
      const int64_t i2 = (pair + 1) / Hk, h2 = (pair + 1) % Hk;
      // The next pair's whole context into L2 while this one is computed, unless its row continues the
      // row before it (a prompt chunk's next token: same first block, one key more), whose keys are cached.
      const bool continues = i2 > 0 && btp[(i2 - 1) * mb] == btp[i2 * mb] && clp[i2 - 1] + 1 == clp[i2];
      if (pair + 1 < end && !continues) {
        for (int64_t blk = 0; blk * bs < clp[i2]; ++blk) {
          const int64_t slot0 = (h2 * NB + btp[i2 * mb + blk]) * bs, n = std::min(bs, clp[i2] - blk * bs);
          prefetch_l2(kp + slot0 * d, n * d * sizeof(kv_t));
          prefetch_l2(vp + slot0 * d, n * d * sizeof(kv_t));
        }
      }

      const scalar_t* qi = qp + (i * Hq + h * g) * d;  // the g query heads of kv head h: [g, d]
#pragma omp simd
      for (int64_t c = 0; c < g * d; ++c) qf[c] = static_cast<acc_t>(qi[c]) * scale;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(run_max.begin(), run_max.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(run_sum.begin(), run_sum.end(), acc_t(0));

      for (int64_t blk0 = 0; blk0 < n_blocks; blk0 += chunk_blocks) {
        const int64_t blk1 = std::min(n_blocks, blk0 + chunk_blocks);
        const int64_t t0 = blk0 * bs, n_tok = std::min(L, blk1 * bs) - t0;  // the chunk's tokens [t0, t0 + n_tok)

        // Pass 1: sc[j, t - t0] = (scale q_j) . k_t (times k_t's scale for int8 codes). While a block's key
        // rows are read, the same rows of the next block and of this block's values are prefetched.
        for (int64_t blk = blk0; blk < blk1; ++blk) {
          const int64_t slot0 = (h * NB + table[blk]) * bs;  // the block's first token slot in [Hk * NB * bs]
          const int64_t n = std::min(bs, L - blk * bs);
          const kv_t* k_next = blk + 1 < n_blocks ? k_block(blk + 1) : nullptr;
          int64_t o = 0;
#ifdef PUYU_CPU_AVX2
          if constexpr (std::is_same_v<acc_t, float> && D > 0 && D % 8 == 0) {
            // 8 keys at a time: their scores for all g heads. A context's last, partial group is scored as a
            // whole group too while the block has room for 8 rows (their slots exist; the scores past the
            // context land in the buffer's unused tail and are never read): no scalar remainder.
            for (; o < n && o + 8 <= bs; o += 8) {
              for (int64_t r = 0; r < 8; ++r) {
                if (k_next != nullptr) prefetch(k_next + (o + r) * d, d * sizeof(kv_t));
                prefetch(vp + (slot0 + o + r) * d, d * sizeof(kv_t));
              }
              const float* kt;  // the 8 rows [8, D], converted unless fp32 already
              if constexpr (std::is_same_v<kv_t, float>) {
                kt = kp + (slot0 + o) * d;
              } else {
                for (int64_t r = 0; r < 8; ++r) opmath_row<D>(kp + (slot0 + o + r) * d, tile.data() + r * D, d);
                kt = tile.data();
              }
              for (int64_t j = 0; j < g; ++j) {
                __m256 s = dot8<D>(qf.data() + j * D, kt);
                if constexpr (quantized) s = _mm256_mul_ps(s, _mm256_loadu_ps(ksp + slot0 + o));
                _mm256_storeu_ps(sc + j * chunk + blk * bs + o - t0, s);
              }
            }
          }
#endif
          for (; o < n; ++o) {
            if (k_next != nullptr) prefetch(k_next + o * d, d * sizeof(kv_t));
            prefetch(vp + (slot0 + o) * d, d * sizeof(kv_t));
            const acc_t* kr = opmath_row<D>(kp + (slot0 + o) * d, row.data(), d);
            const acc_t ks = quantized ? static_cast<acc_t>(ksp[slot0 + o]) : acc_t(1);
            for (int64_t j = 0; j < g; ++j) {
              const acc_t s = dot<D>(qf.data() + j * d, kr, d);
              sc[j * chunk + blk * bs + o - t0] = quantized ? s * ks : s;
            }
          }
        }

        // Stable softmax per head, in place: exp(s - max) over the chunk; when the running max grows, the
        // earlier chunks' sum and accumulators are rescaled by exp(old max - new max). The division by the
        // sum is left to the output.
        for (int64_t j = 0; j < g; ++j) {
          acc_t* sj = sc + j * chunk;
          acc_t m = run_max[j];
          int64_t t_max = 0;
#ifdef PUYU_CPU_AVX2
          if constexpr (std::is_same_v<acc_t, float>) {  // GCC leaves the `omp simd` max below scalar
            __m256 mv = _mm256_set1_ps(m);
            for (; t_max + 8 <= n_tok; t_max += 8) mv = _mm256_max_ps(_mm256_loadu_ps(sj + t_max), mv);
            m = hmax8(mv);
          }
#endif
          for (int64_t t = t_max; t < n_tok; ++t) m = std::max(m, sj[t]);
          acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t t = 0; t < n_tok; ++t) {
            sj[t] = cpu::vexp(sj[t] - m);
            sum += sj[t];
          }
          if (blk0 > 0 && m > run_max[j]) {
            const acc_t alpha = cpu::vexp(run_max[j] - m);
            run_sum[j] *= alpha;
            acc_t* aj = acc.data() + j * d;
#pragma omp simd
            for (int64_t c = 0; c < d; ++c) aj[c] *= alpha;
          }
          run_max[j] = m;
          run_sum[j] += sum;
        }

        // Pass 2: acc[j] += sum_t p[j, t] v_t (v_t's scale folded into the weight for int8 codes). The next
        // key block to read (the next chunk's first, or this thread's next pair's) is prefetched meanwhile.
        if (blk1 < n_blocks) {
          prefetch(k_block(blk1), bs * d * sizeof(kv_t));
        } else if (pair + 1 < end) {
          prefetch(kp + (h2 * NB + btp[i2 * mb]) * bs * d, std::min(bs, clp[i2]) * d * sizeof(kv_t));
        }
        for (int64_t blk = blk0; blk < blk1; ++blk) {
          const int64_t slot0 = (h * NB + table[blk]) * bs;
          const int64_t n = std::min(bs, L - blk * bs);
          const acc_t* p = sc + blk * bs - t0;  // p[j * chunk + o]: token o of this block, head j
          if (blk + 1 < blk1) prefetch(vp + (h * NB + table[blk + 1]) * bs * d, bs * d * sizeof(kv_t));  // L2 -> L1
          int64_t o = 0;
#ifdef PUYU_CPU_AVX2
          if constexpr (std::is_same_v<kv_t, float> && std::is_same_v<acc_t, float> && D > 0 && D % 32 == 0) {
            // fp32 cache: per head and 32 columns, the accumulators stay in 4 registers over the whole block
            // (the block's value rows, 2 KiB at d = 32, are re-read from L1 for each head).
            const float* vb = vp + slot0 * D;
            for (int64_t j = 0; j < g; ++j) {
              const float* pj = p + j * chunk;
              for (int64_t c0 = 0; c0 < D; c0 += 32) {
                float* aj = acc.data() + j * D + c0;
                __m256 a0 = _mm256_loadu_ps(aj), a1 = _mm256_loadu_ps(aj + 8);
                __m256 a2 = _mm256_loadu_ps(aj + 16), a3 = _mm256_loadu_ps(aj + 24);
                for (int64_t t = 0; t < n; ++t) {
                  const __m256 w = _mm256_set1_ps(pj[t]);
                  const float* v = vb + t * D + c0;
                  a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v), a0);
                  a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8), a1);
                  a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 16), a2);
                  a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 24), a3);
                }
                _mm256_storeu_ps(aj, a0), _mm256_storeu_ps(aj + 8, a1);
                _mm256_storeu_ps(aj + 16, a2), _mm256_storeu_ps(aj + 24, a3);
              }
            }
            o = n;
          }
#endif
          for (; o + 1 < n; o += 2) {  // two value rows per update of the accumulators (half their traffic)
            const acc_t* v0 = opmath_row<D>(vp + (slot0 + o) * d, row.data(), d);
            const acc_t* v1 = opmath_row<D>(vp + (slot0 + o + 1) * d, row.data() + d, d);
            const acc_t vs0 = quantized ? static_cast<acc_t>(vsp[slot0 + o]) : acc_t(1);
            const acc_t vs1 = quantized ? static_cast<acc_t>(vsp[slot0 + o + 1]) : acc_t(1);
            for (int64_t j = 0; j < g; ++j) {
              const acc_t w0 = p[j * chunk + o] * vs0, w1 = p[j * chunk + o + 1] * vs1;
              acc_t* aj = acc.data() + j * d;
#pragma omp simd
              for (int64_t c = 0; c < d; ++c) aj[c] += w0 * v0[c] + w1 * v1[c];
            }
          }
          if (o < n) {
            const acc_t* vr = opmath_row<D>(vp + (slot0 + o) * d, row.data(), d);
            const acc_t vs = quantized ? static_cast<acc_t>(vsp[slot0 + o]) : acc_t(1);
            for (int64_t j = 0; j < g; ++j) {
              const acc_t w = p[j * chunk + o] * vs;
              acc_t* aj = acc.data() + j * d;
#pragma omp simd
              for (int64_t c = 0; c < d; ++c) aj[c] += w * vr[c];
            }
          }
        }
      }

      scalar_t* oi = op + (i * Hq + h * g) * d;
      for (int64_t j = 0; j < g; ++j) {
        const acc_t r = acc_t(1) / run_sum[j];
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) oi[j * d + c] = static_cast<scalar_t>(acc[j * d + c] * r);
      }
    }
  });
}

// The kernel for one (q dtype, cache element type), with the head dim fixed at compile time for the
// usual sizes.
template <typename scalar_t, typename kv_t>
void launch(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const float* ksp,
            const float* vsp, const at::Tensor& block_tables, const at::Tensor& context_lens, at::Tensor& out,
            double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = q.size(0), Hq = q.size(1), d = q.size(2);
  const int64_t Hk = k_cache.size(0), NB = k_cache.size(1), bs = k_cache.size(2), mb = block_tables.size(1);
  auto run = [&](auto head_dim) {
    paged_decode_kernel<decltype(head_dim)::value, scalar_t, kv_t>(
        q.const_data_ptr<scalar_t>(), k_cache.const_data_ptr<kv_t>(), v_cache.const_data_ptr<kv_t>(), ksp, vsp,
        block_tables.const_data_ptr<int64_t>(), context_lens.const_data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
        b, Hq, Hk, d, NB, bs, mb, static_cast<acc_t>(scale));
  };
  switch (d) {
    case 32: run(std::integral_constant<int64_t, 32>{}); break;
    case 64: run(std::integral_constant<int64_t, 64>{}); break;
    case 128: run(std::integral_constant<int64_t, 128>{}); break;
    default: run(std::integral_constant<int64_t, 0>{});
  }
}

}  // namespace

at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                      const std::optional<at::Tensor>& k_scale,
                                      const std::optional<at::Tensor>& v_scale) {
  // Values the shapes cannot vouch for, checked before any thread reads through them: every context is
  // 1..max_blocks * block_size keys long and the blocks it covers exist (entries past it are never read).
  const int64_t b = q.size(0), NB = k_cache.size(1), bs = k_cache.size(2), mb = block_tables.size(1);
  const int64_t* cl = context_lens.const_data_ptr<int64_t>();
  const int64_t* bt = block_tables.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i) {
    TORCH_CHECK(cl[i] >= 1 && cl[i] <= mb * bs, "paged_decode_attention: context_lens[", i, "] = ", cl[i],
                " is outside [1, max_blocks * block_size = ", mb * bs, "]");
    for (int64_t blk = 0; blk < (cl[i] + bs - 1) / bs; ++blk)
      TORCH_CHECK(bt[i * mb + blk] >= 0 && bt[i * mb + blk] < NB, "paged_decode_attention: block_tables[", i, ", ",
                  blk, "] = ", bt[i * mb + blk], " is not a block of the cache (num_blocks = ", NB, ")");
  }
  auto out = at::empty_like(q);
  if (b == 0) return out;
  const bool quantized = k_cache.scalar_type() == at::kChar;
  const float* ksp = quantized ? k_scale->const_data_ptr<float>() : nullptr;
  const float* vsp = quantized ? v_scale->const_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention_cpu", [&] {
    if (quantized) {
      launch<scalar_t, int8_t>(q, k_cache, v_cache, ksp, vsp, block_tables, context_lens, out, scale);
    } else {
      launch<scalar_t, scalar_t>(q, k_cache, v_cache, ksp, vsp, block_tables, context_lens, out, scale);
    }
  });
  return out;
}

}  // namespace puyu
