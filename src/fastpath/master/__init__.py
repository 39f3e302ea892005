"""The master process (supervisor of workers and sidecars) and what its children share."""
