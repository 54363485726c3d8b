"""adapterd's benchmark: adapterd against transformers + PEFT, in one run on one machine.

`python -m bench --mode cpu` (default model, fp32) or `--mode gpu` (Llama-3.1-8B shape, random weights, NF4;
`--tiny` runs the same code on a tiny config, on the CPU if there is no GPU). It prints a table and writes
JSON; docs/performance.md holds the measured table and how to read it. `python -m bench.profile` shows where
one decode step's time goes.
"""
