/* The ztunnel's per-pod ports (15001/15006/15008/15053), which no app may take and which inbound
 * steering never touches. */
#pragma once

#include "vmlinux.h"

#include "abi/ports.h"

static __always_inline bool weft_is_ztunnel_port(__u16 port_host)
{
	return port_host == WEFT_PORT_OUTBOUND || port_host == WEFT_PORT_INBOUND ||
	       port_host == WEFT_PORT_HBONE || port_host == WEFT_PORT_DNS;
}
