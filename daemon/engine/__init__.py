"""The run lifecycle: the engine, the queue, timers, waits and tokens, the scheduler,
events, ids and environments."""
