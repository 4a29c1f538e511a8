/* DNS capture: which UDP and TCP packets to port 53 go to the ztunnel's DNS proxy (15053) in the
 * pod's own netns, remembering the resolver they were for, and giving answers back its address. */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "abi/ports.h"
#include "lib/addr.h"
#include "lib/enroll.h"
#include "lib/maps.h"

#define WEFT_DNS_SOCK_STREAM 1
#define WEFT_DNS_SOCK_DGRAM 2
#define WEFT_DNS_IPPROTO_TCP 6
#define WEFT_DNS_IPPROTO_UDP 17

/* The ztunnel's DNS port (tunable for tests of other setups). */
const volatile __u16 weft_dns_port = WEFT_PORT_DNS;

/* A query to port 53 from an app socket (not the ztunnel's) in a netns enrolled for DNS. The
 * caller has already excluded loopback destinations (a resolver inside the pod stays local). */
static __always_inline bool weft_dns_candidate(struct bpf_sock_addr *ctx, __u64 netns_cookie)
{
	if (ctx->user_port != bpf_htons(WEFT_PORT_DNS_SERVICE))
		return false;
	if (ctx->protocol != WEFT_DNS_IPPROTO_UDP && ctx->protocol != WEFT_DNS_IPPROTO_TCP)
		return false;
	if (weft_is_ztunnel_socket(ctx->sk))
		return false;
	return weft_netns_has(netns_cookie, WEFT_ENROLL_REDIRECT_DNS);
}

static __always_inline bool weft_dns_is_udp(struct bpf_sock_addr *ctx)
{
	return ctx->type == WEFT_DNS_SOCK_DGRAM && ctx->protocol == WEFT_DNS_IPPROTO_UDP;
}

/* Remembers the resolver of a UDP socket by its cookie. False (the query then goes where it was
 * sent) if the map is full of entries it cannot evict. */
static __always_inline bool weft_dns_remember(struct bpf_sock_addr *ctx, __u64 netns_cookie,
					      const struct weft_sockaddr *resolver)
{
	struct weft_dns_key key = {
		.socket_cookie = bpf_get_socket_cookie(ctx),
		.netns_cookie = netns_cookie,
	};

	return bpf_map_update_elem(&weft_dns_dst, &key, resolver, BPF_ANY) == 0;
}

/* The resolver a UDP socket's answers from the ztunnel's 15053 should appear to come from. */
static __always_inline struct weft_sockaddr *weft_dns_resolver_of(struct bpf_sock_addr *ctx)
{
	struct weft_dns_key key = {
		.socket_cookie = bpf_get_socket_cookie(ctx),
		.netns_cookie = bpf_get_netns_cookie(ctx),
	};

	return bpf_map_lookup_elem(&weft_dns_dst, &key);
}

/* Forgets a closing socket's resolver. Its cookie is never reused, so the entry could only
 * wait for LRU eviction, pushing out live sockets' entries under churn. */
static __always_inline void weft_dns_forget(struct bpf_sock *sk)
{
	struct weft_dns_key key = {
		.socket_cookie = bpf_get_socket_cookie(sk),
		.netns_cookie = bpf_get_netns_cookie(sk),
	};

	bpf_map_delete_elem(&weft_dns_dst, &key);
}

/* ::ffff:127.0.0.1 / ::1 as destination of a rewritten IPv6 socket. */
static __always_inline void weft_dns_set_loopback6(struct bpf_sock_addr *ctx, bool mapped)
{
	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	if (mapped) {
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = bpf_htonl(WEFT_V4_LOOPBACK);
	} else {
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
}
