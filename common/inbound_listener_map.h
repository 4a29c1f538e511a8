// The ztunnel's side of inbound steering: registers its 15006 listener of a pod in the pinned
// weft_inbound_lst SOCKHASH (keyed by pod IP), where the pod's sk_lookup program finds it.
#pragma once

#include <string>

#include "common/address.h"
#include "common/fd.h"
#include "common/status.h"

namespace weft {

// Path of a pinned map under a pin dir: <pin_dir>/maps/<name>.
std::string pinnedMapPath(const std::string& pin_dir, const std::string& map_name);

class InboundListenerMap {
 public:
  // Opens <pin_dir>/maps/weft_inbound_lst.
  static Result<InboundListenerMap> open(const std::string& pin_dir);
  // Steers new inbound TCP to `pod_ip` (in the listener's netns) to `listener_fd`.
  Status add(const IpAddr& pod_ip, int listener_fd);
  // Idempotent: a missing entry is not an error.
  Status remove(const IpAddr& pod_ip);

 private:
  explicit InboundListenerMap(UniqueFd fd) : fd_(std::move(fd)) {}
  UniqueFd fd_;
};

}  // namespace weft
