"""The package version, in a module of its own so that engine modules can read it
without importing the package face (which imports the front ends)."""

__version__ = "0.1.0"
