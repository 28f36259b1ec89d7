// One query tile of one KV head through AVX512-BF16 dot products (bf16 inputs, fp32
// accumulation): the prefill path where the CPU has them (Zen 4, Sapphire Rapids).
//
// The fp32 path converts every K/V row to fp32 and transposes each key block; here the
// tile's queries are laid out once as dim pairs by row, qp[p][r] = (q[r][2p], q[r][2p+1]),
// so that one vdpbf16ps takes a key's dim pair (broadcast straight from its cached bf16
// row) against 16 rows. Scores come out with rows in lanes, which makes the softmax's
// per-row max and sum plain vector operations. P.V pairs keys instead: V rows are
// interleaved two keys at a time, P as bf16 pairs per row (rounded as torch's CPU flash
// kernel rounds them; the row sums keep fp32).
#pragma once

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define LOOM_HAVE_BF16_TILE 1

namespace loom_bf16 {

constexpr int64_t KB = 32;        // keys per block
constexpr int64_t MAX_ROWS = 64;  // rows per tile: at most 4 vectors of 16

struct Scratch {
  std::vector<uint32_t> qp, pairs;
  std::vector<float> scores, acc;
  std::vector<int32_t> vp;  // [KB / 2][d / 16] vectors of 16
  std::vector<int32_t> qpos;
  explicit Scratch(int64_t d)
      : qp(d / 2 * MAX_ROWS), pairs(KB / 2 * MAX_ROWS), scores(KB * MAX_ROWS),
        acc(MAX_ROWS * d), vp(KB / 2 * d), qpos(MAX_ROWS) {}
};

// What one tile reads and writes. Row r is token tok0 + r / group, query head
// h * group + r % group; key j lives at slot slots[j] with position kpos[j].
struct TileArgs {
  const at::BFloat16 *q, *k, *v;
  at::BFloat16* out;
  int64_t q_s0, q_s1, k_s0, k_s1, v_s0, v_s1, heads;
  int64_t tok0, ntok, group, h;
  const int64_t *slots, *kpos, *qpos;
  int64_t n_keys;
  float scale;
};

inline __m512 exp_nonpos512(__m512 x) {
  return (__m512)exp_nonpos((v16)x);
}

template <int64_t d, int RV>
void attend_tile(const TileArgs& a, Scratch& w) {
  constexpr int64_t P = d / 2, DV = d / 16;
  constexpr int ROWS_AT_ONCE = DV <= 8 ? 2 : 1;  // P.V accumulators: 2 x DV registers
  const int64_t rows = a.ntok * a.group, padded = RV * 16;
  int32_t max_qpos = std::numeric_limits<int32_t>::min();
  for (int64_t r = 0; r < padded; ++r) {
    if (r < rows) {
      const int64_t t = a.tok0 + r / a.group, head = a.h * a.group + r % a.group;
      const uint32_t* src = reinterpret_cast<const uint32_t*>(a.q + t * a.q_s0 + head * a.q_s1);
      for (int64_t p = 0; p < P; ++p) w.qp[p * MAX_ROWS + r] = src[p];
      w.qpos[r] = clip_pos(a.qpos[t]);
      max_qpos = std::max(max_qpos, w.qpos[r]);
    } else {
      for (int64_t p = 0; p < P; ++p) w.qp[p * MAX_ROWS + r] = 0;
      w.qpos[r] = std::numeric_limits<int32_t>::min();  // sees nothing
    }
  }
  std::fill(w.acc.begin(), w.acc.begin() + padded * d, 0.0f);
  __m512 m[RV], l[RV];
  for (int v = 0; v < RV; ++v) {
    m[v] = _mm512_set1_ps(NEG_INF);
    l[v] = _mm512_setzero_ps();
  }
  const __m512 scale = _mm512_set1_ps(a.scale), neg_inf = _mm512_set1_ps(NEG_INF);
  alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5,
                                               37, 6, 38, 7, 39, 8, 40, 9, 41, 10, 42,
                                               11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i idx_lo = _mm512_load_si512(kLo);
  const __m512i idx_hi = _mm512_add_epi16(idx_lo, _mm512_set1_epi16(16));
  alignas(64) static const uint32_t kZeroRow[128] = {};
  int32_t kpos[KB];

  for (int64_t j0 = 0; j0 < a.n_keys; j0 += KB) {
    const int64_t nb = std::min(KB, a.n_keys - j0);
    int32_t min_kpos = std::numeric_limits<int32_t>::max();
    for (int64_t j = 0; j < KB; ++j) {
      kpos[j] = j < nb ? clip_pos(a.kpos[j0 + j]) : std::numeric_limits<int32_t>::max();
      min_kpos = std::min(min_kpos, kpos[j]);
    }
    if (min_kpos > max_qpos) continue;
    const uint32_t* krow[KB];
    const at::BFloat16* vrow[KB];
    for (int64_t j = 0; j < KB; ++j) {
      if (j < nb) {
        const int64_t slot = a.slots[j0 + j];
        krow[j] = reinterpret_cast<const uint32_t*>(a.k + slot * a.k_s0 + a.h * a.k_s1);
        vrow[j] = a.v + slot * a.v_s0 + a.h * a.v_s1;
      } else {
        krow[j] = kZeroRow;
        vrow[j] = reinterpret_cast<const at::BFloat16*>(kZeroRow);
      }
    }
    // Scores, rows in lanes: four keys at a time keep 4 x RV accumulators in flight.
    for (int64_t j = 0; j < nb; j += 4) {
      __m512 s[4][RV];
      for (int i = 0; i < 4; ++i)
        for (int v = 0; v < RV; ++v) s[i][v] = _mm512_setzero_ps();
      for (int64_t p = 0; p < P; ++p) {
        __m512i b[4];
        for (int i = 0; i < 4; ++i) b[i] = _mm512_set1_epi32(static_cast<int>(krow[j + i][p]));
        for (int v = 0; v < RV; ++v) {
          const __m512i qv = _mm512_loadu_si512(&w.qp[p * MAX_ROWS + v * 16]);
          for (int i = 0; i < 4; ++i)
            s[i][v] = _mm512_dpbf16_ps(s[i][v], (__m512bh)qv, (__m512bh)b[i]);
        }
      }
      for (int i = 0; i < 4; ++i)
        for (int v = 0; v < RV; ++v) _mm512_storeu_ps(&w.scores[(j + i) * MAX_ROWS + v * 16], s[i][v]);
    }
    // Scale and mask, then the online softmax per row (all lanes at once).
    const int64_t nb2 = (nb + 1) / 2 * 2;
    for (int v = 0; v < RV; ++v) {
      const __m512i qp = _mm512_loadu_si512(&w.qpos[v * 16]);
      __m512 bm = neg_inf;
      for (int64_t j = 0; j < nb; ++j) {
        float* sj = &w.scores[j * MAX_ROWS + v * 16];
        const __mmask16 seen = _mm512_cmple_epi32_mask(_mm512_set1_epi32(kpos[j]), qp);
        const __m512 sv = _mm512_mask_mul_ps(neg_inf, seen, _mm512_loadu_ps(sj), scale);
        _mm512_storeu_ps(sj, sv);
        bm = _mm512_max_ps(bm, sv);
      }
      const __m512 m_new = _mm512_max_ps(m[v], bm);
      // A row that has seen nothing yet keeps m = -inf; subtract 0 there (not -inf - -inf).
      const __mmask16 none = _mm512_cmp_ps_mask(m_new, neg_inf, _CMP_EQ_OQ);
      const __m512 m_use = _mm512_mask_mov_ps(m_new, none, _mm512_setzero_ps());
      const __m512 alpha = exp_nonpos512(_mm512_sub_ps(m[v], m_use));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < nb2; j += 2) {
        __m512 p0 = exp_nonpos512(_mm512_sub_ps(_mm512_loadu_ps(&w.scores[j * MAX_ROWS + v * 16]), m_use));
        __m512 p1 = j + 1 < nb
                        ? exp_nonpos512(_mm512_sub_ps(
                              _mm512_loadu_ps(&w.scores[(j + 1) * MAX_ROWS + v * 16]), m_use))
                        : _mm512_setzero_ps();
        sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
        const __m512i r0 = (__m512i)round_bf16((v16)p0), r1 = (__m512i)round_bf16((v16)p1);
        const __m512i lo = _mm512_srli_epi32(r0, 16);
        const __m512i hi = _mm512_and_si512(r1, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
        _mm512_storeu_si512(&w.pairs[j / 2 * MAX_ROWS + v * 16], _mm512_or_si512(lo, hi));
      }
      l[v] = _mm512_add_ps(_mm512_mul_ps(l[v], alpha), sum);
      m[v] = m_new;
      alignas(64) float al[16];
      _mm512_store_ps(al, alpha);
      for (int i = 0; i < 16; ++i) {
        float* ar = &w.acc[(v * 16 + i) * d];
        if (al[i] != 1.0f)
          for (int64_t c = 0; c < DV; ++c)
            _mm512_storeu_ps(ar + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(ar + 16 * c), _mm512_set1_ps(al[i])));
      }
    }
    // V two keys at a time, interleaved by dim: vp[jp][c] = (v[2jp][x], v[2jp+1][x]) pairs.
    for (int64_t jp = 0; jp < nb2 / 2; ++jp) {
      const at::BFloat16 *v0 = vrow[2 * jp], *v1 = vrow[2 * jp + 1];
      for (int64_t c = 0; c < d / 32; ++c) {
        const __m512i x0 = _mm512_loadu_si512(v0 + 32 * c), x1 = _mm512_loadu_si512(v1 + 32 * c);
        int32_t* dst = &w.vp[(jp * DV + 2 * c) * 16];
        _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(x0, idx_lo, x1));
        _mm512_storeu_si512(dst + 16, _mm512_permutex2var_epi16(x0, idx_hi, x1));
      }
    }
    for (int64_t r = 0; r < rows; r += ROWS_AT_ONCE) {
      __m512 acc[ROWS_AT_ONCE][DV];
      for (int i = 0; i < ROWS_AT_ONCE; ++i)
        for (int64_t c = 0; c < DV; ++c) acc[i][c] = _mm512_loadu_ps(&w.acc[(r + i) * d + 16 * c]);
      for (int64_t jp = 0; jp < nb2 / 2; ++jp) {
        __m512i b[ROWS_AT_ONCE];
        for (int i = 0; i < ROWS_AT_ONCE; ++i)
          b[i] = _mm512_set1_epi32(static_cast<int>(w.pairs[jp * MAX_ROWS + r + i]));
        for (int64_t c = 0; c < DV; ++c) {
          const __m512i vv = _mm512_loadu_si512(&w.vp[(jp * DV + c) * 16]);
          for (int i = 0; i < ROWS_AT_ONCE; ++i)
            acc[i][c] = _mm512_dpbf16_ps(acc[i][c], (__m512bh)vv, (__m512bh)b[i]);
        }
      }
      for (int i = 0; i < ROWS_AT_ONCE; ++i)
        for (int64_t c = 0; c < DV; ++c) _mm512_storeu_ps(&w.acc[(r + i) * d + 16 * c], acc[i][c]);
    }
  }
  alignas(64) float lsum[RV * 16];
  for (int v = 0; v < RV; ++v) _mm512_store_ps(&lsum[v * 16], l[v]);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = a.tok0 + r / a.group, head = a.h * a.group + r % a.group;
    const __m512 inv = _mm512_set1_ps(lsum[r] > 0.0f ? 1.0f / lsum[r] : 0.0f);
    at::BFloat16* o = a.out + (t * a.heads + head) * d;
    for (int64_t c = 0; c < DV; ++c) {  // round to nearest even, 16 at a time
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(&w.acc[r * d + 16 * c]), inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * c), (__m256i)h);
    }
  }
}

// The tile's row count picks how many 16-row vectors the loops carry.
template <int64_t d>
void attend_tile_any(const TileArgs& a, Scratch& w) {
  switch ((a.ntok * a.group + 15) / 16) {
    case 1: return attend_tile<d, 1>(a, w);
    case 2: return attend_tile<d, 2>(a, w);
    case 3: return attend_tile<d, 3>(a, w);
    default: return attend_tile<d, 4>(a, w);
  }
}

}  // namespace loom_bf16

#endif
