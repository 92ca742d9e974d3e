"""Tasks turn an input item into a result: preprocess → invoke → postprocess.

Each task registers under a key (`classify`, `tensors`, …) and says whether a model
fits it. `recognise()` names the task a bare model would be run as, from its tensors.
"""

from agent.tasks.task import TASKS, Inference, Runner, Task, create_runner, create_task, recognise, register

__all__ = ["TASKS", "Inference", "Runner", "Task", "create_runner", "create_task", "recognise", "register"]
