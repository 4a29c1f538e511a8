// SOCK_SEQPACKET framing for the node protocol.
#include "common/seqpacket.h"

#include <sys/socket.h>

#include <cerrno>
#include <cstring>

namespace weft {

Status sendNodeMessage(int sock, const google::protobuf::MessageLite& msg,
                       const std::vector<int>& fds) {
  std::string bytes;
  if (!msg.SerializeToString(&bytes)) return Status::error("serializing node message failed");
  if (bytes.size() > kMaxNodeMessageBytes)
    return Status::errorf("node message of {} bytes exceeds {}", bytes.size(),
                          kMaxNodeMessageBytes);
  if (fds.size() > kMaxNodeMessageFds) return Status::error("too many fds for one message");
  iovec iov{bytes.data(), bytes.size()};
  msghdr mh{};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxNodeMessageFds)];
  if (!fds.empty()) {
    memset(control, 0, sizeof(control));
    mh.msg_control = control;
    mh.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  ssize_t n;
  do {
    n = sendmsg(sock, &mh, MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return Status::errorf("sendmsg: {}", errnoText(errno));
  if (static_cast<size_t>(n) != bytes.size()) return Status::error("short sendmsg");
  return Status::ok();
}

RecvResult recvNodeMessage(int sock, google::protobuf::MessageLite* msg,
                           std::vector<UniqueFd>* fds, std::string* error) {
  std::string buf(kMaxNodeMessageBytes, '\0');
  iovec iov{buf.data(), buf.size()};
  msghdr mh{};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxNodeMessageFds)];
  mh.msg_control = control;
  mh.msg_controllen = sizeof(control);
  ssize_t n;
  do {
    n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return RecvResult::kAgain;
    *error = "recvmsg: " + errnoText(errno);
    return RecvResult::kError;
  }
  // Take every fd first so none leaks whatever happens next.
  for (cmsghdr* c = CMSG_FIRSTHDR(&mh); c != nullptr; c = CMSG_NXTHDR(&mh, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; i++) {
        int fd;
        memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        fds->emplace_back(fd);
      }
    }
  }
  if (n == 0) return RecvResult::kClosed;
  if (mh.msg_flags & MSG_TRUNC) {
    *error = "node message truncated (larger than limit)";
    return RecvResult::kError;
  }
  if (mh.msg_flags & MSG_CTRUNC) {
    *error = "too many file descriptors attached";
    return RecvResult::kError;
  }
  if (!msg->ParseFromArray(buf.data(), static_cast<int>(n))) {
    *error = "node message does not parse";
    return RecvResult::kError;
  }
  return RecvResult::kMessage;
}

}  // namespace weft
