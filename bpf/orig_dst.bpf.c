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

/* Writes the original destination of the ztunnel's accepted 15001 socket into the caller's
 * buffer. False (nothing touched) if the call is not one to answer. */
static __always_inline bool weft_answer_orig_dst(struct bpf_sockopt *ctx)
{
	struct weft_sockaddr *dst;
	struct bpf_sock *sk;

	if (ctx->optname != WEFT_SO_ORIGINAL_DST)
		return false;
	if (ctx->level != WEFT_SOL_IP && ctx->level != WEFT_SOL_IPV6)
		return false;
	sk = ctx->sk;
	if (!sk || sk->protocol != WEFT_IPPROTO_TCP_K || sk->src_port != WEFT_PORT_OUTBOUND)
		return false;
	dst = weft_orig_dst_of_peer(ctx, sk);
	if (!dst)
		return false;

	/* optval..optval_end is the first page of the caller's buffer at most: enough for either
	 * answer, so a caller passing a bigger buffer (even over a page) still gets it. */
	if (ctx->level == WEFT_SOL_IP) {
		struct sockaddr_in *sin = ctx->optval;

		if (dst->family != WEFT_AF_INET)
			return false;
		if ((void *)(sin + 1) > ctx->optval_end)
			return false;
		sin->sin_family = WEFT_AF_INET_K;
		sin->sin_port = dst->port;
		sin->sin_addr.s_addr = dst->ip[0];
		__builtin_memset(sin->__pad, 0, sizeof(sin->__pad));
		ctx->optlen = sizeof(*sin);
	} else {
		struct sockaddr_in6 *sin6 = ctx->optval;

		if ((void *)(sin6 + 1) > ctx->optval_end)
			return false;
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
	return true;
}

/* Attaches: cgroup/getsockopt at the cgroup root.
 * Decides: getsockopt(SOL_IP or SOL_IPV6, SO_ORIGINAL_DST) on a TCP socket whose local port is
 * 15001 and whose peer is a client that cgroup/connect redirected -> the original destination
 * (sockaddr_in for SOL_IP if it is IPv4; sockaddr_in6 for SOL_IPV6, IPv4 as v4-mapped), retval
 * 0. Every other call, or a buffer too small, keeps the kernel's answer. Not gated on
 * enrollment: a pod leaving the mesh must not break connections already redirected. */
SEC("cgroup/getsockopt")
int weft_getsockopt(struct bpf_sockopt *ctx)
{
	if (weft_answer_orig_dst(ctx))
		return 1;
	/* A call with more than a page (iptables' table dumps): the program saw only part of it;
	 * optlen 0 tells the kernel to return its own result untouched. Older kernels fail such
	 * calls with EFAULT otherwise (merbridge issue 323). Smaller calls are left as they are. */
	if (ctx->optlen > (__s32)weft_page_size)
		ctx->optlen = 0;
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
