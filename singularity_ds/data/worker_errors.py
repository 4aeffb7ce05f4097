"""A user error raised in a DataLoader worker reaches the main process whole.

PyTorch re-raises a worker's exception in the main process as ``type(e)(text of the worker's
traceback)``, or, when that call fails (``MediaError(path, reason)`` needs two arguments), as
``RuntimeError: Caught MediaError in DataLoader worker process 0.`` followed by the traceback: the
one-line message is buried and the error's fields are lost. So a worker hands a
:class:`~singularity_ds.errors.SingularityError` back as data instead: the dataset's fetch returns a
:class:`WorkerError` in place of the batch (:func:`catch_in_worker`, :func:`items_or_error`), the
collate function passes it through (:class:`CollateOrError`), the batch is pickled to the main process
like any other (the errors pickle whole), and :class:`Loader` stops its workers and raises it there.
With ``num_workers=0`` nothing is caught: the error is raised where it happens. Both end in the same
one line.
"""
from torch.utils.data import DataLoader, get_worker_info

from ..errors import SingularityError


class WorkerError:
    """Stands in for the batch (or item) whose loading raised ``error`` in a loader worker."""

    def __init__(self, error: SingularityError):
        self.error = error


def catch_in_worker(fetch):
    """``fetch()``, or, in a loader worker, the user error it raises as a :class:`WorkerError`."""
    if get_worker_info() is None:
        return fetch()
    try:
        return fetch()
    except SingularityError as e:
        return WorkerError(e)


def items_or_error(items, batch_size: int):
    """An iterable dataset's ``items``; in a loader worker, a user error they raise ends them as one batch
    of :class:`WorkerError` (a whole batch: the loader's ``drop_last`` would drop a partial one)."""
    try:
        yield from items
    except SingularityError as e:
        if get_worker_info() is None:
            raise
        for _ in range(batch_size):
            yield WorkerError(e)


class CollateOrError:
    """A collate function that passes a :class:`WorkerError` (the fetch's result, or one of its items) on
    as the batch."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, items):
        if isinstance(items, WorkerError):
            return items
        error = next((item for item in items if isinstance(item, WorkerError)), None)
        return error if error is not None else self.collate_fn(items)


class _Raising:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        if isinstance(batch, WorkerError):
            # stop the workers first (PyTorch's own clean-up, as when an iterator is deleted): one still
            # busy with its batch logs it before the error is printed, not after (the loader is done)
            shutdown = getattr(self.batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            raise batch.error
        return batch


class Loader(DataLoader):
    """A DataLoader that raises its workers' user errors whole in the main process (its collate function
    is wrapped in :class:`CollateOrError`)."""

    def __init__(self, dataset, collate_fn, **kwargs):
        super().__init__(dataset, collate_fn=CollateOrError(collate_fn), **kwargs)

    def __iter__(self):
        # not a generator: the workers start (and the sampler reads its resume position) at iter(), as before
        return _Raising(super().__iter__())
