/* Enrollment: is the socket's network namespace one the agent enrolled, and is the socket one of
 * the ztunnel's own (SO_MARK), which every hook lets through. */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#include "abi/ports.h"
#include "lib/maps.h"

/* The mark the ztunnel puts on every socket it opens. */
const volatile __u32 weft_ztunnel_mark = WEFT_ZTUNNEL_MARK;

static __always_inline bool weft_netns_has(__u64 netns_cookie, __u32 flag)
{
	struct weft_enrollment *e = bpf_map_lookup_elem(&weft_enrolled, &netns_cookie);

	return e && (e->flags & flag);
}

static __always_inline bool weft_netns_enrolled(__u64 netns_cookie)
{
	return bpf_map_lookup_elem(&weft_enrolled, &netns_cookie) != NULL;
}

static __always_inline bool weft_is_ztunnel_socket(const struct bpf_sock *sk)
{
	return sk && sk->mark == weft_ztunnel_mark;
}
