"""An example third-party llamaforge plugin package."""
