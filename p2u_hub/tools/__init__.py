"""What users and publishers run on top of the library: the CLI, push with model cards, evaluation,
benchmarks and the demo. Tooling-only dependencies (datasets, matplotlib, bench references) are
optional extras, imported through ``p2u_hub.extras.require`` when a tool needs them.
"""
