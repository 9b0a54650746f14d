"""`hakd bench`: the speed claims of hakd, measured (infra/bench/run.py runs them; docs/performance.md)."""
