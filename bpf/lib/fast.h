/* The same-node fast path: connect() of an allowed pod pair goes straight to the destination pod
 * (no ztunnel), sockops keys the connection's 4-tuple so the destination's sk_lookup lets it
 * through, and reports its bytes at close. Contract: bpf/abi/maps.h (weft_fast_*). */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "lib/addr.h"
#include "lib/maps.h"

#define WEFT_FAST_AF_INET 2
#define WEFT_FAST_AF_INET6 10

static __always_inline void weft_fast_count(__u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(&weft_fast_stats, &stat);

	if (n)
		*n += 1;
}

/* cgroup/connect4|6 of an app socket the redirect would send to 15001: if the ztunnel cached an
 * allowed verdict for (this netns, dst), mark the socket fast and let the connect go as asked.
 * False: no verdict, or the socket storage was refused (then the ztunnel path, counted). */
static __always_inline bool weft_fast_connect(struct bpf_sock_addr *ctx, __u64 netns_cookie,
					      const struct weft_sockaddr *dst)
{
	struct weft_fast_verdict *verdict;
	struct weft_fast_sock *st;
	struct weft_fast_key key;

	__builtin_memset(&key, 0, sizeof(key));
	key.src_netns_cookie = netns_cookie;
	key.dst = *dst;
	verdict = bpf_map_lookup_elem(&weft_fast_verdict, &key);
	if (!verdict)
		return false;
	st = bpf_sk_storage_get(&weft_sk_fast, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		weft_fast_count(WEFT_FAST_STAT_NO_STORAGE);
		return false;
	}
	st->start_ns = bpf_ktime_get_ns();
	st->dst_netns_cookie = verdict->dst_netns_cookie;
	st->dst = *dst;
	st->flags = 0;
	weft_fast_count(WEFT_FAST_STAT_CONNECTS);
	return true;
}

/* The client socket's own address as sockops sees it. */
static __always_inline bool weft_fast_local(struct bpf_sock_ops *skops, struct weft_sockaddr *sa)
{
	__u16 port_be = bpf_htons((__u16)skops->local_port);

	if (skops->family == WEFT_FAST_AF_INET) {
		weft_sockaddr_v4(sa, skops->local_ip4, port_be);
		return true;
	}
	if (skops->family == WEFT_FAST_AF_INET6) {
		__u32 ip6[4] = { skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2],
				 skops->local_ip6[3] };

		weft_sockaddr_v6(sa, ip6, port_be);
		return true;
	}
	return false;
}

/* Payload bytes each way, without SYN and FIN: the kernel's bytes_acked counts our SYN and FIN,
 * bytes_received the peer's FIN. Sent = payload handed to the wire less retransmissions (at a
 * clean close all of it was acked); received = bytes_received less the peer's FIN, which was
 * received when the socket is SOCK_DONE (tcp_fin sets it; tcp_done has not run yet). */
static __always_inline void weft_fast_data_bytes(struct bpf_sock_ops *skops, __u64 *sent,
						 __u64 *received)
{
	struct bpf_sock *sk = skops->sk;
	struct tcp_sock *tp;
	__u64 rcvd;

	*sent = 0;
	*received = 0;
	if (!sk)
		return;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return;
	*sent = tp->bytes_sent - tp->bytes_retrans;
	rcvd = tp->bytes_received;
	if ((tp->inet_conn.icsk_inet.sk.__sk_common.skc_flags & (1ul << SOCK_DONE)) && rcvd > 0)
		rcvd -= 1;
	*received = rcvd;
}

