"""Model files register themselves on import; add one line per model here."""
from zoo.models import registry
from zoo.models import transformer  # noqa: F401
from zoo.models import lact  # noqa: F401
from zoo.models import mamba2  # noqa: F401
from zoo.models import memmamba  # noqa: F401
from zoo.models import hip  # noqa: F401
from zoo.models import masformer  # noqa: F401
from zoo.models import s4  # noqa: F401
from zoo.models import spacetime  # noqa: F401

__all__ = ["registry"]
