// Inbound plaintext: a connection to a pod IP that sk_lookup steered to the pod's 15006. The
// local address is the original destination; connect to the app in the pod's netns, relay.
#pragma once

#include <uv.h>

#include "ztunnel/proxy.h"

namespace weft::ztunnel {

void handleInbound(Proxy& proxy, uv_stream_t* listener, const LocalPodPtr& pod);

}  // namespace weft::ztunnel
