"""Exit codes shared by workers, the launcher and the ``elastic`` commands (kept
free of torch imports, so the CLI starts fast)."""

EXIT_FINISHED = 0  # training finished
EXIT_LEFT = 0  # a worker left gracefully on request; the job goes on without it
EXIT_FAILED = 1  # training failed (a worker, or the launcher out of restarts), or a command
EXIT_USAGE = 2  # a command was called wrong (argparse exits with it too)
EXIT_STOPPED = 3  # the job was stopped before training finished
EXIT_INTERRUPTED = 130  # the launcher was asked to stop (SIGINT/SIGTERM)
# A worker stopped on an error a restart cannot fix (a bad setting, not started
# by `elastic run`, etcd gone); it printed one line, and the launcher does not
# restart it.
EXIT_FATAL = 4
