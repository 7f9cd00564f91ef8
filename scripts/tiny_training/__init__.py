"""Pieces of ``scripts/train_tiny.py``, which trains mixserve-tiny (see that script's docstring).

Imported as a top-level package: running ``python scripts/train_tiny.py`` puts ``scripts/`` first on
``sys.path``. Nothing here imports mixserve.
"""
