"""`visiontune plan`: what a recipe's run would be, without training it.

memory.py (peak memory: an estimate by parts and, on CPU, a measurement), probe.py (a few training steps on the
task's own Trainer pieces: step time, and the largest batch that fits for `train.batch_size: auto`), tokens.py (a
VLM's tokens per record, truncation, padding), make.py (the plan of a recipe, from the task's own prepare/build),
show.py (the console table and plan.json).
"""
