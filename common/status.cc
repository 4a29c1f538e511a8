// errno formatting for Status messages.
#include "common/status.h"

#include <cstring>

namespace weft {

std::string errnoText(int err) {
  char buf[128];
  // GNU strerror_r returns the message pointer.
  const char* msg = strerror_r(err, buf, sizeof(buf));
  return msg;
}

}  // namespace weft
