// SPDX-License-Identifier: GPL-2.0
/* Inbound steering: new plaintext TCP connections to a pod go to the ztunnel's 15006 listener
 * for the pod IP, keeping the local address (getsockname() gives the port the caller asked). */
#include "vmlinux.h"
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "lib/events.h"
#include "lib/fast.h"
#include "lib/inbound.h"

/* Attaches: sk_lookup, one link per enrolled pod netns.
 * Decides: TCP to a pod IP that has a listener in weft_inbound_lst, unless exempt (ztunnel port,
 * from 127.0.0.6, from the pod's own address, from a bypass source, a same-node fast connection
 * keyed in weft_fast_conn) -> that listener. No entry, exempt, or the listener cannot take it ->
 * SK_PASS with nothing selected: the normal lookup. */
SEC("sk_lookup")
int weft_sk_lookup(struct bpf_sk_lookup *ctx)
{
	struct weft_sockaddr src, dst;
	struct weft_ip local, remote;
	struct bpf_sock *sk;
	long err;

	if (!weft_lookup_addrs(ctx, &local, &remote))
		return SK_PASS;
	if (weft_inbound_exempt(ctx, &local, &remote))
		return SK_PASS;
	if (weft_fast_inbound(ctx, &local, &remote))
		return SK_PASS;
	sk = bpf_map_lookup_elem(&weft_inbound_lst, &local);
	if (!sk)
		return SK_PASS;
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return SK_PASS;

	__builtin_memcpy(src.ip, remote.ip, sizeof(src.ip));
	src.family = remote.family;
	src.port = ctx->remote_port;
	src.reserved = 0;
	__builtin_memcpy(dst.ip, local.ip, sizeof(dst.ip));
	dst.family = local.family;
	dst.port = bpf_htons((__u16)ctx->local_port);
	dst.reserved = 0;
	/* sk_lookup programs may not call bpf_get_netns_cookie(): the event names the pod by its
	 * IP (dst) and carries netns cookie 0. */
	weft_emit(WEFT_EVENT_INBOUND_STEER, 0, &src, &dst);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
