/* Address layout shared by BPF maps and C++: one shape for IPv4 and IPv6. */
#pragma once

#ifdef __cplusplus
/* The kernel's own typedefs: libuv and other system headers pull them in as well, and a second
 * definition of __u64 (uint64_t is unsigned long, the kernel's is unsigned long long) clashes. */
#include <linux/types.h>
#elif !defined(__VMLINUX_H__)
#include <linux/types.h>
#endif

#define WEFT_AF_INET 2
#define WEFT_AF_INET6 10

/* An IP address. IPv4 lives in ip[0] with ip[1..3] zero. Network byte order. */
struct weft_ip {
	__u32 ip[4];
	__u8 family; /* WEFT_AF_INET or WEFT_AF_INET6 */
	__u8 reserved[3];
};

/* An IP address and port. Port in network byte order. */
struct weft_sockaddr {
	__u32 ip[4];
	__u16 port;
	__u8 family;
	__u8 reserved;
};

#ifdef __cplusplus
static_assert(sizeof(struct weft_ip) == 20, "weft_ip is ABI");
static_assert(sizeof(struct weft_sockaddr) == 20, "weft_sockaddr is ABI");
#endif
