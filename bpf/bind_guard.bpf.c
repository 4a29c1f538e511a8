// SPDX-License-Identifier: GPL-2.0
/* Protects the ztunnel's ports inside enrolled pods: only a ztunnel socket (SO_MARK 0x539, set
 * before bind) may bind 15001/15006/15008/15053 there. */
#include "vmlinux.h"
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "lib/addr.h"
#include "lib/enroll.h"
#include "lib/events.h"
#include "lib/ports.h"

static __always_inline int weft_bind_verdict(struct bpf_sock_addr *ctx,
					     struct weft_sockaddr *addr)
{
	__u64 cookie;

	if (!weft_is_ztunnel_port(bpf_ntohs((__u16)ctx->user_port)))
		return 1;
	if (weft_is_ztunnel_socket(ctx->sk))
		return 1;
	cookie = bpf_get_netns_cookie(ctx);
	if (!weft_netns_enrolled(cookie))
		return 1;
	weft_emit(WEFT_EVENT_BIND_DENIED, cookie, addr, NULL);
	return 0;
}

/* Attaches: cgroup/bind4 at the cgroup root.
 * Decides: bind() of an IPv4 socket (any protocol) to a ztunnel port in an enrolled netns
 * without mark 0x539 -> refused (EPERM). Everything else binds as asked. */
SEC("cgroup/bind4")
int weft_bind4(struct bpf_sock_addr *ctx)
{
	struct weft_sockaddr addr;

	weft_sockaddr_v4(&addr, ctx->user_ip4, (__u16)ctx->user_port);
	return weft_bind_verdict(ctx, &addr);
}

/* Attaches: cgroup/bind6 at the cgroup root.
 * Decides: the same for IPv6 sockets (including dual-stack binds to [::]). */
SEC("cgroup/bind6")
int weft_bind6(struct bpf_sock_addr *ctx)
{
	__u32 ip6[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	struct weft_sockaddr addr;

	weft_sockaddr_v6(&addr, ip6, (__u16)ctx->user_port);
	return weft_bind_verdict(ctx, &addr);
}

char LICENSE[] SEC("license") = "GPL";
