"""Tasks: the objects that own a training job's model, data, losses, evaluation and logged metrics
(:class:`.base.Task`); the train loop and ``bench train`` call them and never branch on a task's name."""
from .base import Task
from .caption import PretrainTask, RetrievalTask
from .qa import QATask

TASKS = {t.name: t for t in (PretrainTask(), RetrievalTask(), QATask())}

__all__ = ["TASKS", "Task", "PretrainTask", "RetrievalTask", "QATask"]
