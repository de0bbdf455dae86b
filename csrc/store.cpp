// Checkpoint store, CPU side: the buffer pool, the entry book-keeping and the prefetch order. The CUDA copies
// (side stream, events) live in csrc/cuda/store_cuda.cu and are compiled only in CUDA builds.
#include "store.h"

#include <algorithm>

namespace chain_memory {
namespace {

// Pinned allocations are page-backed anyway; rounding lets tensors of nearly equal size share buffers.
constexpr int64_t kRound = 512;

int64_t round_up(int64_t n) { return (n + kRound - 1) / kRound * kRound; }

}  // namespace

#ifndef WITH_CUDA
std::unique_ptr<DeviceCopier> make_cuda_copier() {
  TORCH_CHECK(false, "csrc._C was built without CUDA; rebuild with USE_CUDA=1 (pip install --no-build-isolation -e .) "
              "or use the Python fallback (CHAIN_MEMORY_BACKEND=python)");
}
#endif

Store::Store(int64_t max_inflight_bytes, int64_t prefetch_depth, bool pin_memory)
    : max_inflight_bytes_(max_inflight_bytes), prefetch_depth_(prefetch_depth), pin_memory_(pin_memory) {
  TORCH_CHECK(max_inflight_bytes > 0, "Store: max_inflight_bytes must be positive, got ", max_inflight_bytes);
  TORCH_CHECK(prefetch_depth >= 0, "Store: prefetch_depth must be >= 0, got ", prefetch_depth);
}

Store::~Store() {
  // Copies still running read or write buffers this object owns: let them finish first.
  try {
    for (auto& kv : entries_) {
      if (kv.second.d2h) kv.second.d2h->synchronize();
      if (kv.second.h2d) kv.second.h2d->synchronize();
    }
  } catch (...) {
  }
}

DeviceCopier& Store::copier() {
  if (!copier_) copier_ = make_cuda_copier();
  return *copier_;
}

at::Tensor Store::take_buffer(int64_t pooled) {
  auto& free_list = pool_[pooled];
  if (!free_list.empty()) {
    at::Tensor buffer = std::move(free_list.back());
    free_list.pop_back();
    ++stats_[kPoolHits];
    return buffer;
  }
  ++stats_[kPoolMisses];
  stats_[kPoolBytes] += pooled;
  return at::empty({pooled}, at::TensorOptions().dtype(at::kByte).pinned_memory(pin_memory_));
}

void Store::give_buffer(at::Tensor buffer, int64_t pooled) { pool_[pooled].push_back(std::move(buffer)); }

void Store::reap_finished_copies(bool wait_all) {
  // One side stream runs the copies in order: once one is unfinished, the later ones are too.
  while (!pending_d2h_.empty()) {
    auto it = entries_.find(pending_d2h_.front());
    if (it == entries_.end() || !it->second.d2h) {
      pending_d2h_.pop_front();
      continue;
    }
    Entry& e = it->second;
    if (wait_all) {
      e.d2h->synchronize();
    } else if (!e.d2h->ready()) {
      break;
    }
    e.d2h.reset();
    e.source.reset();
    stats_[kInflightBytes] -= e.nbytes;
    pending_d2h_.pop_front();
  }
}

int64_t Store::put(const at::Tensor& tensor, int64_t group) {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(tensor.defined(), "Store.put: the tensor is undefined");
  TORCH_CHECK(tensor.layout() == at::kStrided, "Store.put: only strided tensors can be stored, got ", tensor.layout());
  TORCH_CHECK(group >= 0, "Store.put: group must be >= 0, got ", group);
  reap_finished_copies(false);

  const int64_t key = next_key_++;
  Entry e;
  e.groups.push_back(group);
  e.nbytes = tensor.numel() * static_cast<int64_t>(tensor.element_size());
  e.pooled = round_up(e.nbytes);
  e.meta = tensor.is_meta();
  e.sizes = tensor.sizes().vec();
  if (tensor.is_non_overlapping_and_dense()) {
    e.strides = tensor.strides().vec();
  } else {
    const auto strides = c10::contiguous_strides(tensor.sizes());
    e.strides.assign(strides.begin(), strides.end());
  }
  e.device_options = tensor.options();
  if (!e.meta) {
    e.buffer = e.pooled > 0 ? take_buffer(e.pooled) : at::empty({0}, at::TensorOptions().dtype(at::kByte));
    e.host = e.buffer.narrow(0, 0, e.nbytes).view(tensor.scalar_type()).as_strided(e.sizes, e.strides);
    if (tensor.is_cuda()) {
      e.d2h = copier().to_host(e.host, tensor);
      e.source = tensor;
      pending_d2h_.push_back(key);
      stats_[kInflightBytes] += e.nbytes;
    } else {
      e.host.copy_(tensor);
    }
  }
  ++stats_[kPuts];
  ++stats_[kEntries];
  stats_[kD2HBytes] += e.nbytes;
  stats_[kHostBytes] += e.pooled;
  stats_[kPeakHostBytes] = std::max(stats_[kPeakHostBytes], stats_[kHostBytes]);
  groups_[group].push_back(key);
  entries_.emplace(key, std::move(e));

  // Back-pressure: device memory is freed only once its copy has landed, so bound what is in flight.
  while (stats_[kInflightBytes] > max_inflight_bytes_ && !pending_d2h_.empty()) {
    auto it = entries_.find(pending_d2h_.front());
    if (it != entries_.end() && it->second.d2h) it->second.d2h->synchronize();
    ++stats_[kBackpressureWaits];
    reap_finished_copies(false);
  }
  return key;
}

at::Tensor Store::handed_copy(const Entry& e) {
  if (!e.handed) return at::Tensor();
  auto storage = e.handed->lock();
  if (!storage) return at::Tensor();
  return at::empty({0}, e.device_options).set_(c10::Storage(std::move(storage)), 0, e.sizes, e.strides);
}

void Store::forget_gone_copies() {
  auto gone = [this](int64_t key) {
    Entry& e = entries_.at(key);  // release() takes its key out of handed_keys_
    if (!e.handed->expired()) return false;
    e.handed.reset();
    stats_[kDeviceBytes] -= e.nbytes;
    return true;
  };
  handed_keys_.erase(std::remove_if(handed_keys_.begin(), handed_keys_.end(), gone), handed_keys_.end());
}

void Store::start_copy_back(Entry& e, bool demand) {
  if (e.device.defined() || (e.handed && !e.handed->expired())) return;
  e.device = at::empty_strided(e.sizes, e.strides, e.device_options);
  if (!e.meta) {
    if (e.device.is_cuda()) {
      // Same side stream as the device-to-host copy: it runs after that copy, no wait needed here.
      e.h2d = copier().to_device(e.device, e.host);
    } else {
      e.device.copy_(e.host);
    }
  }
  e.demand = demand;
  if (!demand) ++stats_[kPrefetched];
  stats_[kH2DBytes] += e.nbytes;
  stats_[kDeviceBytes] += e.nbytes;
  stats_[kPeakDeviceBytes] = std::max(stats_[kPeakDeviceBytes], stats_[kDeviceBytes]);
}

void Store::prefetch_group(int64_t group) {
  std::lock_guard<std::mutex> lock(mutex_);
  forget_gone_copies();
  auto it = groups_.find(group);
  if (it == groups_.end()) return;
  for (int64_t key : it->second) start_copy_back(entries_.at(key), false);
}

void Store::share(int64_t key, int64_t group) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = entries_.find(key);
  TORCH_CHECK(found != entries_.end(), "Store.share: unknown or released key ", key);
  TORCH_CHECK(group >= 0, "Store.share: group must be >= 0, got ", group);
  auto& groups = found->second.groups;
  if (std::find(groups.begin(), groups.end(), group) != groups.end()) return;
  groups.push_back(group);
  groups_[group].push_back(key);
}

