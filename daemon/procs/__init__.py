"""The processes the daemon supervises, seen from the daemon: the supervisor, the
worker channel protocol, CRIU checkpoints and their manifest."""
