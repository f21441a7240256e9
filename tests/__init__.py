"""nsa-jax tests, grouped as the package is; shared helpers in tests/helpers, fixtures in conftest.py."""
