// SPDX-License-Identifier: GPL-2.0
/* Re-keys a redirected connection's original destination by the client's address once the
 * client port is known, and forgets it when the client socket closes. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#include "lib/fast.h"
#include "lib/hop.h"
#include "lib/orig_dst.h"

/* Attaches: sockops at the cgroup root.
 * Decides: on ACTIVE_ESTABLISHED of a socket that cgroup/connect redirected (it has weft_sk_dst
 * storage), publish weft_orig_dst[{netns cookie, client addr:port}] and turn on state
 * callbacks; on its move to TCP_CLOSE, delete that entry. A fast-path socket (weft_sk_fast, set
 * by cgroup/connect): on TCP_CONNECT_CB key its 4-tuple in weft_fast_conn, on ACTIVE_ESTABLISHED
 * send FAST_OPEN, on TCP_CLOSE send FAST_CLOSE with its bytes and delete the key. Other sockets:
 * nothing. Local-hop acceleration (lib/hop.h): on ACTIVE_ESTABLISHED and PASSIVE_ESTABLISHED, an
 * end of an app <-> ztunnel loopback connection in an enrolled pod goes into weft_hop_socks. */
SEC("sockops")
int weft_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		weft_fast_connecting(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		weft_orig_dst_publish(skops);
		weft_fast_established(skops);
		weft_hop_established(skops, false);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		weft_hop_established(skops, true);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE) {
			weft_orig_dst_forget(skops);
			weft_fast_closed(skops, skops->args[0]);
		}
		break;
	default:
		break;
	}
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
