"""Updates: the node's TUF client (``client``), fetchers (HTTP, directory) and clock policy."""
