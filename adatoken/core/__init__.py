"""The pruning core: the runtime's hooks and state, the family adapters, token layouts, method configs,
rankings, schedules, FLOPs accounting and the methods. It imports nothing else from adatoken."""
