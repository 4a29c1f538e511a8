// SPDX-License-Identifier: GPL-2.0
/* Local-hop acceleration: a send on one end of an app <-> ztunnel loopback connection in an
 * enrolled pod goes straight to the other end's receive queue, not through loopback TCP. */
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>

#include "lib/hop.h"

/* Low bits of sk_user_data are flags (SK_USER_DATA_NOCOPY|BPF|PSOCK); the rest is the psock. */
#define WEFT_SK_USER_DATA_PTRMASK (~7ul)

/* Redirected bytes the socket that this message was just redirected to has not read yet (its
 * psock's msg_tot_len, without this message), or 0 if it cannot be read (~0 if this kernel has
 * no such field). sk_msg programs cannot
 * release a socket from a map lookup, so the peer comes from the kernel's struct sk_msg (the
 * program's context) that bpf_msg_redirect_hash filled in. */
static __always_inline __u32 weft_hop_redirect_target_unread(struct sk_msg_md *md)
{
	struct sk_msg *msg = (struct sk_msg *)md;
	struct sk_psock *psock;
	unsigned long data;
	struct sock *peer;
	__u32 unread = 0;

	/* A kernel without the field cannot bound the backlog: report it full, so every sender
	 * moves to TCP after its first message (safe, not accelerated). */
	if (!bpf_core_field_exists(struct sk_psock, msg_tot_len))
		return ~0u;
	peer = BPF_CORE_READ(msg, sk_redir);
	if (!peer)
		return 0;
	data = (unsigned long)BPF_CORE_READ(peer, sk_user_data);
	psock = (struct sk_psock *)(data & WEFT_SK_USER_DATA_PTRMASK);
	if (!psock)
		return 0;
	if (bpf_probe_read_kernel(&unread, sizeof(unread), &psock->msg_tot_len))
		return 0;
	return unread;
}

/* Attaches: sk_msg verdict on the weft_hop_socks map (every socket sockops put there).
 * Decides: redirect the message to the peer socket's ingress when the peer is in the map and
 * this socket never sent over TCP; otherwise send it over TCP as usual, and from then on always
 * over TCP (redirected bytes must never overtake TCP bytes still queued at the reader). The same
 * once the peer has more than WEFT_HOP_MAX_UNREAD redirected bytes unread: the kernel would queue
 * without limit, TCP throttles (redirected bytes are older than TCP ones and read first, so the
 * move keeps the order). Never drops a message. */
SEC("sk_msg")
int weft_hop_msg(struct sk_msg_md *msg)
{
	struct weft_hop_key peer;
	__u32 unread;
	__u32 *flags;
	__u64 size = msg->size;

	flags = bpf_sk_storage_get(&weft_sk_hop, msg->sk, 0, 0);
	if (!flags) {
		weft_hop_count(WEFT_HOP_STAT_NO_STORAGE, 1);
		return SK_PASS;
	}
	if (*flags & WEFT_HOP_SK_TCP) {
		weft_hop_count(WEFT_HOP_STAT_TCP_MSGS, 1);
		return SK_PASS;
	}
	if (!weft_hop_peer_key(msg, &peer))
		return SK_PASS;
	if (bpf_msg_redirect_hash(msg, &weft_hop_socks, &peer, BPF_F_INGRESS) == SK_PASS) {
		weft_hop_count(WEFT_HOP_STAT_MSGS, 1);
		weft_hop_count(WEFT_HOP_STAT_BYTES, size);
		unread = weft_hop_redirect_target_unread(msg);
		if (unread > WEFT_HOP_MAX_UNREAD) {
			/* This message still goes (a redirect cannot be taken back), the next ones
			 * over TCP. */
			*flags |= WEFT_HOP_SK_TCP;
			weft_hop_count(WEFT_HOP_STAT_PEER_FULL, 1);
		}
		return SK_PASS;
	}
	*flags |= WEFT_HOP_SK_TCP;
	weft_hop_count(WEFT_HOP_STAT_TCP_MSGS, 1);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
