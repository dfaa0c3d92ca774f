"""The evaluation batch: the training batch on CPU (a bigger one only falls out of cache), twice it on a GPU."""

from visiontune.recipe import parse_config
from visiontune.run.arguments import training_arguments


def test_evaluation_batch_is_the_training_batch_on_cpu_and_twice_it_on_a_gpu(tmp_path):
    recipe = {"task": "classify", "model": "unused", "output_dir": "unused", "data": {"train": "x"}}
    train = parse_config({**recipe, "train": {"batch_size": 8}}).train
    on_cpu = training_arguments(train.model_copy(update={"cpu": True}), tmp_path, 0, 0, [])
    on_gpu = training_arguments(train.model_copy(update={"cpu": False}), tmp_path, 0, 0, [])
    assert (on_cpu.per_device_eval_batch_size, on_gpu.per_device_eval_batch_size) == (8, 16)
