// CUDA copies for the checkpoint store: device <-> pinned host on one side stream per device, fenced by events.
//
// Ordering rules (the caching allocator is stream-ordered, so both directions need an event):
// - to_host: the side stream first waits for the work queued so far on the caller's stream (the producer of
//   the tensor); the store keeps the source tensor alive until the copy's event has fired.
// - to_device: the destination was just allocated on the caller's stream, whose pending kernels may still use
//   that memory's previous owner, so the side stream waits for the caller's stream before writing it; the
//   caller's stream waits for the copy's event before backward reads it (Store::get -> block_stream).
// One side stream per device runs every copy in order, which also makes reusing a host buffer safe.
#include "../store.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <unordered_map>

namespace chain_memory {
namespace {

struct CudaFence final : CopyFence {
  explicit CudaFence(c10::DeviceIndex device) : device(device) {}
  bool ready() override { return event.query(); }
  void block_stream() override { event.block(c10::cuda::getCurrentCUDAStream(device)); }
  void synchronize() override { event.synchronize(); }
  c10::DeviceIndex device;
  at::cuda::CUDAEvent event;
};

class CudaCopier final : public DeviceCopier {
 public:
  std::shared_ptr<CopyFence> to_host(at::Tensor& host, const at::Tensor& device) override {
    return copy(host, device, device.device().index());
  }
  std::shared_ptr<CopyFence> to_device(at::Tensor& device, const at::Tensor& host) override {
    return copy(device, host, device.device().index());
  }

 private:
  std::shared_ptr<CopyFence> copy(at::Tensor& dst, const at::Tensor& src, c10::DeviceIndex index) {
    c10::cuda::CUDAGuard device_guard(index);
    c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(index);
    c10::cuda::CUDAStream side = side_stream(index);
    at::cuda::CUDAEvent caller_done;
    caller_done.record(caller);
    caller_done.block(side);
    auto fence = std::make_shared<CudaFence>(index);
    {
      c10::cuda::CUDAStreamGuard stream_guard(side);
      dst.copy_(src, /*non_blocking=*/true);
      fence->event.record(side);
    }
    return fence;
  }

  c10::cuda::CUDAStream side_stream(c10::DeviceIndex index) {
    auto it = streams_.find(index);
    if (it == streams_.end()) {
      it = streams_.emplace(index, c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index)).first;
    }
    return it->second;
  }

  std::unordered_map<c10::DeviceIndex, c10::cuda::CUDAStream> streams_;
};

}  // namespace

std::unique_ptr<DeviceCopier> make_cuda_copier() { return std::make_unique<CudaCopier>(); }

}  // namespace chain_memory
