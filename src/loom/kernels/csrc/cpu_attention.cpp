// Paged attention for the CPU: one kernel for prefill, decode and mixed steps.
//
// Queries q [T, H, D] attend to keys and values read straight from the page pool
// k, v [slots, KVH, D] through each sequence's slot list key_rows [S, L]. A key j of
// sequence s is seen by query t when j < kv_lens[s] and key_pos[s, j] <= q_pos[t] (a dead
// slot carries a position no query reaches), which is causal order by position.
//
// Work items are (query tile, KV head): the query heads sharing a KV head are folded into
// the tile's rows, so each key block is read once for all of them. Keys are taken in
// blocks of KB with an online softmax (running max and sum per row, fp32 throughout);
// a block whose smallest position is past every query of the tile is skipped, which
// skips the masked half of a causal prefill. Items are handed out dynamically, heaviest
// first, so a causal prefill's long tail does not land on one thread.
//
// Vectors use GCC/Clang vector extensions: AVX-512 where the build machine has it,
// narrower registers elsewhere, from the same source. Prefill tiles of bf16 models take
// AVX512-BF16 dot products where the CPU has them (bf16_tile.h): 2.4x the fp32 path on
// a 512-token causal prefill (Zen 4).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

#include "vec.h"
#include "bf16_tile.h"

namespace {

constexpr int64_t KB = 32;        // keys per block
constexpr int64_t MAX_ROWS = 64;  // query rows (token x folded head) per tile
constexpr int64_t ROW_DOT_MAX = 8;  // tiles this small take dot products key by key

struct Tile {
  int64_t seq, tok0, tok1, work;
};

// One work item: a query tile and the KV heads [h0, h0 + num_heads) it covers. A decode
// item covers every KV head, so it reads each key slot's K/V rows (contiguous across
// heads) in one sweep; a prefill item covers one head and has many rows to share a block.
struct Item {
  int64_t tile, h0, num_heads;
};

struct Scratch {
  std::vector<float> q, k, kt, v, score, acc, m, l;
  std::vector<int32_t> qpos, kpos;
#ifdef LOOM_HAVE_BF16_TILE
  loom_bf16::Scratch bf16;
#endif
  int64_t d;  // head dim the buffers are sized for
  explicit Scratch(int64_t d_)
      : q(MAX_ROWS * d_), k(KB * d_), kt(KB * d_), v(KB * d_),
        score(MAX_ROWS * KB), acc(MAX_ROWS * d_), m(MAX_ROWS), l(MAX_ROWS), qpos(MAX_ROWS),
        kpos(KB)
#ifdef LOOM_HAVE_BF16_TILE
        , bf16(d_)
#endif
        , d(d_) {}
};

// Scores [rows, KB] of rows q [rows, d] against one key block k [KB, d]: key by key for a
// few rows (decode), through the transposed block for many (prefill), where four rows
// share each load. ``padded`` rows (a multiple of 4, zeros past ``rows``) are computed.
template <int64_t d>
void block_scores(const float* q, const float* k, float* kt, float* score, int64_t rows,
                  int64_t padded, int64_t nb) {
  if (rows <= ROW_DOT_MAX) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = q + r * d;
      for (int64_t j0 = 0; j0 < KB; j0 += 16) {
        v16 part[16];
        for (int64_t j = 0; j < 16; ++j) {
          const float* kr = k + (j0 + j) * d;
          v16 a = load(qr) * load(kr);
#pragma GCC unroll 16
          for (int64_t i = 16; i < d; i += 16) a += load(qr + i) * load(kr + i);
          part[j] = a;
        }
        store(score + r * KB + j0, reduce16(part));
        if (j0 + 16 >= nb) break;
      }
    }
    return;
  }
  for (int64_t j = 0; j < KB; ++j)
    for (int64_t i = 0; i < d; ++i) kt[i * KB + j] = k[j * d + i];
  for (int64_t r0 = 0; r0 < padded; r0 += 4) {
    v16 a[4][2] = {};
    for (int64_t i = 0; i < d; ++i) {
      v16 k0 = load(&kt[i * KB]), k1 = load(&kt[i * KB + 16]);
      for (int r = 0; r < 4; ++r) {
        float qv = q[(r0 + r) * d + i];
        a[r][0] += qv * k0;
        a[r][1] += qv * k1;
      }
    }
    for (int r = 0; r < 4; ++r) {
      store(&score[(r0 + r) * KB], a[r][0]);
      store(&score[(r0 + r) * KB + 16], a[r][1]);
    }
  }
}

