// Network namespaces: open by path, read a netns cookie, and create sockets inside another
// namespace (setns on the calling thread, then back).
#pragma once

#include <cstdint>
#include <string>

#include "common/fd.h"
#include "common/status.h"

namespace weft {

// Opens a netns file (/run/netns/x, /proc/<pid>/ns/net) read-only.
Result<UniqueFd> openNetns(const std::string& path);

// The kernel's netns cookie (SO_NETNS_COOKIE) of the namespace `netns_fd` refers to.
Result<uint64_t> netnsCookie(int netns_fd);

// The cookie of the calling thread's current namespace.
Result<uint64_t> currentNetnsCookie();

// Enters `netns_fd` on this thread for the lifetime of the object, then returns to the
// namespace the thread was in. Check ok() before relying on it.
class ScopedNetns {
 public:
  explicit ScopedNetns(int netns_fd);
  // Returns to `home_fd` (borrowed: the caller keeps it open, and it must be the namespace the
  // thread is in) instead of opening /proc/thread-self/ns/net: for a thread that enters pods'
  // namespaces once per connection.
  ScopedNetns(int netns_fd, int home_fd);
  ~ScopedNetns();
  ScopedNetns(const ScopedNetns&) = delete;
  ScopedNetns& operator=(const ScopedNetns&) = delete;
  const Status& status() const { return status_; }

 private:
  void enter(int netns_fd);

  UniqueFd original_;
  int home_fd_ = -1;  // original_ or a borrowed descriptor
  Status status_;
  bool entered_ = false;
};

// socket(domain, type, protocol) created inside the namespace `netns_fd` (-1 = current).
Result<UniqueFd> socketIn(int netns_fd, int domain, int type, int protocol = 0);
// The same, returning to `home_fd` (see ScopedNetns(netns_fd, home_fd)).
Result<UniqueFd> socketInFrom(int home_fd, int netns_fd, int domain, int type, int protocol = 0);

}  // namespace weft
