/* Inbound steering: which new inbound TCP connections to a pod go to the ztunnel's 15006
 * listener for that pod IP, and which keep their normal lookup. */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "abi/ports.h"
#include "lib/addr.h"
#include "lib/maps.h"
#include "lib/ports.h"

#define WEFT_IPPROTO_TCP 6

/* Fills the local (pod) and remote (caller) addresses of the lookup. */
static __always_inline bool weft_lookup_addrs(struct bpf_sk_lookup *ctx, struct weft_ip *local,
					       struct weft_ip *remote)
{
	if (ctx->family == 2) {
		weft_ip_v4(local, ctx->local_ip4);
		weft_ip_v4(remote, ctx->remote_ip4);
		return true;
	}
	if (ctx->family == 10) {
		__u32 l6[4] = { ctx->local_ip6[0], ctx->local_ip6[1], ctx->local_ip6[2],
				ctx->local_ip6[3] };
		__u32 r6[4] = { ctx->remote_ip6[0], ctx->remote_ip6[1], ctx->remote_ip6[2],
				ctx->remote_ip6[3] };

		weft_ip_v6(local, l6);
		weft_ip_v6(remote, r6);
		return true;
	}
	return false;
}

/* Connections that keep the kernel's normal lookup: not TCP, to a ztunnel port, from the
 * ztunnel's passthrough source 127.0.0.6, from the pod's own address (the pod to itself, and the
 * ztunnel's IPv6 connections to the app), or from a bypass source (the node's probes). */
static __always_inline bool weft_inbound_exempt(struct bpf_sk_lookup *ctx,
						const struct weft_ip *local,
						const struct weft_ip *remote)
{
	if (ctx->protocol != WEFT_IPPROTO_TCP)
		return true;
	if (weft_is_ztunnel_port((__u16)ctx->local_port))
		return true;
	if (remote->family == WEFT_AF_INET &&
	    remote->ip[0] == bpf_htonl(WEFT_INBOUND_PASSTHROUGH_V4))
		return true;
	if (weft_ip_equal(remote, local))
		return true;
	return bpf_map_lookup_elem(&weft_in_bypass, remote) != NULL;
}
