// SPDX-License-Identifier: GPL-2.0
/* Outbound redirect: an app's TCP connect() in an enrolled pod goes to the ztunnel's outbound
 * listener in the pod's own netns, with the original destination kept on the socket. */
#include "vmlinux.h"
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "lib/addr.h"
#include "lib/dns.h"
#include "lib/events.h"
#include "lib/fast.h"
#include "lib/redirect.h"

/* DNS to port 53 (UDP or TCP) from an enrolled pod: keep the resolver (UDP: weft_dns_dst by
 * socket cookie; TCP: socket storage, re-keyed by sockops like any redirected connection) and
 * let the caller point the socket at the DNS proxy. False: not a DNS query, or nothing kept. */
static __always_inline bool weft_dns_connect(struct bpf_sock_addr *ctx, __u64 cookie,
					     const struct weft_sockaddr *dst)
{
	if (!weft_dns_candidate(ctx, cookie))
		return false;
	if (weft_dns_is_udp(ctx))
		return weft_dns_remember(ctx, cookie, dst);
	if (ctx->type != WEFT_SOCK_STREAM)
		return false;
	return weft_remember_orig_dst(ctx, dst);
}

/* Attaches: cgroup/connect4 at the cgroup root.
 * Decides: IPv4 TCP connect() in an enrolled netns, not from a ztunnel socket (mark 0x539), not
 * to a loopback or unspecified destination -> remember the destination, connect to
 * 127.0.0.1:15001 instead; UDP or TCP to port 53 in a netns enrolled for DNS -> 127.0.0.1:15053
 * (the DNS proxy); a destination the ztunnel cached as allowed for this netns (weft_fast_verdict:
 * a pod on this node) -> connects as asked, marked fast (lib/fast.h). Everything else connects
 * as asked. Never refuses a connect. */
SEC("cgroup/connect4")
int weft_connect4(struct bpf_sock_addr *ctx)
{
	struct weft_sockaddr dst;
	__u64 cookie;

	if (weft_ip4_is_local(ctx->user_ip4))
		return 1;
	cookie = bpf_get_netns_cookie(ctx);
	weft_sockaddr_v4(&dst, ctx->user_ip4, (__u16)ctx->user_port);
	if (weft_dns_connect(ctx, cookie, &dst)) {
		ctx->user_ip4 = bpf_htonl(WEFT_V4_LOOPBACK);
		ctx->user_port = bpf_htons(weft_dns_port);
		weft_emit(WEFT_EVENT_DNS_REDIRECT, cookie, NULL, &dst);
		return 1;
	}
	if (!weft_redirect_candidate(ctx, cookie))
		return 1;
	if (weft_fast_connect(ctx, cookie, &dst))
		return 1;
	if (!weft_remember_orig_dst(ctx, &dst))
		return 1;
	ctx->user_ip4 = bpf_htonl(WEFT_V4_LOOPBACK);
	ctx->user_port = bpf_htons(weft_outbound_port);
	weft_emit(WEFT_EVENT_REDIRECT, cookie, NULL, &dst);
	return 1;
}

/* Attaches: cgroup/connect6 at the cgroup root.
 * Decides: the same for IPv6 sockets -> [::1]:15001 (DNS: [::1]:15053); a v4-mapped destination
 * (an IPv4 peer reached through a v6 socket) -> ::ffff:127.0.0.1:15001 (15053), remembered as
 * IPv4. */
SEC("cgroup/connect6")
int weft_connect6(struct bpf_sock_addr *ctx)
{
	__u32 ip6[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	struct weft_sockaddr dst;
	bool mapped;
	__u64 cookie;

	mapped = weft_ip6_is_v4mapped(ip6);
	if (mapped ? weft_ip4_is_local(ip6[3]) : weft_ip6_is_local(ip6))
		return 1;
	cookie = bpf_get_netns_cookie(ctx);
	weft_sockaddr_v6(&dst, ip6, (__u16)ctx->user_port);
	if (weft_dns_connect(ctx, cookie, &dst)) {
		weft_dns_set_loopback6(ctx, mapped);
		ctx->user_port = bpf_htons(weft_dns_port);
		weft_emit(WEFT_EVENT_DNS_REDIRECT, cookie, NULL, &dst);
		return 1;
	}
	if (!weft_redirect_candidate(ctx, cookie))
		return 1;
	if (weft_fast_connect(ctx, cookie, &dst))
		return 1;
	if (!weft_remember_orig_dst(ctx, &dst))
		return 1;
	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	if (mapped) {
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = bpf_htonl(WEFT_V4_LOOPBACK);
	} else {
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = bpf_htons(weft_outbound_port);
	weft_emit(WEFT_EVENT_REDIRECT, cookie, NULL, &dst);
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
