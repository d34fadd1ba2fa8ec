// Clipped policy loss on the CPU: one elementwise pass + per-row sums (see ../policy_loss.h).
//
// Rows are split over threads with at::parallel_for; each row is one branch-free loop the
// compiler vectorizes (selects on loaded values only, see TokenIn; a polynomial exp for float;
// checked with -fopt-info-vec-missed, benchmarks/NOTES.md). The loop is
// specialized on the KL estimator, the rollout correction and the advantage layout ([B] or [B, T]);
// the entry points are compiled for AVX-512, AVX2 and baseline x86-64 (target_clones).
#include "../policy_loss.h"
#include "../policy_loss_args.h"
#include "../registry.h"
#include "fast_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>


namespace {

using axpo::pl::Prepared;
using axpo::pl::Ptrs;
using axpo::pl::pl_acc_type;

AXPO_CPU_INLINE float pl_exp(float x) { return axpo::cpu::exp_full(x); }
AXPO_CPU_INLINE double pl_exp(double x) { return std::exp(x); }
AXPO_CPU_INLINE float pl_exp_ratio(float x) { return axpo::cpu::exp_clamped(x); }  // x in [-20, 20] or NaN
AXPO_CPU_INLINE double pl_exp_ratio(double x) { return std::exp(x); }

template <typename acc_t>
struct Consts {
  acc_t lo, hi, c;  // 1 - clip_low, 1 + clip_high, clip_ratio_c (+inf: no dual clip)
  acc_t tis, cap;   // rollout correction: tis 1 weighs pg by min(pi_old / pi_rollout, cap)
};

// One token's inputs, read from its row. A masked-out token computes on zeros (finite numbers)
// and each of its terms is then multiplied by mf = 0 (x * 1 is x, NaN and inf included). The
// selects are on loaded values only: GCC 12 sinks a computation under a select of its result
// (`m ? pg : 0`) and then cannot if-convert the loop, which stays scalar (measured 34 -> 3.2 ns
// a token, forward, AVX-512). m comes from the byte converted to acc_t: a byte compare gives a
// byte-wide mask, for which GCC finds no vector type next to the float loads.
template <typename acc_t>
struct TokenIn {
  acc_t mf, lp, old, a, ref, roll;  // mf: 1 / 0

  template <typename scalar_t, int kKl, bool kCorr, bool kAdvRow>
  AXPO_CPU_INLINE static TokenIn load(const scalar_t* lp_row, const acc_t* old_row, const acc_t* adv_row,
                                      acc_t a_row, const uint8_t* m_row, const acc_t* ref_row,
                                      const acc_t* roll_row, int64_t t) {
    const bool m = static_cast<acc_t>(m_row[t]) != acc_t(0);
    const acc_t lp = static_cast<acc_t>(lp_row[t]), old = old_row[t];
    const acc_t a = kAdvRow ? a_row : adv_row[t];
    acc_t ref = acc_t(0), roll = acc_t(0);
    if constexpr (kKl != 0) ref = ref_row[t];
    if constexpr (kCorr) roll = roll_row[t];
    const acc_t z = acc_t(0);
    return {m ? acc_t(1) : z, m ? lp : z, m ? old : z, m ? a : z, m ? ref : z, m ? roll : z};
  }
};

// The loss pieces of one token (see ../policy_loss.h); kDual: dual clip on (always, with +inf
// for none: see fwd_rows).
template <typename acc_t, bool kDual>
struct Token {
  acc_t dc, r, na, pg1, pg2, c1, pg3, pg;
  acc_t in_clamp, neg;  // 1 / 0 flags: bool members keep GCC 12 from vectorizing the loops