at::Tensor Store::get(int64_t key, int64_t group) {
  std::lock_guard<std::mutex> lock(mutex_);
  reap_finished_copies(false);
  auto found = entries_.find(key);
  TORCH_CHECK(found != entries_.end(), "Store.get: unknown or released key ", key);
  Entry& e = found->second;
  if (group < 0) group = e.groups.front();
  ++stats_[kGets];
  forget_gone_copies();
  auto it = groups_.find(group);
  at::Tensor handed = handed_copy(e);
  if (!e.device.defined() && !handed.defined()) {
    // Not prefetched: bring the asking group back now (backward needs all of it next).
    if (it != groups_.end())
      for (int64_t k : it->second) start_copy_back(entries_.at(k), true);
    start_copy_back(e, true);
  }
  // Start the groups backward needs after this one: the ones spilled just before it.
  if (it == groups_.end()) it = groups_.lower_bound(group);
  for (int64_t depth = 0; depth < prefetch_depth_ && it != groups_.begin(); ++depth) {
    --it;
    for (int64_t k : it->second) start_copy_back(entries_.at(k), false);
  }
  if (!e.delivered) {
    if (e.demand) {
      ++stats_[kDemandCopies];
    } else if (e.h2d && !e.h2d->ready()) {
      ++stats_[kWaitedOnGet];
    } else {
      ++stats_[kReadyOnGet];
    }
    e.delivered = true;
  }
  if (e.h2d) {
    e.h2d->block_stream();
    e.h2d.reset();
  }
  if (handed.defined()) return handed;
  // Hand the copy over: backward's use of it decides how long it lives.
  at::Tensor device = std::move(e.device);
  e.device = at::Tensor();
  if (e.handed) {
    stats_[kDeviceBytes] -= e.nbytes;  // an earlier copy handed over, gone since the last look
  } else {
    handed_keys_.push_back(key);
  }
  e.handed = device.storage().getWeakStorageImpl();
  return device;
}

