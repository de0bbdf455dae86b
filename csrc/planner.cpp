// Checkpoint planner. csrc/fallback.py (`plan`) is the same algorithm in Python; results agree bit for bit
// (same IEEE double operations in the same order, same tie-breaking), which tests/test_csrc.py checks.
#include "planner.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

namespace chain_memory {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

double exposed(double copy_s, double compute_s) {
  return std::max(0.0, copy_s - compute_s) + std::max(0.0, copy_s - 2.0 * compute_s);
}

struct Solved {
  bool feasible = false;
  std::vector<int64_t> decisions;
  int64_t reserve = 0;
  int64_t quantum = 1;
  double cost = 0.0;
};

// dp[b] = least cost of the items so far with total weight <= b buckets; choice[i][b] = the decision taken.
Solved solve(const std::vector<int64_t>& act, const std::vector<int64_t>& inp, const std::vector<double>& flops,
             int64_t budget, const Rates& rates, bool host, int64_t depth, int64_t resolution) {
  Solved out;
  const int64_t n = static_cast<int64_t>(act.size());
  out.reserve = reserve_bytes(act, inp, host, depth);
  const int64_t avail = budget - out.reserve;
  if (avail < 0) return out;
  // Everything kept fits: that costs nothing, so it is optimal (and exact, unlike the bucketed search).
  int64_t all_kept = 0;
  for (const int64_t a : act) all_kept += a;
  if (all_kept <= avail) {
    out.feasible = true;
    out.decisions.assign(n, kKeep);
    return out;
  }
  // Every item's weight is rounded up to whole buckets, so at least 32 buckets per item bound what rounding
  // loses to 1/32 of the budget however many items there are.
  const int64_t q = std::max<int64_t>(1, ceil_div(avail, std::max(resolution, 32 * n)));
  const int64_t nb = avail / q + 1;  // buckets 0..B
  out.quantum = q;

  std::vector<double> dp(nb, 0.0), next(nb);
  std::vector<int8_t> choice(static_cast<size_t>(n) * nb, 0);
  std::vector<int64_t> weights(static_cast<size_t>(n) * kNumDecisions);
  for (int64_t i = 0; i < n; ++i) {
    double cost[kNumDecisions];
    int64_t bytes[kNumDecisions];
    option_costs(act[i], inp[i], flops[i], rates, cost, bytes);
    if (!host) cost[kOffload] = cost[kRecomputeOffload] = kInf;
    int64_t* w = &weights[i * kNumDecisions];
    for (int o = 0; o < kNumDecisions; ++o) w[o] = ceil_div(bytes[o], q);
    int8_t* row = &choice[static_cast<size_t>(i) * nb];
    for (int64_t b = 0; b < nb; ++b) {
      double best = kInf;
      int8_t best_o = 0;
      for (int o = 0; o < kNumDecisions; ++o) {
        if (w[o] > b) continue;
        const double c = dp[b - w[o]] + cost[o];
        if (c < best) {
          best = c;
          best_o = static_cast<int8_t>(o);
        }
      }
      next[b] = best;
      row[b] = best_o;
    }
    dp.swap(next);
  }
  if (!(dp[nb - 1] < kInf)) return out;
  out.feasible = true;
  out.cost = dp[nb - 1];
  out.decisions.assign(n, kKeep);
  int64_t b = nb - 1;
  for (int64_t i = n - 1; i >= 0; --i) {
    const int8_t o = choice[static_cast<size_t>(i) * nb + b];
    out.decisions[i] = o;
    b -= weights[i * kNumDecisions + o];
  }
  return out;
}

}  // namespace

void option_costs(int64_t act_bytes, int64_t input_bytes, double flops, const Rates& rates,
                  double cost[kNumDecisions], int64_t bytes[kNumDecisions]) {
  const double t = flops / rates.flops_per_s + static_cast<double>(act_bytes) / rates.device_bytes_per_s;
  const bool host = rates.host_bytes_per_s > 0.0;
  cost[kKeep] = 0.0;
  cost[kOffload] = host ? exposed(static_cast<double>(act_bytes) / rates.host_bytes_per_s, t) : kInf;
  cost[kRecompute] = t;
  cost[kRecomputeOffload] = host ? t + exposed(static_cast<double>(input_bytes) / rates.host_bytes_per_s, t) : kInf;
  bytes[kKeep] = act_bytes;
  bytes[kOffload] = 0;
  bytes[kRecompute] = input_bytes;
  bytes[kRecomputeOffload] = 0;
}

int64_t reserve_bytes(const std::vector<int64_t>& act, const std::vector<int64_t>& inp, bool host,
                      int64_t prefetch_depth) {
  int64_t unit = 0, inflight = 0;
  for (size_t i = 0; i < act.size(); ++i) {
    unit = std::max(unit, act[i] + (host ? inp[i] : 0));
    inflight = std::max(inflight, std::max(act[i], inp[i]));
  }
  return unit + (host ? prefetch_depth * inflight : 0);
}

Plan make_plan(const std::vector<int64_t>& act, const std::vector<int64_t>& inp, const std::vector<double>& flops,
               int64_t budget, const Rates& rates, int64_t prefetch_depth, int64_t resolution) {
  if (act.size() != inp.size() || act.size() != flops.size())
    throw std::invalid_argument("plan: act_bytes, input_bytes and flops must have one entry per item");
  if (!(rates.flops_per_s > 0.0) || !(rates.device_bytes_per_s > 0.0) || !(rates.host_bytes_per_s >= 0.0))
    throw std::invalid_argument("plan: flops_per_s and device_bytes_per_s must be > 0, host_bytes_per_s >= 0");
  if (resolution < 1 || prefetch_depth < 0)
    throw std::invalid_argument("plan: resolution must be >= 1 and prefetch_depth >= 0");
  for (size_t i = 0; i < act.size(); ++i)
    if (act[i] < 0 || inp[i] < 0 || !(flops[i] >= 0.0))
      throw std::invalid_argument("plan: item " + std::to_string(i) + " has negative bytes or flops");

  const bool host_ok = rates.host_bytes_per_s > 0.0;
  Solved best = solve(act, inp, flops, budget, rates, false, prefetch_depth, resolution);
  if (host_ok) {
    Solved with_host = solve(act, inp, flops, budget, rates, true, prefetch_depth, resolution);
    if (with_host.feasible && (!best.feasible || with_host.cost < best.cost)) best = std::move(with_host);
  }
  Plan plan;
  if (best.feasible) {
    plan.decisions = std::move(best.decisions);
    plan.reserve = best.reserve;
    plan.quantum = best.quantum;
    plan.feasible = true;
    plan.cost = best.cost;
    return plan;
  }
  // Infeasible: the least device memory there is, cheapest first among equals.
  plan.reserve = reserve_bytes(act, inp, host_ok, prefetch_depth);
  plan.decisions.assign(act.size(), kRecompute);
  for (size_t i = 0; i < act.size(); ++i) {
    double cost[kNumDecisions];
    int64_t bytes[kNumDecisions];
    option_costs(act[i], inp[i], flops[i], rates, cost, bytes);
    int64_t o = kRecompute;
    if (host_ok) o = cost[kRecomputeOffload] < cost[kOffload] ? kRecomputeOffload : kOffload;
    plan.decisions[i] = o;
    plan.cost += cost[o];
  }
  return plan;
}

}  // namespace chain_memory
