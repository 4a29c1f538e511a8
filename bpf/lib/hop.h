/* Local-hop acceleration: sockops puts both ends of an app <-> ztunnel loopback connection in an
 * enrolled pod into weft_hop_socks; the sk_msg program hands their sends to the peer socket.
 * Contract: bpf/abi/maps.h (weft_hop_*). */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "abi/ports.h"
#include "lib/addr.h"
#include "lib/enroll.h"
#include "lib/maps.h"

#define WEFT_HOP_AF_INET 2
#define WEFT_HOP_AF_INET6 10

static __always_inline void weft_hop_count(__u32 stat, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&weft_hop_stats, &stat);

	if (v)
		*v += n;
}

/* Loopback as a hop's far end: 127.0.0.0/8 or ::1 (a v4-mapped address is stored as IPv4). */
static __always_inline bool weft_hop_loopback(const struct weft_sockaddr *sa)
{
	if (sa->family == WEFT_AF_INET)
		return (bpf_ntohl(sa->ip[0]) >> 24) == 127;
	return sa->family == WEFT_AF_INET6 && sa->ip[0] == 0 && sa->ip[1] == 0 && sa->ip[2] == 0 &&
	       sa->ip[3] == bpf_htonl(1);
}

static __always_inline bool weft_hop_passthrough(const struct weft_sockaddr *sa)
{
	return sa->family == WEFT_AF_INET && sa->ip[0] == bpf_htonl(WEFT_INBOUND_PASSTHROUGH_V4);
}

/* A socket's own view of its connection, as sockops sees it. local_port is in host order,
 * remote_port in network order in the upper 16 bits (the kernel's sock_ops layout). */
static __always_inline bool weft_hop_key_sockops(struct bpf_sock_ops *skops,
						 struct weft_hop_key *key)
{
	__u16 lport = bpf_htons((__u16)skops->local_port);
	__u16 rport = (__u16)(skops->remote_port >> 16);

	__builtin_memset(key, 0, sizeof(*key));
	key->netns_cookie = bpf_get_netns_cookie(skops);
	if (skops->family == WEFT_HOP_AF_INET) {
		weft_sockaddr_v4(&key->local, skops->local_ip4, lport);
		weft_sockaddr_v4(&key->remote, skops->remote_ip4, rport);
		return true;
	}
	if (skops->family == WEFT_HOP_AF_INET6) {
		__u32 l6[4] = { skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2],
				skops->local_ip6[3] };
		__u32 r6[4] = { skops->remote_ip6[0], skops->remote_ip6[1], skops->remote_ip6[2],
				skops->remote_ip6[3] };

		weft_sockaddr_v6(&key->local, l6, lport);
		weft_sockaddr_v6(&key->remote, r6, rport);
		return true;
	}
	return false;
}

/* Which hop, if any, an established socket is one end of: WEFT_HOP_OUTBOUND for the app's
 * connection to the ztunnel's 15001 (either end), WEFT_HOP_INBOUND for the ztunnel's connection
 * from 127.0.0.6 to the app (either end); 0 for anything else. */
static __always_inline __u32 weft_hop_kind(const struct weft_hop_key *key, bool passive)
{
	const struct weft_sockaddr *ztunnel_end = passive ? &key->local : &key->remote;
	const struct weft_sockaddr *source = passive ? &key->remote : &key->local;

	if (ztunnel_end->port == bpf_htons(WEFT_PORT_OUTBOUND) && weft_hop_loopback(ztunnel_end) &&
	    weft_hop_loopback(source))
		return WEFT_HOP_OUTBOUND;
	if (weft_hop_passthrough(source))
		return WEFT_HOP_INBOUND;
	return 0;
}

/* ACTIVE_ESTABLISHED / PASSIVE_ESTABLISHED: a hop socket of an enrolled pod, with that hop
 * switched on, goes into weft_hop_socks, with fresh socket storage (no TCP send yet). Both ends
 * of a connection pass here (the client when the SYN-ACK arrives, the server at the final ACK),
 * so the second one to arrive completes the pair. */
static __always_inline void weft_hop_established(struct bpf_sock_ops *skops, bool passive)
{
	struct bpf_sock *sk = skops->sk;
	struct weft_hop_key key;
	__u32 zero = 0;
	__u32 *config;
	__u32 *flags;
	__u32 kind;

	config = bpf_map_lookup_elem(&weft_hop_config, &zero);
	if (!config || !*config || !sk)
		return;
	if (!weft_hop_key_sockops(skops, &key))
		return;
	kind = weft_hop_kind(&key, passive);
	if (!(kind & *config))
		return;
	if (!weft_netns_enrolled(key.netns_cookie))
		return;
	flags = bpf_sk_storage_get(&weft_sk_hop, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!flags) {
		weft_hop_count(WEFT_HOP_STAT_NO_STORAGE, 1);
		return;
	}
	*flags = 0;
	if (bpf_sock_hash_update(skops, &weft_hop_socks, &key, BPF_NOEXIST) == 0)
		weft_hop_count(WEFT_HOP_STAT_SOCKETS, 1);
	else
		weft_hop_count(WEFT_HOP_STAT_ADD_FAILED, 1);
}

/* The peer's key from a sender's sk_msg context: the same netns, local and remote swapped. */
static __always_inline bool weft_hop_peer_key(struct sk_msg_md *msg, struct weft_hop_key *key)
{
	__u16 lport = bpf_htons((__u16)msg->local_port);
	__u16 rport = (__u16)(msg->remote_port >> 16);

	__builtin_memset(key, 0, sizeof(*key));
	key->netns_cookie = bpf_get_netns_cookie(msg);
	if (msg->family == WEFT_HOP_AF_INET) {
		weft_sockaddr_v4(&key->local, msg->remote_ip4, rport);
		weft_sockaddr_v4(&key->remote, msg->local_ip4, lport);
		return true;
	}
	if (msg->family == WEFT_HOP_AF_INET6) {
		__u32 l6[4] = { msg->local_ip6[0], msg->local_ip6[1], msg->local_ip6[2],
				msg->local_ip6[3] };
		__u32 r6[4] = { msg->remote_ip6[0], msg->remote_ip6[1], msg->remote_ip6[2],
				msg->remote_ip6[3] };

		weft_sockaddr_v6(&key->local, r6, rport);
		weft_sockaddr_v6(&key->remote, l6, lport);
		return true;
	}
	return false;
}
