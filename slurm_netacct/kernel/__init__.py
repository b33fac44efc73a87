"""Thin bindings to the kernel: network namespaces, links, netlink, nftables."""
