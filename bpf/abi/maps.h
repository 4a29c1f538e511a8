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
/* Same-node fast path (see the structs below): cached verdicts, connections in flight to their
 * destination pod, the socket-local state of a fast connection, and the path's counters. */
#define WEFT_MAP_FAST_VERDICT "weft_fast_verdict"
#define WEFT_MAP_FAST_CONN "weft_fast_conn"
#define WEFT_MAP_SK_FAST "weft_sk_fast"
#define WEFT_MAP_FAST_STATS "weft_fast_stats"
/* Local-hop acceleration (see the structs below): the sockets of the app <-> ztunnel hops inside
 * a pod's netns, their per-socket state, the switch, and the counters. */
#define WEFT_MAP_HOP_SOCKS "weft_hop_socks"
#define WEFT_MAP_SK_HOP "weft_sk_hop"
#define WEFT_MAP_HOP_CONFIG "weft_hop_config"
#define WEFT_MAP_HOP_STATS "weft_hop_stats"

/* Version of the pinned set (programs + maps). Bump on any change of a map's shape or a program's
 * behaviour that an adopting agent must not mix with an older pinned set.
 * 2: DNS capture. 3: cgroup/sock_release deletes a closing UDP socket's weft_dns_dst entry.
 * 4: the same-node fast path (weft_fast_* maps, FAST_* events).
 * 5: local-hop acceleration (weft_hop_* maps, weft_sk_hop, the sk_msg program weft_hop_msg). */
#define WEFT_BPF_ABI_VERSION "weft-bpf-abi-5"

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
#ifndef WEFT_MAX_FAST_VERDICT
#define WEFT_MAX_FAST_VERDICT 65536
#endif
#ifndef WEFT_MAX_FAST_CONN
#define WEFT_MAX_FAST_CONN 65536
#endif
#ifndef WEFT_MAX_HOP_SOCKS
#define WEFT_MAX_HOP_SOCKS 65536
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
/* Same-node fast path, as struct weft_fast_event (a weft_event head + counts): FAST_OPEN when
 * the client's connect completes (src = client, dst = the destination pod), FAST_CLOSE when its
 * socket reaches TCP_CLOSE (with the bytes each way; old_state SYN_SENT = it never connected). */
#define WEFT_EVENT_FAST_OPEN 5
#define WEFT_EVENT_FAST_CLOSE 6
struct weft_event {
	__u64 timestamp_ns;
	__u64 netns_cookie; /* 0 for INBOUND_STEER: sk_lookup cannot read it (dst = the pod) */
	__u32 type; /* WEFT_EVENT_* */
	__u32 reserved;
	struct weft_sockaddr src;
	struct weft_sockaddr dst;
};

/* The same-node fast path. The ztunnel caches "allowed" verdicts of its policy engine for
 * (source pod's netns, destination pod addr:port) when both pods are enrolled on this node;
 * cgroup/connect then lets such a connect() go straight to the destination pod instead of to
 * 15001, with weft_sk_fast state on the socket. sockops, once the client port is chosen
 * (TCP_CONNECT_CB, before the SYN leaves), records the 4-tuple in weft_fast_conn; the
 * destination's sk_lookup lets a connection whose 4-tuple is there through to the app instead of
 * steering it to 15006; at TCP_CLOSE sockops reports the bytes and deletes the entry. */

/* weft_fast_verdict (LRU hash): written and cleared by the ztunnel only. Present = allowed. */
struct weft_fast_key {
	__u64 src_netns_cookie;
	struct weft_sockaddr dst; /* the destination pod's addr:port (v4-mapped stored as IPv4) */
	__u32 reserved;
};
struct weft_fast_verdict {
	__u64 dst_netns_cookie; /* the destination pod's netns (for events and weftctl) */
	__u64 cached_ns;        /* bpf_ktime_get_ns() clock when the ztunnel cached it */
};

/* weft_fast_conn (LRU hash): client addr:port + destination addr:port (the client's view; no
 * NAT between two pods of one node) -> the client's netns cookie. */
struct weft_fast_conn_key {
	struct weft_sockaddr src;
	struct weft_sockaddr dst;
};

/* weft_sk_fast (SK_STORAGE) on the client socket of a fast connection. */
#define WEFT_FAST_SK_KEYED (1u << 0)  /* its weft_fast_conn entry exists */
#define WEFT_FAST_SK_OPENED (1u << 1) /* FAST_OPEN was sent */
struct weft_fast_sock {
	__u64 start_ns;
	__u64 dst_netns_cookie;
	struct weft_sockaddr dst;
	__u32 flags; /* WEFT_FAST_SK_* */
};

/* weft_fast_stats (PERCPU_ARRAY of __u64), summed over CPUs by readers. */
#define WEFT_FAST_STAT_CONNECTS 0     /* connect()s sent straight to the destination pod */
#define WEFT_FAST_STAT_NO_STORAGE 1   /* verdict found, socket storage refused: took 15001 */
#define WEFT_FAST_STAT_NO_CONN_ENTRY 2 /* weft_fast_conn update refused (sk_lookup will steer) */
#define WEFT_FAST_STAT_LOOKUP_PASSED 3 /* sk_lookup let a fast connection through */
#define WEFT_FAST_STAT_EVENTS_LOST 4  /* FAST_OPEN/FAST_CLOSE not sent: the ring was full */
#define WEFT_FAST_STATS 8
#ifdef __cplusplus
/* The counters' names, by index (the ztunnel's /fast_path and weftctl's map dump). */
inline constexpr const char* kWeftFastStatNames[] = {"connects", "no_storage", "no_conn_entry",
						     "lookup_passed", "events_lost"};