  AXPO_CPU_INLINE Token(acc_t lp, acc_t old, acc_t a, const Consts<acc_t>& k) {
    const acc_t d = lp - old;
    in_clamp = (d >= acc_t(-20)) ? ((d <= acc_t(20)) ? acc_t(1) : acc_t(0)) : acc_t(0);
    dc = d < acc_t(-20) ? acc_t(-20) : (d > acc_t(20) ? acc_t(20) : d);  // NaN stays NaN
    r = pl_exp_ratio(dc);
    na = -a;
    pg1 = na * r;
    const acc_t rc = r < k.lo ? k.lo : (r > k.hi ? k.hi : r);
    pg2 = na * rc;
    // torch.maximum. NaN: pg1 and pg2 are NaN together (r > 0 and clamp(r) > 0 are finite),
    // and a NaN pg1 fails the comparison and is kept.
    c1 = pg2 > pg1 ? pg2 : pg1;
    neg = a < acc_t(0) ? acc_t(1) : acc_t(0);
    pg = c1;
    pg3 = acc_t(0);
    if constexpr (kDual) {
      pg3 = na * k.c;
      const acc_t c2 = pg3 < c1 ? pg3 : c1;  // torch.min(pg3, c1); a NaN c1 is kept
      pg = a < acc_t(0) ? c2 : c1;
    }
  }

