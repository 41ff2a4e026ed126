"""The prune job as passes over one live graph (base.py: the pass protocol; job.py: the sequence)."""
