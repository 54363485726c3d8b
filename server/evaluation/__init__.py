"""Evaluation on the field's benchmarks through adapterd's engine: an lm-evaluation-harness model backend
(`harness.py`) over an in-process or remote engine (`backends.py`), and `adapterd eval --tasks` (`cli.py`)."""
