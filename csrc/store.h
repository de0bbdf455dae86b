// The checkpoint store: a pool of host buffers holding spilled saved tensors until backward wants them back.
//
// put() copies a device tensor into a pooled host buffer (pinned, on a side CUDA stream, when the tensor is on a
// GPU); get() hands back a device tensor with the same sizes, strides where dense, dtype and bits. Keys belong to
// groups (one per spilled unit call, numbered in forward order); a key several units saved (the text embedding,
// the time embedding) is put once and shared into the other groups. get(key, group) is asked on behalf of a
// group: if the key is not back yet the whole group is copied back, and the `prefetch_depth` groups before it
// start copying, the order backward needs them, so copies overlap compute. get() hands the copy over: from then on
// the store refers to it weakly, so it lives as long as backward uses it (not until release()); asked again while
// it lives, get() returns it; after, it copies it back again. Device bytes count the copies the store brought back
// that still live, held by it or handed over (those are looked at again when a copy starts and for stats()).
// csrc/fallback.py (`Store`) is the same object in Python.
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

namespace chain_memory {

// An asynchronous copy in flight; CPU copies are synchronous and need none.
struct CopyFence {
  virtual ~CopyFence() = default;
  virtual bool ready() = 0;         // finished?
  virtual void block_stream() = 0;  // make the caller's current stream wait for it
  virtual void synchronize() = 0;   // make the host wait for it
};

// Copies between a CUDA device and pinned host memory on a side stream (csrc/cuda/store_cuda.cu).
struct DeviceCopier {
  virtual ~DeviceCopier() = default;
  virtual std::shared_ptr<CopyFence> to_host(at::Tensor& host, const at::Tensor& device) = 0;
  virtual std::shared_ptr<CopyFence> to_device(at::Tensor& device, const at::Tensor& host) = 0;
};
std::unique_ptr<DeviceCopier> make_cuda_copier();  // defined only in CUDA builds (WITH_CUDA)

// Order of stats(); csrc/__init__.py STAT_NAMES names them.
enum Stat : int {
  kEntries, kHostBytes, kPeakHostBytes, kPoolBytes, kDeviceBytes, kPeakDeviceBytes, kPuts, kGets,
  kD2HBytes, kH2DBytes, kPrefetched, kReadyOnGet, kWaitedOnGet, kDemandCopies, kPoolHits, kPoolMisses,
  kInflightBytes, kBackpressureWaits, kNumStats
};

class Store : public torch::CustomClassHolder {
 public:
  Store(int64_t max_inflight_bytes, int64_t prefetch_depth, bool pin_memory);
  ~Store() override;

  int64_t put(const at::Tensor& tensor, int64_t group);
  void share(int64_t key, int64_t group);
  at::Tensor get(int64_t key, int64_t group);
  void prefetch_group(int64_t group);
  bool release(int64_t key);
  void synchronize();
  std::vector<int64_t> stats();
  void reset_peaks();
  void trim();  // free the pooled host buffers nobody uses
  void set_max_inflight_bytes(int64_t bytes);  // from the next put on

 private:
  struct Entry {
    std::vector<int64_t> groups;  // the group it was put in, then the groups it is shared into
    int64_t nbytes = 0;    // bytes of the dense copy
    int64_t pooled = 0;    // bytes of the pooled buffer (nbytes rounded up)
    bool meta = false;     // meta tensors carry no data: shape only
    bool demand = false;     // copied back only when asked for (not ahead of time)
    bool delivered = false;  // handed to backward at least once
    std::vector<int64_t> sizes, strides;
    at::TensorOptions device_options;
    at::Tensor buffer;     // pooled uint8 host buffer
    at::Tensor host;       // buffer viewed with the tensor's dtype, sizes and strides
    at::Tensor source;     // device tensor kept alive until its device-to-host copy has finished
    at::Tensor device;     // the copy brought back (by prefetch or get), until get() hands it over
    std::optional<c10::weak_intrusive_ptr<c10::StorageImpl>> handed;  // the copy get() handed over, held weakly
    std::shared_ptr<CopyFence> d2h, h2d;
  };

  at::Tensor take_buffer(int64_t pooled);
  void give_buffer(at::Tensor buffer, int64_t pooled);
  void start_copy_back(Entry& entry, bool demand);
  static at::Tensor handed_copy(const Entry& entry);  // the copy get() handed over, if it still lives; else undefined
  void forget_gone_copies();  // handed-over copies no longer alive leave the device bytes
  void reap_finished_copies(bool wait_all);
  DeviceCopier& copier();

  std::mutex mutex_;
  int64_t max_inflight_bytes_, prefetch_depth_;
  bool pin_memory_;
  int64_t next_key_ = 0;
  std::unordered_map<int64_t, Entry> entries_;
  std::map<int64_t, std::vector<int64_t>> groups_;  // group -> keys, ordered so backward order is a reverse walk
  std::deque<int64_t> pending_d2h_;                 // keys whose device-to-host copy may still run
  std::vector<int64_t> handed_keys_;                // keys whose handed-over copy is counted in the device bytes
  std::unordered_map<int64_t, std::vector<at::Tensor>> pool_;
  std::unique_ptr<DeviceCopier> copier_;
  int64_t stats_[kNumStats] = {};
};

}  // namespace chain_memory
