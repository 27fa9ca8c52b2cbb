"""The package version. A leaf module, so that a submodule that needs it (``hub.publish``) imports
this rather than the package itself, which would be an import cycle through ``__init__``."""

__version__ = "0.1.0"