  // d pg / d logp, with the tie rules of autograd (clamp inclusive, max / min halves).
  AXPO_CPU_INLINE acc_t grad(const Consts<acc_t>& k) const {
    const bool tie = pg1 == pg2;
    const acc_t g1 = pg1 > pg2 ? acc_t(1) : (tie ? acc_t(0.5) : acc_t(0));
    const acc_t g2 = pg2 > pg1 ? acc_t(1) : (tie ? acc_t(0.5) : acc_t(0));
    const bool in_r = (r >= k.lo) & (r <= k.hi);
    acc_t gc1 = acc_t(1);
    if constexpr (kDual) {
      const acc_t gd = c1 < pg3 ? acc_t(1) : (c1 == pg3 ? acc_t(0.5) : acc_t(0));
      gc1 = neg != acc_t(0) ? gd : acc_t(1);
    }
    const acc_t dr = gc1 * (g1 * na + (in_r ? g2 * na : acc_t(0)));
    return in_clamp != acc_t(0) ? dr * r : acc_t(0);
  }
};

// kl (kKl = 1, 2, 3, 4: k1, k2, k3, k3 * r) and its derivative w.r.t. logp; r is the token's
// clamped ratio, in_clamp its 1 / 0 flag (dr / dlogp = r inside the clamp, 0 outside).
template <typename acc_t, int kKl>
AXPO_CPU_INLINE acc_t kl_value(acc_t lp, acc_t ref, acc_t r) {
  if constexpr (kKl == 1) return lp - ref;
  if constexpr (kKl == 2) { const acc_t x = lp - ref; return acc_t(0.5) * (x * x); }
  if constexpr (kKl == 3 || kKl == 4) {
    const acc_t x = ref - lp;
    const acc_t k3 = pl_exp(x) - x - acc_t(1);
    return kKl == 4 ? k3 * r : k3;
  }
  return acc_t(0);
}
template <typename acc_t, int kKl>
AXPO_CPU_INLINE acc_t kl_grad(acc_t lp, acc_t ref, acc_t r, acc_t in_clamp) {
  if constexpr (kKl == 1) return acc_t(1);
  if constexpr (kKl == 2) return lp - ref;
  if constexpr (kKl == 3) return acc_t(1) - pl_exp(ref - lp);
  if constexpr (kKl == 4) {
    const acc_t x = ref - lp;
    const acc_t e = pl_exp(x);
    return (acc_t(1) - e) * r + (e - x - acc_t(1)) * (in_clamp * r);
  }
  return acc_t(0);
}

constexpr int64_t kTile = 512;      // tokens per forward tile: 8 buffers of 2 KiB (fp32) in L1
constexpr int64_t kBwdTile = 1024;  // tokens per backward tile: 4 KiB of fp32, stays in L1


// kCorr: rollout log-probs are read (the correction's weights and statistics). The dual-clip loop
// always runs, with clip_ratio_c = +inf when there is none: the same numbers (min(c1, +inf) = c1,
// no dual count, and a gradient factor of 1), and GCC 12 vectorizes it where it does not
// vectorize the plain one (measured: ~2.3 vs ~12 ns / token on AVX2).
template <typename scalar_t, typename acc_t, int kKl, bool kCorr, bool kAdvRow>
AXPO_CPU_INLINE void fwd_rows(const Ptrs& p, const Consts<acc_t>& k, acc_t* out, int64_t B,
                             int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) {
    const scalar_t* lp_row = static_cast<const scalar_t*>(p.logp) + b * p.s_logp;
    const acc_t* old_row = static_cast<const acc_t*>(p.old) + b * p.s_old;
    const acc_t* adv_row = static_cast<const acc_t*>(p.adv) + b * p.s_adv;
    const uint8_t* m_row = p.mask + b * p.s_mask;
    const acc_t* ref_row = static_cast<const acc_t*>(p.ref) + b * p.s_ref;
    const acc_t* roll_row = static_cast<const acc_t*>(p.roll) + b * p.s_roll;
    const acc_t a_row = kAdvRow ? adv_row[0] : acc_t(0);
    // Tiles: the math loop writes the masked per-token terms to L1 buffers (a loop without
    // reductions, which GCC vectorizes), then one simple vectorized sum per buffer.
    alignas(64) acc_t buf[kPlStats + 1][kTile];
    acc_t sums[kPlStats + 1] = {};
    for (int64_t t0 = 0; t0 < p.T; t0 += kTile) {
      const int64_t len = p.T - t0 < kTile ? p.T - t0 : kTile;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const int64_t t = t0 + j;
        const auto in = TokenIn<acc_t>::template load<scalar_t, kKl, kCorr, kAdvRow>(
            lp_row, old_row, adv_row, a_row, m_row, ref_row, roll_row, t);
        const acc_t mf = in.mf;
        const Token<acc_t, true> tok(in.lp, in.old, in.a, k);
        const acc_t clipped = tok.pg2 > tok.pg1 ? mf : acc_t(0);  // masked flag
        acc_t w = acc_t(1), lr = acc_t(0), trunc = acc_t(0);
        if constexpr (kCorr) {
          lr = in.old - in.roll;
          const acc_t rr = pl_exp(lr);
          trunc = (rr > k.cap ? acc_t(1) : acc_t(0)) * (k.tis * mf);
          w = rr > k.cap ? k.cap : rr;  // NaN stays NaN
          buf[kPlStats][j] = (tok.pg * w) * mf;  // the tis-weighted pg term
        }
        buf[0][j] = tok.pg * mf;
        acc_t klv = acc_t(0);
        if constexpr (kKl != 0) klv = kl_value<acc_t, kKl>(in.lp, in.ref, tok.r);
        buf[1][j] = klv * mf;
        buf[2][j] = mf;
        buf[3][j] = clipped * tok.neg;
        buf[4][j] = in.a > acc_t(0) ? clipped : acc_t(0);
        buf[5][j] = tok.c1 > tok.pg3 ? mf * tok.neg : acc_t(0);
        buf[6][j] = -tok.dc * mf;
        buf[7][j] = tok.r * mf;
        if constexpr (kCorr) {
          buf[8][j] = w * mf;
          buf[9][j] = trunc;
          buf[10][j] = lr * mf;
        }
      }
      for (int64_t q = 0; q < (kCorr ? kPlStats + 1 : kPlCoreStats); ++q) {
        acc_t s = 0;
        const acc_t* bq = buf[q];
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < len; ++j) s += bq[j];
        sums[q] += s;
      }
    }
    acc_t* o = out + b;
    const bool tis = kCorr && k.tis != acc_t(0);
    if (tis) sums[0] = sums[kPlStats];
    else sums[8] = sums[2];  // weights of 1
    for (int64_t q = 0; q < kPlStats; ++q) o[q * B] = sums[q];
  }
}

