/* The maps every Weft BPF object shares. Each object declares all of them; with
 * LIBBPF_PIN_BY_NAME and the loader's pin_root_path (<pin_dir>/maps) the first object to load
 * creates and pins each map and every later object reuses the pinned one, so all programs see
 * the same maps and they outlive the agent. Keys and values: bpf/abi/maps.h. */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#include "abi/maps.h"

/* weft_enrolled: netns cookie -> enrollment. Written only by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEFT_MAX_ENROLLED);
	__type(key, __u64);
	__type(value, struct weft_enrollment);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_enrolled SEC(".maps");

/* weft_sk_dst: a redirected client socket's original destination, attached to the socket
 * itself, so it lives and dies with the socket and needs no key of its own. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct weft_sockaddr);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_sk_dst SEC(".maps");

/* weft_orig_dst: (netns cookie, client address) -> original destination. LRU so that entries
 * whose close was never seen cannot fill it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WEFT_MAX_ORIG_DST);
	__type(key, struct weft_orig_dst_key);
	__type(value, struct weft_sockaddr);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_orig_dst SEC(".maps");

/* weft_inbound_lst: pod IP -> the ztunnel's 15006 listener in that pod's netns. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, WEFT_MAX_INBOUND_LISTENERS);
	__type(key, struct weft_ip);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_inbound_lst SEC(".maps");

/* weft_in_bypass: source IPs that inbound steering never touches (the node: kubelet probes). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEFT_MAX_INBOUND_BYPASS);
	__type(key, struct weft_ip);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_in_bypass SEC(".maps");

/* weft_events: struct weft_event records for weftctl monitor. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, WEFT_EVENTS_RING_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_events SEC(".maps");

/* weft_dns_dst: (app socket cookie, netns cookie) -> the resolver its DNS query was for. LRU: no
 * hook sees a UDP socket close, so old entries go when room is needed. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WEFT_MAX_DNS_DST);
	__type(key, struct weft_dns_key);
	__type(value, struct weft_sockaddr);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_dns_dst SEC(".maps");

/* weft_fast_verdict: (source netns, destination pod addr:port) -> allowed, cached by the ztunnel
 * from its policy engine. LRU: a cache; an evicted verdict only means the ztunnel path. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WEFT_MAX_FAST_VERDICT);
	__type(key, struct weft_fast_key);
	__type(value, struct weft_fast_verdict);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_fast_verdict SEC(".maps");

/* weft_fast_conn: 4-tuples of fast connections, from the client's connect until its close. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WEFT_MAX_FAST_CONN);
	__type(key, struct weft_fast_conn_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_fast_conn SEC(".maps");

/* weft_sk_fast: a fast connection's client socket: when it started, where it goes. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct weft_fast_sock);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_sk_fast SEC(".maps");

/* weft_fast_stats: the fast path's counters (WEFT_FAST_STAT_*). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEFT_FAST_STATS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_fast_stats SEC(".maps");

/* weft_hop_socks: both ends of the app <-> ztunnel loopback hops in enrolled pods (lib/hop.h). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, WEFT_MAX_HOP_SOCKS);
	__type(key, struct weft_hop_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_hop_socks SEC(".maps");

/* weft_sk_hop: a hop socket's flags (WEFT_HOP_SK_*), created when it enters weft_hop_socks. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_sk_hop SEC(".maps");

/* weft_hop_config: key 0 -> WEFT_HOP_* (which hops to accelerate), written by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_hop_config SEC(".maps");

/* weft_hop_stats: local-hop acceleration's counters (WEFT_HOP_STAT_*). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEFT_HOP_STATS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_hop_stats SEC(".maps");
