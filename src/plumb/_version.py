"""plumb's version (its own module, so that any module can import it without importing
the package first)."""

__version__ = "0.1.0"