static __always_inline void weft_fast_emit(struct bpf_sock_ops *skops,
					   const struct weft_fast_sock *st, __u32 type,
					   __u32 old_state)
{
	struct weft_fast_event *ev;

	ev = bpf_ringbuf_reserve(&weft_events, sizeof(*ev), 0);
	if (!ev) {
		weft_fast_count(WEFT_FAST_STAT_EVENTS_LOST);
		return;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->head.timestamp_ns = bpf_ktime_get_ns();
	ev->head.netns_cookie = bpf_get_netns_cookie(skops);
	ev->head.type = type;
	weft_fast_local(skops, &ev->head.src);
	ev->head.dst = st->dst;
	ev->dst_netns_cookie = st->dst_netns_cookie;
	ev->start_ns = st->start_ns;
	if (type == WEFT_EVENT_FAST_CLOSE) {
		weft_fast_data_bytes(skops, &ev->bytes_sent, &ev->bytes_received);
		ev->old_state = old_state;
	}
	bpf_ringbuf_submit(ev, 0);
}

/* TCP_CONNECT_CB: the client port is chosen and the SYN not yet sent. Key the 4-tuple for the
 * destination's sk_lookup and ask for state callbacks (for the close). */
static __always_inline void weft_fast_connecting(struct bpf_sock_ops *skops)
{
	struct weft_fast_conn_key key;
	struct weft_fast_sock *st;
	struct bpf_sock *sk = skops->sk;
	__u64 cookie;

	if (!sk)
		return;
	st = bpf_sk_storage_get(&weft_sk_fast, sk, 0, 0);
	if (!st)
		return;
	__builtin_memset(&key, 0, sizeof(key));
	if (!weft_fast_local(skops, &key.src))
		return;
	key.dst = st->dst;
	cookie = bpf_get_netns_cookie(skops);
	if (bpf_map_update_elem(&weft_fast_conn, &key, &cookie, BPF_ANY) == 0)
		st->flags |= WEFT_FAST_SK_KEYED;
	else
		weft_fast_count(WEFT_FAST_STAT_NO_CONN_ENTRY);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* ACTIVE_ESTABLISHED: the connection is open. */
static __always_inline void weft_fast_established(struct bpf_sock_ops *skops)
{
	struct weft_fast_sock *st;
	struct bpf_sock *sk = skops->sk;

	if (!sk)
		return;
	st = bpf_sk_storage_get(&weft_sk_fast, sk, 0, 0);
	if (!st)
		return;
	st->flags |= WEFT_FAST_SK_OPENED;
	weft_fast_emit(skops, st, WEFT_EVENT_FAST_OPEN, 0);
}

/* TCP_CLOSE: report the bytes, forget the 4-tuple (it may be reused) and the socket's state (the
 * socket may connect again, elsewhere). */
static __always_inline void weft_fast_closed(struct bpf_sock_ops *skops, __u32 old_state)
{
	struct weft_fast_conn_key key;
	struct weft_fast_sock *st;
	struct bpf_sock *sk = skops->sk;

	if (!sk)
		return;
	st = bpf_sk_storage_get(&weft_sk_fast, sk, 0, 0);
	if (!st)
		return;
	if (st->flags & WEFT_FAST_SK_KEYED) {
		__builtin_memset(&key, 0, sizeof(key));
		if (weft_fast_local(skops, &key.src)) {
			key.dst = st->dst;
			bpf_map_delete_elem(&weft_fast_conn, &key);
		}
	}
	weft_fast_emit(skops, st, WEFT_EVENT_FAST_CLOSE, old_state);
	bpf_sk_storage_delete(&weft_sk_fast, sk);
}

/* sk_lookup in the destination pod's netns: is this new connection a fast one (its 4-tuple was
 * keyed by the client's sockops)? Then it goes to the app, not to 15006. */
static __always_inline bool weft_fast_inbound(struct bpf_sk_lookup *ctx, const struct weft_ip *local,
					      const struct weft_ip *remote)
{
	struct weft_fast_conn_key key;

	__builtin_memset(&key, 0, sizeof(key));
	__builtin_memcpy(key.src.ip, remote->ip, sizeof(key.src.ip));
	key.src.family = remote->family;
	key.src.port = (__u16)ctx->remote_port;
	__builtin_memcpy(key.dst.ip, local->ip, sizeof(key.dst.ip));
	key.dst.family = local->family;
	key.dst.port = bpf_htons((__u16)ctx->local_port);
	if (!bpf_map_lookup_elem(&weft_fast_conn, &key))
		return false;
	weft_fast_count(WEFT_FAST_STAT_LOOKUP_PASSED);
	return true;
}