bool Store::release(int64_t key) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = entries_.find(key);
  if (found == entries_.end()) return false;
  Entry& e = found->second;
  if (e.h2d) e.h2d->block_stream();  // the side stream may still write the device copy we drop
  if (e.d2h) {
    e.d2h->synchronize();
    stats_[kInflightBytes] -= e.nbytes;
  }
  if (e.device.defined()) stats_[kDeviceBytes] -= e.nbytes;
  if (e.handed) {  // counted until looked at again: alive or not, it leaves the device bytes with its entry
    stats_[kDeviceBytes] -= e.nbytes;
    handed_keys_.erase(std::find(handed_keys_.begin(), handed_keys_.end(), key));
  }
  stats_[kHostBytes] -= e.pooled;
  --stats_[kEntries];
  if (!e.meta && e.pooled > 0) give_buffer(std::move(e.buffer), e.pooled);
  for (int64_t g : e.groups) {
    auto group = groups_.find(g);
    auto& keys = group->second;
    keys.erase(std::find(keys.begin(), keys.end(), key));
    if (keys.empty()) groups_.erase(group);
  }
  entries_.erase(found);
  return true;
}

void Store::synchronize() {
  std::lock_guard<std::mutex> lock(mutex_);
  reap_finished_copies(true);
  for (auto& kv : entries_)
    if (kv.second.h2d) kv.second.h2d->synchronize();
}

std::vector<int64_t> Store::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  reap_finished_copies(false);
  forget_gone_copies();
  return std::vector<int64_t>(stats_, stats_ + kNumStats);
}

void Store::reset_peaks() {
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t keep[] = {kEntries, kHostBytes, kPoolBytes, kDeviceBytes, kInflightBytes};
  int64_t kept[kNumStats] = {};
  for (int s : keep) kept[s] = stats_[s];
  std::copy(kept, kept + kNumStats, stats_);
  stats_[kPeakHostBytes] = stats_[kHostBytes];
  stats_[kPeakDeviceBytes] = stats_[kDeviceBytes];
}

void Store::trim() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& kv : pool_) {
    stats_[kPoolBytes] -= kv.first * static_cast<int64_t>(kv.second.size());
    kv.second.clear();
  }
}

void Store::set_max_inflight_bytes(int64_t bytes) {
  TORCH_CHECK(bytes > 0, "Store: max_inflight_bytes must be positive, got ", bytes);
  std::lock_guard<std::mutex> lock(mutex_);
  max_inflight_bytes_ = bytes;
}

}  // namespace chain_memory
