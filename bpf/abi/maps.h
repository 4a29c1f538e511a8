/* Every map the BPF programs share with user space: names, keys and values. This is an ABI:
 * never reorder a field; dead fields become reserved; a breaking change is a new _v2 map. */
#pragma once

#include "addr.h" /* same directory: found from BPF (-Ibpf) and C++ (-I.) alike */

/* Map names, as pinned under <pin_dir>/maps/. */
#define WEFT_MAP_ENROLLED "weft_enrolled"
#define WEFT_MAP_ORIG_DST "weft_orig_dst"
#define WEFT_MAP_INBOUND_LISTENERS "weft_inbound_lst"
#define WEFT_MAP_INBOUND_BYPASS "weft_in_bypass"
#define WEFT_MAP_EVENTS "weft_events"
/* Socket-local storage of a redirected client socket: its original destination, from
 * cgroup/connect until sockops re-keys it into weft_orig_dst (value: struct weft_sockaddr). */
#define WEFT_MAP_SK_ORIG_DST "weft_sk_dst"
/* The resolver a DNS socket asked for before cgroup/connect or cgroup/sendmsg sent it to the
 * ztunnel's 15053, keyed by the app socket (struct weft_dns_key -> struct weft_sockaddr). */
#define WEFT_MAP_DNS_DST "weft_dns_dst"

/* Version of the pinned set (programs + maps). Bump on any change of a map's shape or a program's
 * behaviour that an adopting agent must not mix with an older pinned set.
 * 2: DNS capture. 3: cgroup/sock_release deletes a closing UDP socket's weft_dns_dst entry. */
#define WEFT_BPF_ABI_VERSION "weft-bpf-abi-3"

#ifndef WEFT_MAX_ENROLLED
#define WEFT_MAX_ENROLLED 65536
#endif
#ifndef WEFT_MAX_ORIG_DST
#define WEFT_MAX_ORIG_DST 262144
#endif
#ifndef WEFT_MAX_INBOUND_LISTENERS
#define WEFT_MAX_INBOUND_LISTENERS 65536
#endif
#ifndef WEFT_MAX_INBOUND_BYPASS
#define WEFT_MAX_INBOUND_BYPASS 256
#endif
#ifndef WEFT_MAX_DNS_DST
#define WEFT_MAX_DNS_DST 65536
#endif
#define WEFT_EVENTS_RING_BYTES (256 * 1024)

/* weft_enrolled: netns cookie (__u64) -> struct weft_enrollment. Present = enrolled. */
#define WEFT_ENROLL_REDIRECT_OUTBOUND (1u << 0)
#define WEFT_ENROLL_REDIRECT_DNS (1u << 1) /* UDP and TCP to port 53 -> the ztunnel's 15053 */
struct weft_enrollment {
	__u32 flags;       /* WEFT_ENROLL_* */
	__u32 reserved;
	__u64 workload_id; /* agent-assigned, for events and weftctl */
};

/* weft_orig_dst (LRU hash): the redirected client socket's own address, inside its netns,
 * -> the destination the app asked for. Written by sockops once the client port is known;
 * read by cgroup/getsockopt (SO_ORIGINAL_DST) on the ztunnel's accepted socket. */
struct weft_orig_dst_key {
	__u64 netns_cookie;
	struct weft_sockaddr client;
	__u32 reserved;
};

/* weft_dns_dst (LRU hash): an app's DNS socket -> the resolver it asked for (port 53). Written
 * by cgroup/connect (UDP) and cgroup/sendmsg when they send it to 15053; read by cgroup/recvmsg,
 * which gives answers from 15053 the resolver's address back, and by the ztunnel, which finds
 * the app socket's cookie with sock_diag and forwards to that resolver. LRU: no close hook. */
struct weft_dns_key {
	__u64 socket_cookie;
	__u64 netns_cookie;
};

/* weft_inbound_lst (SOCKHASH): pod IP -> the ztunnel's 15006 listener in that pod's netns. */
/* key: struct weft_ip; value: __u64 socket fd on update from user space. The socket must be a
 * TCP socket in LISTEN state when it is added. */

/* weft_in_bypass (HASH): source IP -> __u8, sources never steered inbound (node health probes). */
/* key: struct weft_ip */

/* weft_events (RINGBUF): struct weft_event records. REDIRECT: dst = original destination, src
 * unset (the client port is not chosen yet). INBOUND_STEER: src = caller, dst = pod addr:port.
 * BIND_DENIED: src = the address the bind asked for. */
#define WEFT_EVENT_REDIRECT 1
#define WEFT_EVENT_INBOUND_STEER 2
#define WEFT_EVENT_BIND_DENIED 3
#define WEFT_EVENT_DNS_REDIRECT 4 /* dst = the resolver asked for; src unset */
struct weft_event {
	__u64 timestamp_ns;
	__u64 netns_cookie; /* 0 for INBOUND_STEER: sk_lookup cannot read it (dst = the pod) */
	__u32 type; /* WEFT_EVENT_* */
	__u32 reserved;
	struct weft_sockaddr src;
	struct weft_sockaddr dst;
};

#ifdef __cplusplus
static_assert(sizeof(struct weft_enrollment) == 16, "weft_enrollment is ABI");
static_assert(sizeof(struct weft_orig_dst_key) == 32, "weft_orig_dst_key is ABI");
static_assert(sizeof(struct weft_event) == 64, "weft_event is ABI");
static_assert(sizeof(struct weft_dns_key) == 16, "weft_dns_key is ABI");
#endif
