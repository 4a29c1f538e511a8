/* Address helpers: classify destinations (loopback, unspecified, v4-mapped) and fill the ABI's
 * struct weft_sockaddr / struct weft_ip. Addresses are in network byte order throughout. */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_endian.h>

#include "abi/addr.h"

#define WEFT_V4_LOOPBACK 0x7f000001 /* 127.0.0.1, host order */

/* 127.0.0.0/8 or 0.0.0.0 (which the kernel treats as "this host"). */
static __always_inline bool weft_ip4_is_local(__u32 ip4)
{
	return (bpf_ntohl(ip4) >> 24) == 127 || ip4 == 0;
}

/* ::ffff:a.b.c.d */
static __always_inline bool weft_ip6_is_v4mapped(const __u32 ip6[4])
{
	return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(0x0000ffff);
}

/* ::1 or :: */
static __always_inline bool weft_ip6_is_local(const __u32 ip6[4])
{
	return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 &&
	       (ip6[3] == bpf_htonl(1) || ip6[3] == 0);
}

static __always_inline void weft_sockaddr_v4(struct weft_sockaddr *sa, __u32 ip4, __u16 port_be)
{
	sa->ip[0] = ip4;
	sa->ip[1] = 0;
	sa->ip[2] = 0;
	sa->ip[3] = 0;
	sa->port = port_be;
	sa->family = WEFT_AF_INET;
	sa->reserved = 0;
}

/* A v4-mapped IPv6 address is stored as IPv4, so that a v6 socket talking to an IPv4 peer and
 * the peer's own AF_INET view agree on the key. */
static __always_inline void weft_sockaddr_v6(struct weft_sockaddr *sa, const __u32 ip6[4],
					     __u16 port_be)
{
	if (weft_ip6_is_v4mapped(ip6)) {
		weft_sockaddr_v4(sa, ip6[3], port_be);
		return;
	}
	sa->ip[0] = ip6[0];
	sa->ip[1] = ip6[1];
	sa->ip[2] = ip6[2];
	sa->ip[3] = ip6[3];
	sa->port = port_be;
	sa->family = WEFT_AF_INET6;
	sa->reserved = 0;
}

static __always_inline void weft_ip_v4(struct weft_ip *ip, __u32 ip4)
{
	__builtin_memset(ip, 0, sizeof(*ip));
	ip->ip[0] = ip4;
	ip->family = WEFT_AF_INET;
}

static __always_inline void weft_ip_v6(struct weft_ip *ip, const __u32 ip6[4])
{
	__builtin_memset(ip, 0, sizeof(*ip));
	if (weft_ip6_is_v4mapped(ip6)) {
		ip->ip[0] = ip6[3];
		ip->family = WEFT_AF_INET;
		return;
	}
	ip->ip[0] = ip6[0];
	ip->ip[1] = ip6[1];
	ip->ip[2] = ip6[2];
	ip->ip[3] = ip6[3];
	ip->family = WEFT_AF_INET6;
}

static __always_inline bool weft_ip_equal(const struct weft_ip *a, const struct weft_ip *b)
{
	return a->family == b->family && a->ip[0] == b->ip[0] && a->ip[1] == b->ip[1] &&
	       a->ip[2] == b->ip[2] && a->ip[3] == b->ip[3];
}
