"""The models: one file per model, each registering itself (`zoo.models.registry`).

Adding a model means adding `zoo/models/<name>.py` with a `@registry.register(name, PRESETS)`
class; the registry imports every module of this package, so nothing else needs editing.
"""

from zoo.models import registry

__all__ = ["registry"]
