// UvHandle<T>: owns one heap-allocated libuv handle. The memory stays alive until libuv's close
// callback has run, as libuv requires; destroying the owner starts the close.
#pragma once

#include <uv.h>

#include <utility>

namespace weft {

template <typename T>
class UvHandle {
 public:
  UvHandle() : h_(new T{}) {}
  ~UvHandle() { close(); }
  UvHandle(const UvHandle&) = delete;
  UvHandle& operator=(const UvHandle&) = delete;
  UvHandle(UvHandle&& o) noexcept
      : h_(std::exchange(o.h_, nullptr)), initialized_(o.initialized_) {}

  T* get() const { return h_; }
  uv_handle_t* handle() const { return reinterpret_cast<uv_handle_t*>(h_); }
  uv_stream_t* stream() const { return reinterpret_cast<uv_stream_t*>(h_); }

  // Call with the result of uv_xxx_init(loop, get()); returns it. Only an initialized handle
  // goes through uv_close.
  int init(int rc) {
    initialized_ = (rc == 0);
    return rc;
  }

  void close() {
    if (h_ == nullptr) return;
    if (!initialized_) {
      delete h_;
    } else if (!uv_is_closing(handle())) {
      uv_close(handle(), [](uv_handle_t* h) { delete reinterpret_cast<T*>(h); });
    }
    h_ = nullptr;
  }

 private:
  T* h_;
  bool initialized_ = false;
};

}  // namespace weft
