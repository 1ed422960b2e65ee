"""Studies: each module is the script behind a README table, run as `python -m studies.NAME`.

They use the library (`engine`, `experiments`, `db`) and never the other way round; their data is
in `data/`, their training configs in `configs/`. Each module's docstring names its README table
and its running time.
"""
