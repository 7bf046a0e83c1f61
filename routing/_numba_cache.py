"""Make numba's on-disk cache of the routing kernels notice edits in any kernel module.

numba stamps a cached function with its own source file only, so after an edit of, say,
`bnb.py`, the cached `kernels.route` (which inlines it) would keep running the old code. Routing
functions get locators whose stamp hashes every kernel module instead; other functions keep
numba's own. Uses numba's cache locator classes (numba.core.caching); if they change shape, the
install is skipped and numba's default applies.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

_DIR = Path(__file__).resolve().parent
_FILES = ("_types.py", "geo.py", "evaluate.py", "pool.py", "bnb.py", "kernels.py")


def source_stamp() -> str:
    """Content hash of every module holding routing kernels."""
    h = hashlib.sha256()
    for name in _FILES:
        h.update((_DIR / name).read_bytes())
    return h.hexdigest()


def install() -> bool:
    """Put the routing locators first in numba's list; True when installed."""
    try:
        from numba.core import caching

        impl: Any = caching.CacheImpl
        bases = (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator,
                 caching.UserWideCacheLocator)
    except (ImportError, AttributeError):
        return False
    if any(getattr(cls, "routing_locator", False) for cls in impl._locator_classes):
        return True

    def locator(base: Any) -> Any:
        class RoutingLocator(base):  # type: ignore[misc]
            routing_locator = True

            def get_source_stamp(self) -> str:
                return source_stamp()

            @classmethod
            def from_function(cls, py_func: Any, py_file: str) -> Any:
                if Path(py_file).resolve().parent != _DIR:
                    return None
                return super().from_function(py_func, py_file)

        RoutingLocator.__name__ = RoutingLocator.__qualname__ = f"Routing{base.__name__}"
        return RoutingLocator

    impl._locator_classes[:0] = [locator(b) for b in bases]
    return True


INSTALLED = install()  # on import: before any routing kernel is decorated
