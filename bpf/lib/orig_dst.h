/* Original destinations of redirected connections, keyed by (netns cookie, client address):
 * written by sockops when the client's port is known, read by cgroup/getsockopt on the ztunnel's
 * accepted socket, whose peer is that client address. */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "lib/addr.h"
#include "lib/maps.h"

#define WEFT_AF_INET_K 2
#define WEFT_AF_INET6_K 10
#define WEFT_IPPROTO_TCP_K 6

/* The client side's own address, as sockops sees it (local end of the app's socket). */
static __always_inline bool weft_orig_dst_key_sockops(struct bpf_sock_ops *skops,
						      struct weft_orig_dst_key *key)
{
	__u16 port_be = bpf_htons((__u16)skops->local_port);

	__builtin_memset(key, 0, sizeof(*key));
	key->netns_cookie = bpf_get_netns_cookie(skops);
	if (skops->family == WEFT_AF_INET_K) {
		weft_sockaddr_v4(&key->client, skops->local_ip4, port_be);
	} else if (skops->family == WEFT_AF_INET6_K) {
		__u32 ip6[4] = { skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2],
				 skops->local_ip6[3] };

		weft_sockaddr_v6(&key->client, ip6, port_be);
	} else {
		return false;
	}
	return true;
}

/* Active side established: the client port is final now; move the destination from socket
 * storage into weft_orig_dst and ask for state callbacks so the entry goes at close. */
static __always_inline void weft_orig_dst_publish(struct bpf_sock_ops *skops)
{
	struct weft_orig_dst_key key;
	struct weft_sockaddr *dst;
	struct bpf_sock *sk = skops->sk;

	if (!sk)
		return;
	dst = bpf_sk_storage_get(&weft_sk_dst, sk, 0, 0);
	if (!dst)
		return;
	if (!weft_orig_dst_key_sockops(skops, &key))
		return;
	if (bpf_map_update_elem(&weft_orig_dst, &key, dst, BPF_ANY) != 0)
		return;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* The client socket closed: its 4-tuple may be reused, so forget the entry. */
static __always_inline void weft_orig_dst_forget(struct bpf_sock_ops *skops)
{
	struct weft_orig_dst_key key;
	struct bpf_sock *sk = skops->sk;

	if (!sk || !bpf_sk_storage_get(&weft_sk_dst, sk, 0, 0))
		return;
	if (!weft_orig_dst_key_sockops(skops, &key))
		return;
	bpf_map_delete_elem(&weft_orig_dst, &key);
}

/* The ztunnel's accepted socket: its peer is the client's address. */
static __always_inline struct weft_sockaddr *weft_orig_dst_of_peer(struct bpf_sockopt *ctx,
								    struct bpf_sock *sk)
{
	struct weft_orig_dst_key key;

	__builtin_memset(&key, 0, sizeof(key));
	key.netns_cookie = bpf_get_netns_cookie(ctx);
	if (sk->family == WEFT_AF_INET_K) {
		weft_sockaddr_v4(&key.client, sk->dst_ip4, sk->dst_port);
	} else if (sk->family == WEFT_AF_INET6_K) {
		__u32 ip6[4] = { sk->dst_ip6[0], sk->dst_ip6[1], sk->dst_ip6[2], sk->dst_ip6[3] };

		weft_sockaddr_v6(&key.client, ip6, sk->dst_port);
	} else {
		return NULL;
	}
	return bpf_map_lookup_elem(&weft_orig_dst, &key);
}
