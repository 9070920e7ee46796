"""Jobs: the job core (job.py, blockjob.py) and the block jobs built on it."""
