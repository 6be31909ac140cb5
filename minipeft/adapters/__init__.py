"""Adapter methods: one module per method, each ending in one registry.register(...) call.

Importing this package imports every module in it (and in its sub-packages), so every method
file registers itself: adding a method is adding its file (registry.py, README "Adding a method")."""
import importlib as _importlib
import pkgutil as _pkgutil

for _info in _pkgutil.walk_packages(__path__, __name__ + "."):
    _importlib.import_module(_info.name)