template <typename scalar_t, typename acc_t, int kKl, bool kCorr, bool kAdvRow>
AXPO_CPU_INLINE void bwd_rows(const Ptrs& p, const Consts<acc_t>& k, const acc_t* g, int64_t B,
                             scalar_t* grad, int64_t s_grad, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) {
    const scalar_t* lp_row = static_cast<const scalar_t*>(p.logp) + b * p.s_logp;
    const acc_t* old_row = static_cast<const acc_t*>(p.old) + b * p.s_old;
    const acc_t* adv_row = static_cast<const acc_t*>(p.adv) + b * p.s_adv;
    const uint8_t* m_row = p.mask + b * p.s_mask;
    const acc_t* ref_row = static_cast<const acc_t*>(p.ref) + b * p.s_ref;
    const acc_t* roll_row = static_cast<const acc_t*>(p.roll) + b * p.s_roll;
    scalar_t* g_row = grad + b * s_grad;
    const acc_t g_pg = g[b], g_kl = g[B + b];
    const acc_t a_row = kAdvRow ? adv_row[0] : acc_t(0);
    // Tiles through an acc_t buffer: the math loop and the store (with its dtype conversion)
    // vectorize separately.
    alignas(64) acc_t buf[kBwdTile];
    for (int64_t t0 = 0; t0 < p.T; t0 += kBwdTile) {
      const int64_t len = p.T - t0 < kBwdTile ? p.T - t0 : kBwdTile;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const int64_t t = t0 + j;
        const auto in = TokenIn<acc_t>::template load<scalar_t, kKl, kCorr, kAdvRow>(
            lp_row, old_row, adv_row, a_row, m_row, ref_row, roll_row, t);
        const Token<acc_t, true> tok(in.lp, in.old, in.a, k);
        acc_t w = acc_t(1);
        if constexpr (kCorr) {
          const acc_t rr = pl_exp(in.old - in.roll);
          w = rr > k.cap ? k.cap : rr;  // kCorr is tis here (the caller's corr == 2)
        }
        acc_t d = g_pg * (tok.grad(k) * w);
        if constexpr (kKl != 0) d += g_kl * kl_grad<acc_t, kKl>(in.lp, in.ref, tok.r, tok.in_clamp);
        buf[j] = d * in.mf;
      }
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) g_row[t0 + j] = static_cast<scalar_t>(buf[j]);
    }
  }
}

template <typename scalar_t, typename acc_t, bool kCorr, bool kAdvRow>
AXPO_CPU_INLINE void fwd_kl(int kl, const Ptrs& p, const Consts<acc_t>& k, acc_t* out, int64_t B,
                           int64_t b0, int64_t b1) {
  switch (kl) {
    case 1: fwd_rows<scalar_t, acc_t, 1, kCorr, kAdvRow>(p, k, out, B, b0, b1); break;
    case 2: fwd_rows<scalar_t, acc_t, 2, kCorr, kAdvRow>(p, k, out, B, b0, b1); break;
    case 3: fwd_rows<scalar_t, acc_t, 3, kCorr, kAdvRow>(p, k, out, B, b0, b1); break;
    case 4: fwd_rows<scalar_t, acc_t, 4, kCorr, kAdvRow>(p, k, out, B, b0, b1); break;
    default: fwd_rows<scalar_t, acc_t, 0, kCorr, kAdvRow>(p, k, out, B, b0, b1); break;
  }
}

template <typename scalar_t, typename acc_t, bool kCorr, bool kAdvRow>
AXPO_CPU_INLINE void bwd_kl(int kl, const Ptrs& p, const Consts<acc_t>& k, const acc_t* g,
                           int64_t B, scalar_t* grad, int64_t s_grad, int64_t b0, int64_t b1) {
  switch (kl) {
    case 1: bwd_rows<scalar_t, acc_t, 1, kCorr, kAdvRow>(p, k, g, B, grad, s_grad, b0, b1); break;
    case 2: bwd_rows<scalar_t, acc_t, 2, kCorr, kAdvRow>(p, k, g, B, grad, s_grad, b0, b1); break;
    case 3: bwd_rows<scalar_t, acc_t, 3, kCorr, kAdvRow>(p, k, g, B, grad, s_grad, b0, b1); break;
    case 4: bwd_rows<scalar_t, acc_t, 4, kCorr, kAdvRow>(p, k, g, B, grad, s_grad, b0, b1); break;
    default: bwd_rows<scalar_t, acc_t, 0, kCorr, kAdvRow>(p, k, g, B, grad, s_grad, b0, b1); break;
  }
}

