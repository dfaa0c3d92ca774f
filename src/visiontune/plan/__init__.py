"""`visiontune plan`: what a recipe's run would be, without training it.

memory.py (peak memory: an estimate by parts and, on CPU, a measurement), probe.py (a few training steps on the
task's own Trainer pieces), tokens.py (a VLM's tokens per record, truncation, padding), make.py (the plan of a
recipe, from the task's own prepare/build), show.py (the console table and plan.json), batch.py (`train.batch_size:
auto` and `train.global_batch_size`, settled by the runner before the Trainer is made).
"""
