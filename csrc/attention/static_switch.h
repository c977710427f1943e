// Compile-time dispatch of host launch code: a run-time value picks one of a few template instances, and the
// body is written once. Each macro runs `body` (a lambda, [&] { ... }) with a compile-time name in scope:
//   ELASTIC_BOOL_SWITCH(cond, NAME, body)                       static constexpr bool NAME
//   ELASTIC_DTYPE_SWITCH(scalar_type, T, body)                  using T = __half | __nv_bfloat16
//   ELASTIC_HEADDIM_SWITCH(head_dim, D, body)                   static constexpr int D = 64 | 128
//   ELASTIC_DTYPE_HEADDIM_SWITCH(scalar_type, head_dim, T, D, body)   both
// and returns what body returns. The dtypes and head dims are the ones the CUDA kernels are instantiated for
// (attention_*_hdim*.cu); the API rejects others with a message naming the argument (attention_cuda_api.cpp),
// so the checks here only guard against a caller that skipped it.
#pragma once
#include <c10/core/ScalarType.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/check_msg.h"

// `static constexpr`: a static local is not captured, so body's [&] lambda can use NAME as a template argument.
#define ELASTIC_BOOL_SWITCH(cond, NAME, ...) \
  [&] {                                      \
    if (cond) {                              \
      static constexpr bool NAME = true;     \
      return __VA_ARGS__();                  \
    }                                        \
    static constexpr bool NAME = false;      \
    return __VA_ARGS__();                    \
  }()

#define ELASTIC_DTYPE_SWITCH(scalar_type, T, ...)                                                         \
  [&] {                                                                                                  \
    const ::c10::ScalarType elastic_switch_dtype_ = (scalar_type);                                       \
    ELASTIC_CHECK(elastic_switch_dtype_ == ::c10::kHalf || elastic_switch_dtype_ == ::c10::kBFloat16,    \
                  "elastic: the CUDA kernels take float16 or bfloat16, got ", elastic_switch_dtype_);    \
    if (elastic_switch_dtype_ == ::c10::kBFloat16) {                                                     \
      using T = __nv_bfloat16;                                                                           \
      return __VA_ARGS__();                                                                              \
    }                                                                                                    \
    using T = __half;                                                                                    \
    return __VA_ARGS__();                                                                                \
  }()

#define ELASTIC_HEADDIM_SWITCH(head_dim, D, ...)                                                          \
  [&] {                                                                                                  \
    const auto elastic_switch_head_dim_ = (head_dim);                                                    \
    ELASTIC_CHECK(elastic_switch_head_dim_ == 64 || elastic_switch_head_dim_ == 128,                     \
                  "elastic: the CUDA kernels take head_dim 64 or 128, got ", elastic_switch_head_dim_);  \
    if (elastic_switch_head_dim_ == 64) {                                                                \
      static constexpr int D = 64;                                                                       \
      return __VA_ARGS__();                                                                              \
    }                                                                                                    \
    static constexpr int D = 128;                                                                        \
    return __VA_ARGS__();                                                                                \
  }()

#define ELASTIC_DTYPE_HEADDIM_SWITCH(scalar_type, head_dim, T, D, ...) \
  ELASTIC_DTYPE_SWITCH(scalar_type, T, [&] { return ELASTIC_HEADDIM_SWITCH(head_dim, D, __VA_ARGS__); })
