"""Stoker's own performance measurements, shipped with Stoker so `stoker bench` runs on a
user's machine and bench/ (the comparisons against reference tools) reuses them.

Everything is measured through the engine's public entry points (engine.hashing,
engine.pipeline.outputs.digest_files, engine.pipeline.inputs.stage with a real LocalDiskStore, a
real `stoker up`), so the figures follow whichever digest implementation is loaded.

    stats     median, spread, percentiles
    scratch   the data sets: a large file, a small-file input tree in a warm local CAS
    probes    one timed run of each hot-path step
    pipeline  a real `stoker up` and a driver of no-op actions through it
    upload    the upload rate to a CAS (hook for engine.cas.remote)
    node      `stoker bench`: runs the probes with a progress bar, gathers the figures
    report    the table, the recommendation, JSON and the PNG chart
    cli       the `stoker bench` command line
"""
