"""What runs inside the zygote and the run processes: the zygote, the run process,
task discovery, the lifeline to the daemon. It imports nothing of the engine, the store or
the API."""
