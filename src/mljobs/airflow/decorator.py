"""``@mljob_task`` (also ``@task.mljobs``): a TaskFlow function that runs as an mljobs job."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from airflow.sdk.bases.decorator import DecoratedOperator, TaskDecorator, task_decorator_factory

from mljobs.airflow.operator import MLJobOperator

__all__ = ["mljob_task"]


class _MLJobDecoratedOperator(DecoratedOperator, MLJobOperator):
    """The operator behind ``@mljob_task``: the decorated function, called with the task's arguments
    (XCom values resolved), is the job's payload; its return value is the task's XCom."""

    template_fields: Sequence[str] = MLJobOperator.template_fields
    custom_operator_name: str = "@task.mljobs"

    def __init__(self, *, python_callable: Callable[..., Any], op_args: Any = None, op_kwargs: Any = None,
                 **kwargs: Any) -> None:
        upstream = {"python_callable": python_callable, "op_args": op_args, "op_kwargs": op_kwargs}
        super().__init__(kwargs_to_upstream=upstream, python_callable=python_callable, op_args=op_args,
                         op_kwargs=op_kwargs, **kwargs)


def mljob_task(python_callable: Callable[..., Any] | None = None, multiple_outputs: bool | None = None,
               **kwargs: Any) -> TaskDecorator:
    """Wrap a function into a task whose body runs as a job on an mljobs compute pool.

    ``@mljob_task(compute_pool="POOL", stage_name="payload_stage", target_instances=2)`` takes the
    options of :class:`~mljobs.airflow.MLJobOperator` (and of any operator: ``retries``, ...).
    Calling the decorated function in a DAG makes the task; its arguments may be other tasks'
    outputs. Registered as ``@task.mljobs`` too.
    """
    return task_decorator_factory(python_callable=python_callable, multiple_outputs=multiple_outputs,
                                  decorated_operator_class=_MLJobDecoratedOperator, **kwargs)
