"""Running a model on this machine: which device and dtype (devices), the process groups of
torchrun jobs (distributed), checkpoint -> model on this rank (loading, memory), the scheduler
that runs requests over the KV cache's rows (engine), sampling (sampling), and how the model's
computations run here, chosen by measurement (backend)."""
