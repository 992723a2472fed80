"""Task registry: look tasks up by name (``get_task("gsm8k", limit=100)``) and register new ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from lrl.tasks.base import Task
from lrl.tasks.code_datasets import MBPP, CodeTask, HumanEval
from lrl.tasks.math_datasets import GSM8K, MATH, MathDatasetTask
from lrl.tasks.synthetic import SyntheticArithmetic

TaskFactory = Callable[..., Task]
F = TypeVar("F", bound=TaskFactory)

_REGISTRY: dict[str, TaskFactory] = {}


def register_task(name: str, factory: TaskFactory | None = None, *, overwrite: bool = False) -> Any:
    """Register ``factory`` (a ``Task`` class or any callable returning one) under ``name``.

    Usable directly (``register_task("mine", MyTask)``) or as a decorator (``@register_task("mine")``).
    Re-registering an existing name raises ``ValueError`` unless ``overwrite=True``.
    """
    if not name:
        raise ValueError("register_task: name must be a non-empty string")

    def add(f: F) -> F:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"register_task: a task named {name!r} is already registered (pass overwrite=True)")
        _REGISTRY[name] = f
        return f

    return add(factory) if factory is not None else add


def available_tasks() -> list[str]:
    """Registered task names, sorted."""
    return sorted(_REGISTRY)


def check_task_args(name: str, kwargs: dict[str, Any], key: str = "data.task_kwargs") -> None:
    """Raise ``ValueError`` naming the config key when ``name`` is not a task (``data.task``) or its factory does
    not take ``kwargs`` (``key``); checked against the signature, so nothing is loaded."""
    import inspect

    if name not in _REGISTRY:
        raise ValueError(f"data.task: unknown task {name!r}; available tasks: {', '.join(available_tasks())}")
    try:
        params = inspect.signature(_REGISTRY[name]).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"{key}: task {name!r} does not take {unknown}; it takes {sorted(params)}")


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the task registered as ``name`` with ``kwargs`` (its constructor arguments)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(available_tasks())}")
    task = _REGISTRY[name](**kwargs)
    if not isinstance(task, Task):
        raise ValueError(f"task factory {name!r} returned {type(task).__name__}, not a Task")
    return task


register_task("synthetic", SyntheticArithmetic)
register_task("gsm8k", GSM8K)
register_task("math", MATH)
register_task("math_dataset", MathDatasetTask)
register_task("mbpp", MBPP)
register_task("humaneval", HumanEval)
register_task("code_dataset", CodeTask)
