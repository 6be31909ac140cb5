"""The one check the optimisers' options share: a number (not a bool) above, or at least, zero."""
from __future__ import annotations

from ..errors import ConfigError


def number(owner: str, field: str, v, *, strict: bool = True) -> None:
    """ConfigError unless v is an int or float with v > 0 (strict) or v >= 0."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 if strict else v >= 0):
        raise ConfigError(f"{owner}.{field}={v!r} must be a number {'>' if strict else '>='} 0")
