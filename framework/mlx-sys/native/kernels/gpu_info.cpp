// Copyright mlx-zoo contributors.
//
// What the GPU backend of the linked MLX says about its device: how many
// GPUs it can use and the first one's name and memory. MLX 0.32 exposes
// this in C++ only (mlx::core::gpu::device_info); mlx-c 0.7 does not.

#include "zoo_kernels.h"

#include <cstring>
#include <string>
#include <variant>

#include "mlx/backend/gpu/device_info.h"

extern "C" int zoo_gpu_info(char* name, size_t name_len, size_t* total_memory) {
  if (name != nullptr && name_len > 0) {
    name[0] = '\0';
  }
  if (total_memory != nullptr) {
    *total_memory = 0;
  }
  try {
    if (!mlx::core::gpu::is_available()) {
      return 0;
    }
    int count = mlx::core::gpu::device_count();
    if (count <= 0) {
      return 0;
    }
    const auto& info = mlx::core::gpu::device_info(0);
    auto text = [&](const char* key) -> std::string {
      auto it = info.find(key);
      if (it == info.end()) {
        return {};
      }
      if (const auto* s = std::get_if<std::string>(&it->second)) {
        return *s;
      }
      return {};
    };
    auto number = [&](const char* key) -> size_t {
      auto it = info.find(key);
      if (it == info.end()) {
        return 0;
      }
      if (const auto* n = std::get_if<size_t>(&it->second)) {
        return *n;
      }
      return 0;
    };
    std::string device_name = text("device_name");
    if (name != nullptr && name_len > 0) {
      std::strncpy(name, device_name.c_str(), name_len - 1);
      name[name_len - 1] = '\0';
    }
    if (total_memory != nullptr) {
      size_t total = number("total_memory");
      *total_memory = total != 0 ? total : number("memory_size");
    }
    return count;
  } catch (...) {
    return 0;
  }
}
