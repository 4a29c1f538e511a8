// SPDX-License-Identifier: GPL-2.0
/* Local-hop acceleration: a send on one end of an app <-> ztunnel loopback connection in an
 * enrolled pod goes straight to the other end's receive queue, not through loopback TCP. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#include "lib/hop.h"

/* Attaches: sk_msg verdict on the weft_hop_socks map (every socket sockops put there).
 * Decides: redirect the message to the peer socket's ingress when the peer is in the map and
 * this socket never sent over TCP; otherwise send it over TCP as usual, and from then on always
 * over TCP (redirected bytes must never overtake TCP bytes still queued at the reader). Never
 * drops a message. */
SEC("sk_msg")
int weft_hop_msg(struct sk_msg_md *msg)
{
	struct weft_hop_key peer;
	__u32 *flags;
	__u64 size = msg->size;

	flags = bpf_sk_storage_get(&weft_sk_hop, msg->sk, 0, 0);
	if (!flags) {
		weft_hop_count(WEFT_HOP_STAT_NO_STORAGE, 1);
		return SK_PASS;
	}
	if (*flags & WEFT_HOP_SK_TCP) {
		weft_hop_count(WEFT_HOP_STAT_NO_PEER, 1);
		return SK_PASS;
	}
	if (!weft_hop_peer_key(msg, &peer))
		return SK_PASS;
	if (bpf_msg_redirect_hash(msg, &weft_hop_socks, &peer, BPF_F_INGRESS) == SK_PASS) {
		weft_hop_count(WEFT_HOP_STAT_MSGS, 1);
		weft_hop_count(WEFT_HOP_STAT_BYTES, size);
		return SK_PASS;
	}
	*flags |= WEFT_HOP_SK_TCP;
	weft_hop_count(WEFT_HOP_STAT_NO_PEER, 1);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
