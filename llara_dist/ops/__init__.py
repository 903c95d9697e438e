"""Custom ops. Imports only torch (triton lazily)."""
