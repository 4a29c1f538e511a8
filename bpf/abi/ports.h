/* Ports and marks shared by the BPF programs and the C++ side (DESIGN §8). */
#pragma once

#define WEFT_PORT_OUTBOUND 15001
#define WEFT_PORT_INBOUND 15006
#define WEFT_PORT_HBONE 15008
#define WEFT_PORT_DNS 15053
/* The port whose traffic (UDP and TCP) from enrolled pods goes to WEFT_PORT_DNS. */
#define WEFT_PORT_DNS_SERVICE 53

/* Every socket the ztunnel opens carries this mark; the hooks let it through. */
#define WEFT_ZTUNNEL_MARK 0x539

/* The ztunnel connects to an app inside its pod from this loopback source, so that the
 * inbound sk_lookup steering does not send its own connection back to the ztunnel. */
#define WEFT_INBOUND_PASSTHROUGH_V4 0x7f000006 /* 127.0.0.6, host order */
