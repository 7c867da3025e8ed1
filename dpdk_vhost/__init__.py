"""dpdk_vhost."""