// Masks the block's scores, updates each row's running max m and sum l, and accumulates
// P.V into acc [rows, d] (v [KB, d]).
template <int64_t d, bool bf16_probs>
void block_update(float* score, const int32_t* qpos, const int32_t* kpos, float* m, float* l,
                  float* acc, const float* v, int64_t rows, int64_t nb) {
  v16i kp0, kp1;
  std::memcpy(&kp0, kpos, sizeof(kp0));
  std::memcpy(&kp1, kpos + 16, sizeof(kp1));
  for (int64_t r = 0; r < rows; ++r) {
    float* s = score + r * KB;
    v16i qp = v16i{} + qpos[r];
    v16 s0 = (kp0 <= qp) ? load(s) : splat(NEG_INF);
    v16 s1 = (kp1 <= qp) ? load(s + 16) : splat(NEG_INF);
    float m_new = std::max(m[r], hmax(s0 > s1 ? s0 : s1));
    if (m_new == NEG_INF) continue;  // nothing seen yet
    v16 p0 = exp_nonpos(s0 - m_new), p1 = exp_nonpos(s1 - m_new);
    float alpha = m[r] == NEG_INF ? 0.0f : exp_nonpos(splat(m[r] - m_new))[0];
    l[r] = l[r] * alpha + hsum(p0 + p1);
    m[r] = m_new;
    if constexpr (bf16_probs) {
      // As torch's CPU flash kernel (and so transformers) does for bf16: the sum takes
      // the fp32 probabilities, P.V the bf16-rounded ones. bf16 greedy decoding then
      // follows transformers token for token far longer than with fp32 probabilities.
      p0 = round_bf16(p0);
      p1 = round_bf16(p1);
    }
    store(s, p0);
    store(s + 16, p1);
    float* ar = acc + r * d;
    // The row's accumulator in registers: up to four vectors at a time.
    constexpr int64_t n = d / 16 < 4 ? d / 16 : 4;
#pragma GCC unroll 4
    for (int64_t i0 = 0; i0 < d; i0 += 16 * n) {
      v16 a[n];
#pragma GCC unroll 4
      for (int64_t c = 0; c < n; ++c) a[c] = load(ar + i0 + 16 * c) * alpha;
      for (int64_t j = 0; j < nb; ++j) {
        float pj = s[j];
        const float* vr = v + j * d + i0;
#pragma GCC unroll 4
        for (int64_t c = 0; c < n; ++c) a[c] += pj * load(vr + 16 * c);
      }
#pragma GCC unroll 4
      for (int64_t c = 0; c < n; ++c) store(ar + i0 + 16 * c, a[c]);
    }
  }
}

