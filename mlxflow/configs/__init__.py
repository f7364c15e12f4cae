"""One module per model family: its config dataclass, presets, FLOP formula and the
`register(Family(...))` call that makes it known to mlxflow/families.py.

Every module in this folder is imported here (so a new family is one new file, with no
edit to a shared one); `import mlxflow` imports this package.
"""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
