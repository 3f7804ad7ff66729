"""Start the job: process groups, torchrun, the supervisor that restarts it."""
