"""The packaged run configs: `zoo train --config <name>[:preset]` (e.g. `mamba2:130m`).

One file per model, `get_config(preset)` with the preset's run settings in a `RUNS` dict; the
model shapes themselves are the model file's `PRESETS`.
"""
