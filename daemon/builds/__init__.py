"""Versions from archives: builds, virtual environments, code snapshots."""
