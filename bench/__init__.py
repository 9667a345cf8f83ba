"""How it is measured: grid, data, runner, profilers, store, gate. Imports methods."""