template <typename scalar_t, int64_t d>
void attend_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& key_rows, const at::Tensor& key_pos,
                 const at::Tensor& kv_lens, const at::Tensor& seq_indptr,
                 const at::Tensor& q_pos, double scale, at::Tensor& out) {
  const int64_t heads = q.size(1), kv_heads = k_cache.size(1);
  const int64_t group = heads / kv_heads, max_kv = key_rows.size(1);
  const int64_t num_seqs = kv_lens.size(0);
  // Tokens per tile: one head's rows (tokens x group), padded to 4, fit MAX_ROWS.
  const int64_t tile_tokens = MAX_ROWS / group;
  const int64_t* rows_p = key_rows.data_ptr<int64_t>();
  const int64_t* kpos_p = key_pos.data_ptr<int64_t>();
  const int64_t* lens_p = kv_lens.data_ptr<int64_t>();
  const int64_t* indptr_p = seq_indptr.data_ptr<int64_t>();
  const int64_t* qpos_p = q_pos.data_ptr<int64_t>();
  const scalar_t* q_p = q.data_ptr<scalar_t>();
  const scalar_t* k_p = k_cache.data_ptr<scalar_t>();
  const scalar_t* v_p = v_cache.data_ptr<scalar_t>();
  scalar_t* out_p = out.data_ptr<scalar_t>();
  const int64_t q_s0 = q.stride(0), q_s1 = q.stride(1);
  const int64_t k_s0 = k_cache.stride(0), k_s1 = k_cache.stride(1);
  const int64_t v_s0 = v_cache.stride(0), v_s1 = v_cache.stride(1);

  std::vector<Tile> tiles;
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int64_t t = indptr_p[s]; t < indptr_p[s + 1]; t += tile_tokens) {
      int64_t t1 = std::min(t + tile_tokens, indptr_p[s + 1]);
      // Keys a tile sees, roughly: its sequence's length up to its last query.
      int64_t work = (lens_p[s] - (indptr_p[s + 1] - t1)) * (t1 - t);
      tiles.push_back({s, t, t1, work});
    }
  }
  std::stable_sort(tiles.begin(), tiles.end(),
                   [](const Tile& a, const Tile& b) { return a.work > b.work; });
  const int64_t threads = at::get_num_threads();
  // All heads in one item when the tiles alone keep every thread busy and their rows fit.
  const bool wide = static_cast<int64_t>(tiles.size()) >= 2 * threads;
  std::vector<Item> items;
  for (int64_t i = 0; i < static_cast<int64_t>(tiles.size()); ++i) {
    const int64_t padded = ((tiles[i].tok1 - tiles[i].tok0) * group + 3) / 4 * 4;
    if (wide && padded * kv_heads <= MAX_ROWS) {
      items.push_back({i, 0, kv_heads});
    } else {
      for (int64_t h = 0; h < kv_heads; ++h) items.push_back({i, h, 1});
    }
  }
  const int64_t num_items = static_cast<int64_t>(items.size());
  std::atomic<int64_t> next{0};
  const float fscale = static_cast<float>(scale);

  auto run_item = [&](Scratch& w, const Item& item) {
    const Tile& tile = tiles[item.tile];
    const int64_t rows = (tile.tok1 - tile.tok0) * group;  // per head
    const int64_t padded = (rows + 3) / 4 * 4;
#ifdef LOOM_HAVE_BF16_TILE
    if constexpr (std::is_same_v<scalar_t, at::BFloat16> && d >= 32) {
      if (rows > ROW_DOT_MAX) {  // a prefill tile: bf16 dot products, head by head
        const int64_t s = tile.seq;
        for (int64_t hs = 0; hs < item.num_heads; ++hs) {
          const loom_bf16::TileArgs a{q_p, k_p, v_p, out_p, q_s0, q_s1, k_s0, k_s1, v_s0, v_s1,
                                      heads, tile.tok0, tile.tok1 - tile.tok0, group,
                                      item.h0 + hs, rows_p + s * max_kv, kpos_p + s * max_kv,
                                      qpos_p, lens_p[s], fscale};
          loom_bf16::attend_tile_any<d>(a, w.bf16);
        }
        return;
      }
    }
#endif
    int32_t max_qpos = std::numeric_limits<int32_t>::min();
    // Scratch rows: head hs of the item owns [hs * padded, (hs + 1) * padded).
    for (int64_t hs = 0; hs < item.num_heads; ++hs) {
      for (int64_t r = 0; r < padded; ++r) {
        const int64_t row = hs * padded + r;
        float* qr = &w.q[row * d];
        w.m[row] = NEG_INF;
        w.l[row] = 0.0f;
        std::fill(&w.acc[row * d], &w.acc[row * d] + d, 0.0f);
        if (r >= rows) {
          std::fill(qr, qr + d, 0.0f);
          w.qpos[row] = std::numeric_limits<int32_t>::min();
          continue;
        }
        const int64_t t = tile.tok0 + r / group;
        const int64_t head = (item.h0 + hs) * group + r % group;
        row_to_float(q_p + t * q_s0 + head * q_s1, qr, d);
        for (int64_t i = 0; i < d; ++i) qr[i] *= fscale;
        w.qpos[row] = clip_pos(qpos_p[t]);
        max_qpos = std::max(max_qpos, w.qpos[row]);
      }
    }
    const int64_t s = tile.seq, n_keys = lens_p[s];
    for (int64_t j0 = 0; j0 < n_keys; j0 += KB) {
      const int64_t nb = std::min(KB, n_keys - j0);
      int32_t min_kpos = std::numeric_limits<int32_t>::max();
      for (int64_t j = 0; j < KB; ++j) {
        w.kpos[j] = j < nb ? clip_pos(kpos_p[s * max_kv + j0 + j])
                           : std::numeric_limits<int32_t>::max();
        min_kpos = std::min(min_kpos, w.kpos[j]);
      }
      if (min_kpos > max_qpos) continue;  // every key here is masked for every row
      // Ask for the next block's rows now: after a pass over the weights the KV pages are
      // out of cache, and a head's rows lie a slot apart (beyond the hardware prefetcher's
      // reach at batch 1: 170 us per layer cold, against 25 us warm).
      const int64_t next_end = std::min(j0 + 2 * KB, n_keys);
      for (int64_t j = j0 + KB; j < next_end; ++j) {
        const int64_t slot = rows_p[s * max_kv + j];
        const char* kr = reinterpret_cast<const char*>(k_p + slot * k_s0 + item.h0 * k_s1);
        const char* vr = reinterpret_cast<const char*>(v_p + slot * v_s0 + item.h0 * v_s1);
        const int64_t bytes = ((item.num_heads - 1) * k_s1 + d) * sizeof(scalar_t);
        for (int64_t off = 0; off < bytes; off += 64) {
          __builtin_prefetch(kr + off);
          __builtin_prefetch(vr + off);
        }
      }
      // Head by head through the block: one head's fp32 K and V (2 x KB x d) stay in L1.
      // The slot's other heads share its cache lines, which the prefetch above brought.
      for (int64_t hs = 0; hs < item.num_heads; ++hs) {
        const int64_t h = item.h0 + hs;
        for (int64_t j = 0; j < nb; ++j) {
          const int64_t slot = rows_p[s * max_kv + j0 + j];
          row_to_float(k_p + slot * k_s0 + h * k_s1, &w.k[j * d], d);
          row_to_float(v_p + slot * v_s0 + h * v_s1, &w.v[j * d], d);
        }
        // Keys past nb: zeros, not stale rows (0 * NaN would poison the sums).
        std::fill(&w.k[nb * d], &w.k[KB * d], 0.0f);
        std::fill(&w.v[nb * d], &w.v[KB * d], 0.0f);
        const int64_t r0 = hs * padded;
        block_scores<d>(&w.q[r0 * d], w.k.data(), w.kt.data(), &w.score[r0 * KB], rows, padded,
                        nb);
        block_update<d, std::is_same_v<scalar_t, at::BFloat16>>(
            &w.score[r0 * KB], &w.qpos[r0], w.kpos.data(), &w.m[r0], &w.l[r0], &w.acc[r0 * d],
            w.v.data(), rows, nb);
      }
    }
    for (int64_t hs = 0; hs < item.num_heads; ++hs) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = hs * padded + r;
        const int64_t t = tile.tok0 + r / group;
        const int64_t head = (item.h0 + hs) * group + r % group;
        const float inv = w.l[row] > 0.0f ? 1.0f / w.l[row] : 0.0f;  // no key seen: zeros
        scalar_t* o = out_p + (t * heads + head) * d;
        for (int64_t i = 0; i < d; ++i) o[i] = static_cast<scalar_t>(w.acc[row * d + i] * inv);
      }
    }
  };

  const int64_t workers = std::max<int64_t>(1, std::min(threads, num_items));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // Each thread keeps its scratch between calls: allocating and zeroing ~120 KB per
    // call and layer would cost about a third of a batch-1 decode call.
    thread_local std::unique_ptr<Scratch> kept;
    if (!kept || kept->d != d) kept = std::make_unique<Scratch>(d);
    for (int64_t i = next++; i < num_items; i = next++) run_item(*kept, items[i]);
  });
}

