// SPDX-License-Identifier: GPL-2.0
/* SO_ORIGINAL_DST for the ztunnel's accepted outbound (15001) sockets, answered from
 * weft_orig_dst the way netfilter's conntrack answers it for an iptables REDIRECT. */
#include "vmlinux.h"
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "abi/ports.h"
#include "lib/orig_dst.h"

#define WEFT_SOL_IP 0
#define WEFT_SOL_IPV6 41
#define WEFT_SO_ORIGINAL_DST 80

/* The kernel only hands the first page of a larger buffer to the program. Set by the loader. */
const volatile __u32 weft_page_size = 4096;

/* Attaches: cgroup/getsockopt at the cgroup root.
 * Decides: getsockopt(SOL_IP or SOL_IPV6, SO_ORIGINAL_DST) on a TCP socket whose local port is
 * 15001 and whose peer is a client that cgroup/connect redirected -> the original destination
 * (sockaddr_in for SOL_IP if it is IPv4; sockaddr_in6 for SOL_IPV6, IPv4 as v4-mapped), retval
 * 0. Every other call, or a buffer too small, passes through untouched. Not gated on
 * enrollment: a pod leaving the mesh must not break connections already redirected. */
SEC("cgroup/getsockopt")
int weft_getsockopt(struct bpf_sockopt *ctx)
{
	struct weft_sockaddr *dst;
	struct bpf_sock *sk;

	/* A result over a page (iptables' table dumps): the program saw only part of it. optlen 0
	 * tells the kernel to return the original result as it is (merbridge issue 323). */
	if (ctx->optlen > (__s32)weft_page_size) {
		ctx->optlen = 0;
		return 1;
	}
	if (ctx->optname != WEFT_SO_ORIGINAL_DST)
		return 1;
	if (ctx->level != WEFT_SOL_IP && ctx->level != WEFT_SOL_IPV6)
		return 1;
	sk = ctx->sk;
	if (!sk || sk->protocol != WEFT_IPPROTO_TCP_K || sk->src_port != WEFT_PORT_OUTBOUND)
		return 1;
	dst = weft_orig_dst_of_peer(ctx, sk);
	if (!dst)
		return 1;

	if (ctx->level == WEFT_SOL_IP) {
		struct sockaddr_in *sin = ctx->optval;

		if (dst->family != WEFT_AF_INET)
			return 1;
		if ((void *)(sin + 1) > ctx->optval_end)
			return 1;
		sin->sin_family = WEFT_AF_INET_K;
		sin->sin_port = dst->port;
		sin->sin_addr.s_addr = dst->ip[0];
		__builtin_memset(sin->__pad, 0, sizeof(sin->__pad));
		ctx->optlen = sizeof(*sin);
	} else {
		struct sockaddr_in6 *sin6 = ctx->optval;

		if ((void *)(sin6 + 1) > ctx->optval_end)
			return 1;
		sin6->sin6_family = WEFT_AF_INET6_K;
		sin6->sin6_port = dst->port;
		sin6->sin6_flowinfo = 0;
		sin6->sin6_scope_id = 0;
		if (dst->family == WEFT_AF_INET) {
			sin6->sin6_addr.in6_u.u6_addr32[0] = 0;
			sin6->sin6_addr.in6_u.u6_addr32[1] = 0;
			sin6->sin6_addr.in6_u.u6_addr32[2] = bpf_htonl(0x0000ffff);
			sin6->sin6_addr.in6_u.u6_addr32[3] = dst->ip[0];
		} else {
			sin6->sin6_addr.in6_u.u6_addr32[0] = dst->ip[0];
			sin6->sin6_addr.in6_u.u6_addr32[1] = dst->ip[1];
			sin6->sin6_addr.in6_u.u6_addr32[2] = dst->ip[2];
			sin6->sin6_addr.in6_u.u6_addr32[3] = dst->ip[3];
		}
		ctx->optlen = sizeof(*sin6);
	}
	ctx->retval = 0;
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
