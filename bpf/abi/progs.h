/* Names of Weft's BPF programs, as loaded (kernel prog name) and pinned under
 * <pin_dir>/progs/<name> and, for the cgroup ones, <pin_dir>/links/<name>. */
#pragma once

#define WEFT_PROG_CONNECT4 "weft_connect4"
#define WEFT_PROG_CONNECT6 "weft_connect6"
#define WEFT_PROG_SOCKOPS "weft_sockops"
#define WEFT_PROG_GETSOCKOPT "weft_getsockopt"
#define WEFT_PROG_BIND4 "weft_bind4"
#define WEFT_PROG_BIND6 "weft_bind6"
#define WEFT_PROG_SK_LOOKUP "weft_sk_lookup"
#define WEFT_PROG_SENDMSG4 "weft_sendmsg4"
#define WEFT_PROG_SENDMSG6 "weft_sendmsg6"
#define WEFT_PROG_RECVMSG4 "weft_recvmsg4"
#define WEFT_PROG_RECVMSG6 "weft_recvmsg6"
#define WEFT_PROG_SOCK_RELEASE "weft_sock_release"
/* sk_msg, attached to the weft_hop_socks map (not to a cgroup): local-hop acceleration. */
#define WEFT_PROG_HOP_MSG "weft_hop_msg"

/* Every Weft program name starts with this (weftctl and tests find them by it). */
#define WEFT_PROG_PREFIX "weft_"

/* Sub-directories of a pin dir. */
#define WEFT_PIN_MAPS "maps"
#define WEFT_PIN_PROGS "progs"
#define WEFT_PIN_LINKS "links"
#define WEFT_PIN_NETNS "netns"
#define WEFT_PIN_ABI "abi" /* a symlink whose target is WEFT_BPF_ABI_VERSION */
