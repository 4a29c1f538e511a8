/* Events to user space (weftctl monitor) over the weft_events ring buffer. Best effort: when the
 * ring is full the event is dropped, never the connection. */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#include "lib/maps.h"

static __always_inline void weft_emit(__u32 type, __u64 netns_cookie,
				      const struct weft_sockaddr *src,
				      const struct weft_sockaddr *dst)
{
	struct weft_event *ev = bpf_ringbuf_reserve(&weft_events, sizeof(*ev), 0);

	if (!ev)
		return;
	ev->timestamp_ns = bpf_ktime_get_ns();
	ev->netns_cookie = netns_cookie;
	ev->type = type;
	ev->reserved = 0;
	if (src)
		ev->src = *src;
	else
		__builtin_memset(&ev->src, 0, sizeof(ev->src));
	if (dst)
		ev->dst = *dst;
	else
		__builtin_memset(&ev->dst, 0, sizeof(ev->dst));
	bpf_ringbuf_submit(ev, 0);
}
