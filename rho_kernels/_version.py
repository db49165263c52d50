"""The package version, kept in this one place: ``setup.py`` reads it (without importing the
package) and ``rho_kernels.__version__`` re-exports it."""

__version__ = "0.1.0"
