"""What our trainer (train/trainer.py) relies on in transformers' Trainer and TRL's SFTTrainer
beyond their documented arguments: the methods it overrides or calls, with the parameters it
passes, and the private attribute it sets. An upgrade that renames or reshapes one fails here,
by name, instead of silently skipping our override (issue 38). The GPU machine's transformers
5.17 differs from this venv's; tests/test_train.py covers the one argument they name apart."""

from __future__ import annotations

import inspect

import pytest
from transformers import Trainer
from trl import SFTTrainer

# method -> the parameters (after self) our override takes or our call passes, in order
CONTRACT = {
    "_save_checkpoint": ["model", "trial"],  # private: tokens counted before state is written
    "training_step": ["model", "inputs", "num_items_in_batch"],
    "log": ["logs", "start_time"],
    "compute_loss": ["model", "inputs", "return_outputs", "num_items_in_batch"],
    "create_scheduler": ["num_training_steps", "optimizer"],
    "create_optimizer": ["model"],
    "set_initial_training_values": ["args", "dataloader"],
    "_get_train_sampler": [
        "train_dataset"
    ],  # private: GRPO's num_iterations order  # refuse_finished calls it
}


@pytest.mark.parametrize("name", CONTRACT)
def test_the_trainer_methods_we_override_keep_their_parameters(name):
    method = getattr(Trainer, name, None)
    assert method is not None, f"transformers.Trainer.{name} is gone: train/trainer.py overrides it"
    params = list(inspect.signature(method).parameters)[1:]
    assert params == CONTRACT[name], (name, params)
    assert callable(getattr(SFTTrainer, name))


def test_the_scheduler_flag_we_set_is_the_one_the_trainer_reads():
    """Our create_scheduler builds schedule.py's scheduler and sets `_created_lr_scheduler` as
    the Trainer's own does (it decides whether the scheduler is stepped and saved)."""
    assert "self._created_lr_scheduler = True" in inspect.getsource(Trainer.create_scheduler)
    assert "_created_lr_scheduler" in inspect.getsource(Trainer)


def test_set_initial_training_values_ends_with_the_step_count():
    """refuse_finished reads the run's total steps as the last value returned."""
    import ast
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(Trainer.set_initial_training_values)))
    returned = [n.value for n in ast.walk(tree) if isinstance(n, ast.Return)][-1]
    assert isinstance(returned, ast.Tuple), ast.dump(returned)
    assert ast.unparse(returned.elts[-1]) == "max_steps", ast.unparse(returned)


def test_optimizer_factory_is_a_static_method_taking_args_and_model():
    params = list(inspect.signature(Trainer.get_optimizer_cls_and_kwargs).parameters)
    assert params[:2] == ["args", "model"], params
