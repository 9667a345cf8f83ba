"""How it is shown: figures and tables, read from parquet alone. Imports neither torch, bench nor methods."""
