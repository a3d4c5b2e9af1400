"""Model files register themselves on import; add one line per model here."""
from zoo.models import registry
from zoo.models import transformer  # noqa: F401

__all__ = ["registry"]
