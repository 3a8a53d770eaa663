"""Where worker processes come from beyond this host: Kubernetes pods, Ray actors."""
