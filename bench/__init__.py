"""How it is measured: grid, data, runner, profilers, store, gate. Imports methods."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the checkout: grids/, results/ and the sources a worker imports
