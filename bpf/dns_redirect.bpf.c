// SPDX-License-Identifier: GPL-2.0
/* DNS capture for unconnected UDP sockets, and the way back for every UDP DNS socket: queries to
 * port 53 go to the ztunnel's DNS proxy (15053) in the pod's own netns; its answers reach the
 * app as if the resolver the app asked had sent them. (Connected sockets: redirect_connect.) */
#include "vmlinux.h"
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "lib/addr.h"
#include "lib/dns.h"
#include "lib/events.h"

/* Attaches: cgroup/sendmsg4 at the cgroup root.
 * Decides: sendto()/sendmsg() with an address, UDP to port 53 (not loopback) in a netns enrolled
 * for DNS, not from a ztunnel socket -> remember the resolver for this socket (weft_dns_dst) and
 * send to 127.0.0.1:15053 instead. Also runs for v4-mapped destinations of IPv6 sockets. If the
 * resolver cannot be remembered the datagram goes where it was sent. Never refuses a send. */
SEC("cgroup/sendmsg4")
int weft_sendmsg4(struct bpf_sock_addr *ctx)
{
	struct weft_sockaddr dst;
	__u64 cookie;

	if (weft_ip4_is_local(ctx->user_ip4))
		return 1;
	cookie = bpf_get_netns_cookie(ctx);
	if (!weft_dns_is_udp(ctx) || !weft_dns_candidate(ctx, cookie))
		return 1;
	weft_sockaddr_v4(&dst, ctx->user_ip4, (__u16)ctx->user_port);
	if (!weft_dns_remember(ctx, cookie, &dst))
		return 1;
	ctx->user_ip4 = bpf_htonl(WEFT_V4_LOOPBACK);
	ctx->user_port = bpf_htons(weft_dns_port);
	weft_emit(WEFT_EVENT_DNS_REDIRECT, cookie, NULL, &dst);
	return 1;
}

/* Attaches: cgroup/sendmsg6 at the cgroup root.
 * Decides: the same for IPv6 destinations -> [::1]:15053. (The kernel hands v4-mapped
 * destinations to the IPv4 path, so cgroup/sendmsg4 sees those.) */
SEC("cgroup/sendmsg6")
int weft_sendmsg6(struct bpf_sock_addr *ctx)
{
	__u32 ip6[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	struct weft_sockaddr dst;
	bool mapped;
	__u64 cookie;

	mapped = weft_ip6_is_v4mapped(ip6);
	if (mapped ? weft_ip4_is_local(ip6[3]) : weft_ip6_is_local(ip6))
		return 1;
	cookie = bpf_get_netns_cookie(ctx);
	if (!weft_dns_is_udp(ctx) || !weft_dns_candidate(ctx, cookie))
		return 1;
	weft_sockaddr_v6(&dst, ip6, (__u16)ctx->user_port);
	if (!weft_dns_remember(ctx, cookie, &dst))
		return 1;
	weft_dns_set_loopback6(ctx, mapped);
	ctx->user_port = bpf_htons(weft_dns_port);
	weft_emit(WEFT_EVENT_DNS_REDIRECT, cookie, NULL, &dst);
	return 1;
}

/* Attaches: cgroup/recvmsg4 at the cgroup root.
 * Decides: a datagram read with its source address (recvfrom/recvmsg) from 127.0.0.1:15053 on
 * a socket whose query was sent there (weft_dns_dst has it) -> the source reads as the resolver
 * the app asked (resolver libraries drop answers from anyone else). Not gated on enrollment: an
 * answer to a query sent before the pod left the mesh still gets its address. */
SEC("cgroup/recvmsg4")
int weft_recvmsg4(struct bpf_sock_addr *ctx)
{
	struct weft_sockaddr *resolver;

	if (ctx->user_port != bpf_htons(weft_dns_port) ||
	    ctx->user_ip4 != bpf_htonl(WEFT_V4_LOOPBACK))
		return 1;
	resolver = weft_dns_resolver_of(ctx);
	if (!resolver || resolver->family != WEFT_AF_INET)
		return 1;
	ctx->user_ip4 = resolver->ip[0];
	ctx->user_port = resolver->port;
	return 1;
}

/* Attaches: cgroup/recvmsg6 at the cgroup root.
 * Decides: the same for IPv6 sockets: from [::1]:15053 -> the IPv6 resolver; from
 * ::ffff:127.0.0.1:15053 -> the IPv4 resolver as ::ffff:a.b.c.d. */
SEC("cgroup/recvmsg6")
int weft_recvmsg6(struct bpf_sock_addr *ctx)
{
	__u32 ip6[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	struct weft_sockaddr *resolver;
	bool mapped;

	if (ctx->user_port != bpf_htons(weft_dns_port))
		return 1;
	mapped = weft_ip6_is_v4mapped(ip6);
	if (mapped ? ip6[3] != bpf_htonl(WEFT_V4_LOOPBACK)
		   : !(ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == bpf_htonl(1)))
		return 1;
	resolver = weft_dns_resolver_of(ctx);
	if (!resolver || resolver->family != (mapped ? WEFT_AF_INET : WEFT_AF_INET6))
		return 1;
	if (mapped) {
		ctx->user_ip6[3] = resolver->ip[0];
	} else {
		ctx->user_ip6[0] = resolver->ip[0];
		ctx->user_ip6[1] = resolver->ip[1];
		ctx->user_ip6[2] = resolver->ip[2];
		ctx->user_ip6[3] = resolver->ip[3];
	}
	ctx->user_port = resolver->port;
	return 1;
}

/* Attaches: cgroup/sock_release at the cgroup root.
 * Decides: nothing (always allows); a UDP socket that closes loses its weft_dns_dst entry, so
 * the LRU holds only live sockets' resolvers. (The recvmsg path cannot delete: a connected
 * socket reads many answers, one per query, all needing the same entry.) */
SEC("cgroup/sock_release")
int weft_sock_release(struct bpf_sock *ctx)
{
	if (ctx->protocol == WEFT_DNS_IPPROTO_UDP)
		weft_dns_forget(ctx);
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