// Head dims compiled in, so a row's vectors stay in registers.
template <typename scalar_t>
void attend_dim(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& rows, const at::Tensor& pos, const at::Tensor& lens,
                const at::Tensor& indptr, const at::Tensor& q_pos, double scale,
                at::Tensor& out) {
  switch (q.size(2)) {
    case 16: return attend_impl<scalar_t, 16>(q, k, v, rows, pos, lens, indptr, q_pos, scale, out);
    case 32: return attend_impl<scalar_t, 32>(q, k, v, rows, pos, lens, indptr, q_pos, scale, out);
    case 64: return attend_impl<scalar_t, 64>(q, k, v, rows, pos, lens, indptr, q_pos, scale, out);
    case 128: return attend_impl<scalar_t, 128>(q, k, v, rows, pos, lens, indptr, q_pos, scale, out);
    case 256: return attend_impl<scalar_t, 256>(q, k, v, rows, pos, lens, indptr, q_pos, scale, out);
    default: TORCH_CHECK(false, "head_dim must be 16, 32, 64, 128 or 256");
  }
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& key_rows,
                           const at::Tensor& key_pos, const at::Tensor& kv_lens,
                           const at::Tensor& seq_indptr, const at::Tensor& q_pos,
                           double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3,
              "q [T, H, D] and k/v [slots, KVH, D] expected");
  TORCH_CHECK(q.device().is_cpu(), "the CPU kernel takes CPU tensors");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() &&
                  q.scalar_type() == v_cache.scalar_type(),
              "q, k and v must share a dtype");
  const int64_t d = q.size(2);
  TORCH_CHECK(k_cache.size(2) == d && v_cache.size(2) == d, "q, k, v head_dim differ");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(2) == 1 && v_cache.stride(2) == 1,
              "rows must be contiguous");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0 && q.size(1) / k_cache.size(1) <= MAX_ROWS,
              "query heads must be a multiple of KV heads (at most 64 per KV head)");
  for (const at::Tensor* t : {&key_rows, &key_pos, &kv_lens, &seq_indptr, &q_pos})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "int64 indices expected");
  TORCH_CHECK(key_rows.sizes() == key_pos.sizes() && key_rows.size(0) == kv_lens.size(0),
              "key_rows and key_pos are [S, L], kv_lens [S]");
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention",
                                  [&] {
                                    if constexpr (std::is_same_v<scalar_t, double>) {
                                      TORCH_CHECK(false, "float64 is not supported");
                                    } else {
                                      attend_dim<scalar_t>(q, k_cache, v_cache, key_rows,
                                                           key_pos, kv_lens, seq_indptr,
                                                           q_pos, scale, out);
                                    }
                                  });
  return out;
}

}  // namespace

TORCH_LIBRARY(loom_cpu, m) {
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor key_rows, "
      "Tensor key_pos, Tensor kv_lens, Tensor seq_indptr, Tensor q_pos, float scale) -> "
      "Tensor");
}

TORCH_LIBRARY_IMPL(loom_cpu, CPU, m) { m.impl("paged_attention", &paged_attention); }
