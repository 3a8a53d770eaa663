"""Running Fulcrum: the local cluster and the `fulcrum` command line."""
