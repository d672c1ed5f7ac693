// Typed errors of the sparsebp engine. The binding maps TypeError -> Python TypeError and
// ValueError -> Python ValueError; anything else that escapes is our bug (RuntimeError).
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

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
inline void append(std::ostringstream&) {}
template <typename T, typename... Rest>
void append(std::ostringstream& os, const T& first, const Rest&... rest) {
  os << first;
  append(os, rest...);
}
}  // namespace detail

template <typename... Parts>
std::string str_cat(const Parts&... parts) {
  std::ostringstream os;
  detail::append(os, parts...);
  return os.str();
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
