// Group-normalized advantages on the CPU (contract: ../group_advantages.h).
//
// One sequential pass densifies the arbitrary int64 labels with an open-addressing hash table
// (linear probing, load <= 1/2, Fibonacci hashing; consecutive equal labels --
// the usual layout of G rollouts of one prompt -- skip the lookup) and, in the same loop,
// accumulates each group's count and shifted sum (shift = the reward of the group's first
// member). A second pass accumulates the sum of squared deviations from the group mean (two-pass
// variance, fp64); a third, elementwise and split over threads with at::parallel_for, writes the
// advantages. The scatter passes stay sequential: at the sizes of an RL batch (1e4..1e6 rewards)
// they run at memory speed and per-thread partial tables would cost more than they save.
#include "../group_advantages.h"
#include "../registry.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

struct GroupStat {
  double shift;  // reward of the group's first member
  double sum;    // sum of (r - shift); after pass 1: the mean of (r - shift)
  double m2;     // sum of (r - shift - mean)^2; after pass 2: 1 / (std + eps) (or 1, or 0)
  int64_t n;     // group size
};

inline uint64_t hash_label(int64_t key) {
  return static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ull;  // Fibonacci hashing: use top bits
}

// Open-addressing label -> dense id table, linear probing, load factor kept <= 1/2 by doubling.
// Starts at ~R/2 slots (RL batches have groups of >= 2..16 rollouts): a 16-byte slot holds key
// and id, so a lookup touches one cache line.
class LabelTable {
 public:
  explicit LabelTable(int64_t R) {
    int bits = 6;
    while ((int64_t(1) << bits) < R / 2) ++bits;
    reset(bits);
  }
  // Dense id of `key`; `next` (the number of ids so far) if the key is new.
  int32_t find_or_insert(int64_t key, int32_t next) {
    uint64_t h = hash_label(key) >> (64 - bits_);
    for (;;) {
      Slot& s = slots_[h];
      if (s.id < 0) {
        s.key = key;
        s.id = next;
        if (2 * static_cast<int64_t>(next + 1) > static_cast<int64_t>(mask_)) grow();
        return next;
      }
      if (s.key == key) return s.id;
      h = (h + 1) & mask_;
    }
  }

 private:
  struct Slot {
    int64_t key;
    int32_t id;  // -1: empty
  };
  void reset(int bits) {
    bits_ = bits;
    mask_ = (uint64_t(1) << bits) - 1;
    slots_.assign(mask_ + 1, Slot{0, -1});
  }
  void grow() {
    std::vector<Slot> old;
    old.swap(slots_);
    reset(bits_ + 1);
    for (const Slot& s : old) {
      if (s.id < 0) continue;
      uint64_t h = hash_label(s.key) >> (64 - bits_);
      while (slots_[h].id >= 0) h = (h + 1) & mask_;
      slots_[h] = s;
    }
  }
  int bits_ = 0;
  uint64_t mask_ = 0;
  std::vector<Slot> slots_;
};

template <typename scalar_t, typename out_t>
void run(const scalar_t* r, const int64_t* ids, out_t* out, int64_t R, bool scale_std,
         double eps) {
  // 1) densify + count + shifted sum, sequential
  LabelTable table(R);
  std::vector<int32_t> dense(R);
  std::vector<GroupStat> st;
  st.reserve(static_cast<size_t>(R < 1024 ? R : R / 4));

  int32_t prev_gid = -1;
  int64_t prev_key = 0;
  for (int64_t i = 0; i < R; ++i) {
    const int64_t key = ids[i];
    const double v = static_cast<double>(r[i]);
    int32_t g;
    if (prev_gid >= 0 && key == prev_key) {
      g = prev_gid;
    } else {
      const int32_t next = static_cast<int32_t>(st.size());
      g = table.find_or_insert(key, next);
      if (g == next) st.push_back(GroupStat{v, 0.0, 0.0, 0});  // new label: shift = its reward
      prev_gid = g;
      prev_key = key;
    }
    dense[i] = g;
    GroupStat& s = st[g];
    s.sum += v - s.shift;
    s.n += 1;
  }
  const int64_t G = static_cast<int64_t>(st.size());
  for (int64_t g = 0; g < G; ++g) st[g].sum /= static_cast<double>(st[g].n);

  // 2) sum of squared deviations (only needed to scale by the std)
  if (scale_std) {
    for (int64_t i = 0; i < R; ++i) {
      GroupStat& s = st[dense[i]];
      const double dev = static_cast<double>(r[i]) - s.shift - s.sum;
      s.m2 += dev * dev;
    }
    for (int64_t g = 0; g < G; ++g) {
      GroupStat& s = st[g];
      s.m2 = s.n > 1 ? std::sqrt(s.m2 / static_cast<double>(s.n - 1)) + eps : 1.0;
      // eps == 0 and std == 0: every deviation is exactly 0; d * (1 / inf) = 0, not 0 / 0 = NaN
      if (s.m2 == 0) s.m2 = std::numeric_limits<double>::infinity();
      s.m2 = 1.0 / s.m2;  // multiply below: a division per element would cost more than the rest
    }
  } else {
    for (int64_t g = 0; g < G; ++g) st[g].m2 = 1.0;
  }

  // 3) advantages, elementwise
  const GroupStat* sp = st.data();
  const int32_t* dp = dense.data();
  at::parallel_for(0, R, int64_t(1) << 17, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const GroupStat& s = sp[dp[i]];
      const double a = s.n > 1 ? (static_cast<double>(r[i]) - s.shift - s.sum) * s.m2 : 0.0;
      out[i] = static_cast<out_t>(a);
    }
  });
}

}  // namespace

at::Tensor group_advantages_cpu(const at::Tensor& rewards, const at::Tensor& group_ids,
                                bool scale_std, double eps) {
  TORCH_CHECK(rewards.device().is_cpu(), "rewards must be a CPU tensor, got ", rewards.device());
  TORCH_CHECK(group_ids.device().is_cpu(), "group_ids must be a CPU tensor, got ",
              group_ids.device());
  TORCH_CHECK(rewards.dim() == 1, "rewards must be 1-D [R], got shape ", rewards.sizes());
  TORCH_CHECK(group_ids.dim() == 1 && group_ids.size(0) == rewards.size(0),
              "group_ids must have shape [", rewards.size(0), "] like rewards, got ",
              group_ids.sizes());
  TORCH_CHECK(group_ids.scalar_type() == at::kLong, "group_ids must be int64, got ",
              group_ids.scalar_type());
  const auto dt = rewards.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "rewards must be fp16, bf16, fp32 or fp64, got ", dt);
  const int64_t R = rewards.size(0);
  TORCH_CHECK(R < std::numeric_limits<int32_t>::max() / 2,
              "rewards must have fewer than 2**30 elements, got ", R);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);
  const at::Tensor r = rewards.contiguous();
  const at::Tensor ids = group_ids.contiguous();
  auto out = at::empty({R}, rewards.options().dtype(dt == at::kDouble ? at::kDouble : at::kFloat));
  if (R == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "group_advantages_cpu", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    run<scalar_t, out_t>(r.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(),
                         out.data_ptr<out_t>(), R, scale_std, eps);
  });
  return out;
}

AXPO_BIND(group_advantages) {
  m.def("group_advantages_cpu", &group_advantages_cpu,
        "per-group (r - mean) [/ (std + eps)] over arbitrary int64 labels (CPU)");
#ifdef AXPO_WITH_CUDA
  m.def("group_advantages_cuda", &group_advantages_cuda,
        "per-group (r - mean) [/ (std + eps)] over arbitrary int64 labels (CUDA)");
#endif
}
