"""serveflow benchmarks: one module per experiment, run as `python -m benchmarks.NAME`.

They use only serveflow's public API, so they run against any runtime version.
"""
