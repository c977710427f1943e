// ELASTIC_CHECK(cond, parts...): TORCH_CHECK whose message is assembled here without iostreams.
//
// On the GPU machine's image (torch 2.11) every TORCH_CHECK of this extension whose message streamed a number
// (c10::str -> std::ostream's num_put) killed the process with SIGSEGV, while messages made only of strings
// raised normally (results/exception_probe_h200.txt). Numbers, sizes, dtypes and devices are therefore turned
// into text with std::to_string / snprintf / c10's own string functions, and TORCH_CHECK only ever sees one
// std::string. Like TORCH_CHECK, the message is built only when the check fails.
#pragma once
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace elastic {
namespace check_detail {

inline void append(std::string& s, const char* x) { s += x; }
inline void append(std::string& s, const std::string& x) { s += x; }
inline void append(std::string& s, std::string_view x) { s.append(x.data(), x.size()); }
inline void append(std::string& s, char x) { s += x; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, char>, int> = 0>
inline void append(std::string& s, T x) {
  s += std::to_string(x);
}
template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
inline void append(std::string& s, T x) {
  char buf[48];
  std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(x));
  s += buf;
}
inline void append(std::string& s, c10::IntArrayRef x) {  // [2, 3, 4], as c10 prints sizes
  s += '[';
  for (size_t i = 0; i < x.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(x[i]);
  }
  s += ']';
}
inline void append(std::string& s, const std::vector<int64_t>& x) { append(s, c10::IntArrayRef(x)); }
inline void append(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void append(std::string& s, const c10::Device& d) { s += d.str(); }

template <typename... Args>
std::string msg(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}

}  // namespace check_detail

// "[2, 3, 4]" for a tensor's sizes (messages).
inline std::string dims_text(c10::IntArrayRef sizes) { return check_detail::msg(sizes); }

}  // namespace elastic

#define ELASTIC_CHECK(cond, ...) TORCH_CHECK(cond, ::elastic::check_detail::msg(__VA_ARGS__))
