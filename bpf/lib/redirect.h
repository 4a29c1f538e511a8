/* Outbound redirect: which connect() calls go to the ztunnel's 15001 listener in the caller's
 * own netns, and remembering where they were going. */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#include "abi/ports.h"
#include "lib/addr.h"
#include "lib/enroll.h"
#include "lib/maps.h"

#define WEFT_SOCK_STREAM 1
#define WEFT_IPPROTO_TCP 6

/* The ztunnel's outbound listener port (tunable for tests of other setups). */
const volatile __u16 weft_outbound_port = WEFT_PORT_OUTBOUND;

/* An app's TCP connect() in an enrolled netns, on a socket that is not the ztunnel's. */
static __always_inline bool weft_redirect_candidate(struct bpf_sock_addr *ctx, __u64 netns_cookie)
{
	if (ctx->type != WEFT_SOCK_STREAM || ctx->protocol != WEFT_IPPROTO_TCP)
		return false;
	if (weft_is_ztunnel_socket(ctx->sk))
		return false;
	return weft_netns_has(netns_cookie, WEFT_ENROLL_REDIRECT_OUTBOUND);
}

/* Stores the original destination on the socket. False if the storage cannot be had (memory):
 * then the connection is left alone rather than sent to a ztunnel that could not route it. */
static __always_inline bool weft_remember_orig_dst(struct bpf_sock_addr *ctx,
						   const struct weft_sockaddr *dst)
{
	struct weft_sockaddr *stored;

	stored = bpf_sk_storage_get(&weft_sk_dst, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!stored)
		return false;
	*stored = *dst;
	return true;
}
