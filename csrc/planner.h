// The checkpoint planner: for every (gradient step, UNet unit) item choose what backward finds on the device.
//
// Pure C++ (no torch headers), so it compiles in seconds and csrc/fallback.py can mirror it line for line.
#pragma once

#include <cstdint>
#include <vector>

namespace chain_memory {

// The four things a unit's saved activations can do between forward and backward.
enum Decision : int64_t {
  kKeep = 0,              // plain autograd: the activations stay on the device
  kOffload = 1,           // spilled to host memory in forward, prefetched back for backward
  kRecompute = 2,         // dropped; the unit's inputs stay on the device and its forward reruns in backward
  kRecomputeOffload = 3,  // dropped; the inputs are spilled too (nothing of the unit stays on the device)
};
constexpr int kNumDecisions = 4;

struct Rates {
  double flops_per_s;         // device compute rate (> 0)
  double device_bytes_per_s;  // device memory bandwidth (> 0): rewriting activations costs traffic too
  double host_bytes_per_s;    // device<->host copy bandwidth; 0 disables the two spilling decisions
};

// Cost (seconds of extra work in backward) and resident device bytes of each decision for one item.
// Copies run on a side stream: only the part of a copy longer than the compute it hides behind is exposed
// (t in forward for the device-to-host copy, 2t in backward for the prefetch).
void option_costs(int64_t act_bytes, int64_t input_bytes, double flops, const Rates& rates,
                  double cost[kNumDecisions], int64_t bytes[kNumDecisions]);

// Bytes kept free for backward: one unit rematerialised (its activations, plus its inputs when they come back
// from the host) and, with host spilling, `prefetch_depth` units in flight.
int64_t reserve_bytes(const std::vector<int64_t>& act_bytes, const std::vector<int64_t>& input_bytes,
                      bool host, int64_t prefetch_depth);

struct Plan {
  std::vector<int64_t> decisions;  // one Decision per item, forward order
  int64_t reserve = 0;             // transient bytes set aside out of the budget
  int64_t quantum = 1;             // the byte granularity the budget was solved at
  bool feasible = false;           // false: the budget is below the minimum; decisions are the least-memory plan
  double cost = 0.0;               // modelled extra seconds (recompute + exposed copies)
};

// Minimise total cost subject to  sum(resident bytes) + reserve <= budget.
// A multiple-choice knapsack solved by dynamic programming over max(resolution, 32 * items) byte buckets: exact
// on that grid (item bytes round up, so the plan never exceeds the budget; rounding gives up at most 1/32 of it),
// and keep-everything when that fits. Solved without and with host spilling; the cheaper wins.
Plan make_plan(const std::vector<int64_t>& act_bytes, const std::vector<int64_t>& input_bytes,
               const std::vector<double>& flops, int64_t budget, const Rates& rates, int64_t prefetch_depth,
               int64_t resolution);

}  // namespace chain_memory
