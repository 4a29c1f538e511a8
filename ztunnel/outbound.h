// Outbound: a connection an app made, redirected to the pod's 15001. Recover the original
// destination, decide the route, connect upstream from inside the pod's netns, relay.
#pragma once

#include <uv.h>

#include "ztunnel/proxy.h"

namespace weft::ztunnel {

void handleOutbound(Proxy& proxy, uv_stream_t* listener, const LocalPodPtr& pod);

}  // namespace weft::ztunnel