// Non-template entry points carry the ISA clones; the templates above inline into each clone.
#define AXPO_PL_INSTANTIATE(NAME, scalar_t, acc_t)                                                \
  AXPO_CPU_CLONES void pl_fwd_##NAME(int kl, bool corr, bool adv_row, const Ptrs& p,              \
                                    const Consts<acc_t>& k, acc_t* out, int64_t B, int64_t b0,   \
                                    int64_t b1) {                                                 \
    if (corr) {                                                                                   \
      if (adv_row) fwd_kl<scalar_t, acc_t, true, true>(kl, p, k, out, B, b0, b1);                 \
      else fwd_kl<scalar_t, acc_t, true, false>(kl, p, k, out, B, b0, b1);                        \
    } else {                                                                                      \
      if (adv_row) fwd_kl<scalar_t, acc_t, false, true>(kl, p, k, out, B, b0, b1);                \
      else fwd_kl<scalar_t, acc_t, false, false>(kl, p, k, out, B, b0, b1);                       \
    }                                                                                             \
  }                                                                                               \
  AXPO_CPU_CLONES void pl_bwd_##NAME(int kl, bool corr, bool adv_row, const Ptrs& p,              \
                                    const Consts<acc_t>& k, const acc_t* g, int64_t B,           \
                                    scalar_t* grad, int64_t s_grad, int64_t b0, int64_t b1) {     \
    if (corr) {                                                                                   \
      if (adv_row) bwd_kl<scalar_t, acc_t, true, true>(kl, p, k, g, B, grad, s_grad, b0, b1);     \
      else bwd_kl<scalar_t, acc_t, true, false>(kl, p, k, g, B, grad, s_grad, b0, b1);            \
    } else {                                                                                      \
      if (adv_row) bwd_kl<scalar_t, acc_t, false, true>(kl, p, k, g, B, grad, s_grad, b0, b1);    \
      else bwd_kl<scalar_t, acc_t, false, false>(kl, p, k, g, B, grad, s_grad, b0, b1);           \
    }                                                                                             \
  }                                                                                               \
  inline void pl_fwd_dispatch(int kl, bool corr, bool adv_row, const Ptrs& p,                    \
                              const Consts<acc_t>& k, acc_t* out, int64_t B, int64_t b0,         \
                              int64_t b1, const scalar_t*) {                                      \
    pl_fwd_##NAME(kl, corr, adv_row, p, k, out, B, b0, b1);                                       \
  }                                                                                               \
  inline void pl_bwd_dispatch(int kl, bool corr, bool adv_row, const Ptrs& p,                    \
                              const Consts<acc_t>& k, const acc_t* g, int64_t B, scalar_t* grad, \
                              int64_t s_grad, int64_t b0, int64_t b1) {                           \
    pl_bwd_##NAME(kl, corr, adv_row, p, k, g, B, grad, s_grad, b0, b1);                           \
  }

AXPO_PL_INSTANTIATE(f32, float, float)
AXPO_PL_INSTANTIATE(f64, double, double)
AXPO_PL_INSTANTIATE(bf16, c10::BFloat16, float)
AXPO_PL_INSTANTIATE(f16, c10::Half, float)

// Rows per parallel task: about 32K tokens per task.
inline int64_t grain_rows(int64_t T) {
  const int64_t g = (int64_t(1) << 15) / (T > 0 ? T : 1);
  return g > 1 ? g : 1;
}

}  // namespace

