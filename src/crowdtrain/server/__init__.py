"""The coordinator: FastAPI over the protocol core and the stores (see coordinator.py)."""
