// Current-stream and device-guard helpers for the .cu files of axpo.
//
// The .cu files may not include c10/cuda or ATen/cuda headers (they must also compile-check on
// machines without a full CUDA toolkit), so these are declared here and implemented in
// stream.cpp, which the host compiler builds only in a real CUDA build.
#pragma once
#include <cuda_runtime.h>

// The current PyTorch CUDA stream of device `device_index` (at::cuda::getCurrentCUDAStream).
cudaStream_t axpo_current_cuda_stream(int device_index);

// Makes `device_index` the current CUDA device for its lifetime and restores the previous one on
// destruction: the equivalent of c10::cuda::CUDAGuard.
class AxpoCudaDeviceGuard {
 public:
  explicit AxpoCudaDeviceGuard(int device_index);
  ~AxpoCudaDeviceGuard();
  AxpoCudaDeviceGuard(const AxpoCudaDeviceGuard&) = delete;
  AxpoCudaDeviceGuard& operator=(const AxpoCudaDeviceGuard&) = delete;

 private:
  int prev_device_;
};
