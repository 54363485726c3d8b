"""Entry points: the `adapterd` command (`main.py`), `adapterd serve` and `adapterd run` (offline JSONL)."""
