// One protobuf message per SOCK_SEQPACKET datagram, with optional file descriptors riding
// along as SCM_RIGHTS (the node protocol, DESIGN §5).
#pragma once

#include <google/protobuf/message_lite.h>

#include <cstddef>
#include <string>
#include <vector>

#include "common/fd.h"
#include "common/status.h"

namespace weft {

// Largest datagram either side sends or accepts; bigger ones are protocol errors.
constexpr size_t kMaxNodeMessageBytes = 256 * 1024;
constexpr size_t kMaxNodeMessageFds = 4;

// Sends `msg` (and `fds`, borrowed) as one datagram. Blocking sockets only wait for buffer
// space; callers on an event loop use non-blocking sockets and treat EAGAIN as an error.
Status sendNodeMessage(int sock, const google::protobuf::MessageLite& msg,
                       const std::vector<int>& fds = {});

enum class RecvResult { kMessage, kClosed, kAgain, kError };

// Receives one datagram into `msg`, taking ownership of attached fds. On kError, `error`
// says why (truncated datagram, too many fds, unparsable bytes): the caller closes the peer.
RecvResult recvNodeMessage(int sock, google::protobuf::MessageLite* msg,
                           std::vector<UniqueFd>* fds, std::string* error);

}  // namespace weft
