"""The package version, importable without importing the package's registry."""

__version__ = "0.1.0"