#endif

/* A FAST_OPEN / FAST_CLOSE record on weft_events (head.type tells which; head.netns_cookie is
 * the client's netns). Bytes are the client socket's: sent = acked by the destination,
 * received = delivered to the client. */
struct weft_fast_event {
	struct weft_event head;
	__u64 dst_netns_cookie;
	__u64 start_ns;
	__u64 bytes_sent;
	__u64 bytes_received;
	__u32 old_state; /* FAST_CLOSE: the TCP state before TCP_CLOSE (BPF_TCP_*) */
	__u32 reserved;
};

/* Local-hop acceleration. Inside an enrolled pod's netns two hops are loopback TCP between the
 * app and the ztunnel: the app's connection to 15001 (outbound) and the ztunnel's connection from
 * 127.0.0.6 to the app (inbound). sockops puts both ends of such a connection into
 * weft_hop_socks when each is established; the sk_msg program weft_hop_msg, attached to that
 * map, hands every sendmsg straight to the peer socket's receive queue
 * (bpf_msg_redirect_hash(BPF_F_INGRESS)) instead of through the loopback TCP stack. A socket
 * that ever sent over TCP (its peer was not in the map yet) keeps sending over TCP, so that the
 * reader never sees redirected bytes ahead of TCP bytes. The kernel removes a socket from the
 * map when it closes. */

/* weft_hop_socks (SOCKHASH): a hop socket by its own view of the connection. The peer's key is
 * the same netns with local and remote swapped; the netns cookie keeps two pods' identical
 * loopback 4-tuples apart. Value: the socket (user space reads its socket cookie, __u64). */
struct weft_hop_key {
	__u64 netns_cookie;
	struct weft_sockaddr local;  /* v4-mapped stored as IPv4 (lib/addr.h) */
	struct weft_sockaddr remote;
};

/* The kernel queues redirected bytes on the peer without a receive-buffer limit (no
 * backpressure), so the sk_msg program moves a sender to TCP for good once the peer has more than
 * this many redirected bytes unread (its psock msg_tot_len); TCP's window then throttles it.
 * About what loopback TCP lets a writer queue to a reader that does not read (~4 MiB). */
#ifndef WEFT_HOP_MAX_UNREAD
#define WEFT_HOP_MAX_UNREAD (4u << 20)
#endif

/* weft_sk_hop (SK_STORAGE, __u32 flags) on a hop socket. */
#define WEFT_HOP_SK_TCP (1u << 0) /* sent a message over TCP: never redirect after that */

/* weft_hop_config (ARRAY, one __u32 at key 0): WEFT_HOP_* hops to accelerate; 0 = off. Read by
 * sockops when a connection is established: switching it changes new connections only. */
#define WEFT_HOP_OUTBOUND (1u << 0) /* app -> ztunnel 15001 */
#define WEFT_HOP_INBOUND (1u << 1)  /* ztunnel from 127.0.0.6 -> app */

/* weft_hop_stats (PERCPU_ARRAY of __u64), summed over CPUs by readers. */
#define WEFT_HOP_STAT_SOCKETS 0       /* hop sockets put into weft_hop_socks */
#define WEFT_HOP_STAT_ADD_FAILED 1    /* weft_hop_socks update refused (the hop stays TCP) */
#define WEFT_HOP_STAT_MSGS 2          /* messages redirected to the peer */
#define WEFT_HOP_STAT_BYTES 3         /* bytes in those messages */
#define WEFT_HOP_STAT_TCP_MSGS 4      /* messages sent over TCP: the peer was not in the map, or
					* was full (PEER_FULL), at this or an earlier message */
#define WEFT_HOP_STAT_NO_STORAGE 5    /* socket storage refused: sent over TCP */
#define WEFT_HOP_STAT_PEER_FULL 6     /* the peer had too much unread: a socket moved to TCP */
#define WEFT_HOP_STATS 8
#ifdef __cplusplus
/* The counters' names, by index (the agent's status and weftctl's map dump). */
inline constexpr const char* kWeftHopStatNames[] = {
	"sockets", "add_failed", "redirected_msgs", "redirected_bytes", "tcp_msgs", "no_storage",
	"peer_full"};
#endif

#ifdef __cplusplus
static_assert(sizeof(struct weft_hop_key) == 48, "weft_hop_key is ABI");
static_assert(sizeof(struct weft_fast_key) == 32, "weft_fast_key is ABI");
static_assert(sizeof(struct weft_fast_verdict) == 16, "weft_fast_verdict is ABI");
static_assert(sizeof(struct weft_fast_conn_key) == 40, "weft_fast_conn_key is ABI");
static_assert(sizeof(struct weft_fast_sock) == 40, "weft_fast_sock is ABI");
static_assert(sizeof(struct weft_fast_event) == 104, "weft_fast_event is ABI");
static_assert(sizeof(struct weft_enrollment) == 16, "weft_enrollment is ABI");
static_assert(sizeof(struct weft_orig_dst_key) == 32, "weft_orig_dst_key is ABI");
static_assert(sizeof(struct weft_event) == 64, "weft_event is ABI");
static_assert(sizeof(struct weft_dns_key) == 16, "weft_dns_key is ABI");
#endif
