"""What every frankenllama stage shares: the config schema, run folders, manifests, checkpoint I/O."""
