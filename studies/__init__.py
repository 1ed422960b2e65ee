"""Studies: one script per README table, each runnable as `python -m studies.<name>`."""