at::Tensor pl_fwd_cpu(const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv,
                      const at::Tensor& mask, const at::Tensor& ref, double lo, double hi,
                      double dual_c, int64_t kl_estimator, const at::Tensor& roll, int64_t corr,
                      double cap) {
  const Prepared pr = axpo::pl::prepare(logp, old, adv, mask, ref, kl_estimator, roll, corr, cap, at::kCPU);
  auto out = at::zeros({kPlStats, pr.B}, logp.options().dtype(pl_acc_type(logp.scalar_type())));
  if (pr.B == 0 || pr.T == 0) return out;
  const double c_eff = dual_c > 0 ? dual_c : std::numeric_limits<double>::infinity();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logp.scalar_type(), "pl_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Consts<acc_t> k{static_cast<acc_t>(lo), static_cast<acc_t>(hi), static_cast<acc_t>(c_eff),
                          static_cast<acc_t>(corr == 2 ? 1 : 0), static_cast<acc_t>(cap)};
    acc_t* o = out.data_ptr<acc_t>();
    at::parallel_for(0, pr.B, grain_rows(pr.T), [&](int64_t b0, int64_t b1) {
      pl_fwd_dispatch(pr.kl, corr != 0, pr.adv_row, pr.p, k, o, pr.B, b0, b1,
                      static_cast<const scalar_t*>(nullptr));
    });
  });
  return out;
}

void pl_bwd_cpu(const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv,
                const at::Tensor& mask, const at::Tensor& ref, double lo, double hi, double dual_c,
                int64_t kl_estimator, const at::Tensor& roll, int64_t corr, double cap,
                const at::Tensor& g, at::Tensor& grad_logp) {
  const Prepared pr = axpo::pl::prepare(logp, old, adv, mask, ref, kl_estimator, roll, corr, cap, at::kCPU);
  const auto acc = pl_acc_type(logp.scalar_type());
  TORCH_CHECK(g.device().is_cpu() && g.dim() == 2 && g.size(0) == 2 && g.size(1) == pr.B &&
                  g.scalar_type() == acc && g.is_contiguous(),
              "g must be a contiguous CPU tensor [2, ", pr.B, "] of ", acc, ", got ", g.sizes(), " ",
              g.scalar_type());
  axpo::pl::check_bt(grad_logp, "grad_logp", pr.B, pr.T, logp.scalar_type(), at::kCPU);
  if (pr.B == 0 || pr.T == 0) return;
  const double c_eff = dual_c > 0 ? dual_c : std::numeric_limits<double>::infinity();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logp.scalar_type(), "pl_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Consts<acc_t> k{static_cast<acc_t>(lo), static_cast<acc_t>(hi), static_cast<acc_t>(c_eff),
                          static_cast<acc_t>(corr == 2 ? 1 : 0), static_cast<acc_t>(cap)};
    const acc_t* gp = g.data_ptr<acc_t>();
    scalar_t* out = grad_logp.data_ptr<scalar_t>();
    const int64_t s_grad = grad_logp.stride(0);
    at::parallel_for(0, pr.B, grain_rows(pr.T), [&](int64_t b0, int64_t b1) {
      pl_bwd_dispatch(pr.kl, corr == 2, pr.adv_row, pr.p, k, gp, pr.B, out, s_grad, b0, b1);
    });
  });
}

AXPO_BIND(policy_loss) {
  m.def("pl_fwd_cpu", &pl_fwd_cpu, "policy loss forward: per-row sums [8, B] (CPU)");
  m.def("pl_bwd_cpu", &pl_bwd_cpu, "policy loss backward: gradient w.r.t. logp (CPU)");
#ifdef AXPO_WITH_CUDA
  m.def("pl_fwd_cuda", &pl_fwd_cuda, "policy loss forward: per-row sums [8, B] (CUDA)");
  m.def("pl_bwd_cuda", &pl_bwd_cuda, "policy loss backward: gradient w.r.t. logp (CUDA)");
#endif
}
