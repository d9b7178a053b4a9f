"""One module per CLI command; see bigtransfer.cli."""
