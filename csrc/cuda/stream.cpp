// Host-only implementation of stream.h (built in CUDA builds, where c10/cuda is available).
#include "stream.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAFunctions.h>

cudaStream_t axpo_current_cuda_stream(int device_index) {
  return at::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_index)).stream();
}

// Same calls as c10::cuda::CUDAGuard (CUDAGuardImpl::exchangeDevice / uncheckedSetDevice).
AxpoCudaDeviceGuard::AxpoCudaDeviceGuard(int device_index)
    : prev_device_(c10::cuda::ExchangeDevice(static_cast<c10::DeviceIndex>(device_index))) {}

AxpoCudaDeviceGuard::~AxpoCudaDeviceGuard() {
  // A destructor must not throw: like CUDAGuard, ignore a failure to restore.
  (void)c10::cuda::MaybeSetDevice(static_cast<c10::DeviceIndex>(prev_device_));
}
