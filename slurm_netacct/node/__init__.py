"""A compute node's side: a job's setup and teardown, the hooks, the service, the reaper,
samples and metrics of running jobs, and routed mode's routes."""
