"""Client proxies of the transports other than the in-process one and gRPC."""
