// Typed errors of the sparsebp engine. The binding maps TypeError -> Python TypeError and
// ValueError -> Python ValueError; anything else that escapes is our bug (RuntimeError).
#pragma once
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace sparsebp {

class TypeError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

class ValueError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {
// Numbers by std::to_string / snprintf, not by a stream: on one toolchain (GCC 13.3, pybind11 3.1,
// Python 3.12; the GPU machine) formatting integers through std::ostringstream while an error
// message was built crashed the process.
inline void append_one(std::string& s, const std::string& v) { s += v; }
inline void append_one(std::string& s, const char* v) { s += v; }
inline void append_one(std::string& s, char v) { s += v; }
template <size_t N>
void append_one(std::string& s, const char (&v)[N]) {
  s += v;
}
template <typename T>
void append_one(std::string& s, const T& v) {
  if constexpr (std::is_integral_v<T>) {
    s += std::to_string(v);
  } else if constexpr (std::is_floating_point_v<T>) {
    // Six digits when they give the value back, else enough for it (1.0000001f is not "1").
    char buf[40];
    std::snprintf(buf, sizeof buf, "%g", static_cast<double>(v));
    if (static_cast<T>(std::strtod(buf, nullptr)) != v && v == v)
      std::snprintf(buf, sizeof buf, std::is_same_v<T, float> ? "%.9g" : "%.17g", static_cast<double>(v));
    s += buf;
  } else {
    std::ostringstream os;
    os << v;
    s += os.str();
  }
}
}  // namespace detail

template <typename... Parts>
std::string str_cat(const Parts&... parts) {
  std::string s;
  (detail::append_one(s, parts), ...);
  return s;
}

}  // namespace sparsebp

// SPARSEBP_CHECK_VALUE(cond, parts...): throw ValueError(str_cat(parts...)) unless cond.
#define SPARSEBP_CHECK_VALUE(cond, ...) \
  do {                                  \
    if (!(cond)) throw ::sparsebp::ValueError(::sparsebp::str_cat(__VA_ARGS__)); \
  } while (0)
#define SPARSEBP_CHECK_TYPE(cond, ...) \
  do {                                 \
    if (!(cond)) throw ::sparsebp::TypeError(::sparsebp::str_cat(__VA_ARGS__)); \
  } while (0)
