"""Search over pruning choices: measured sensitivity per group (sensitivity.py), budgets (budget.py), and the
executor that fans their independent evaluations out to local processes or a Ray cluster (executor.py)."""
