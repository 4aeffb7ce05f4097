"""Which ranks are still alive, so that a rank that outlives a lost one can say which rank it lost.

A collective with a dead peer fails on the survivors (gloo: "connection reset by peer" at once, or a
timeout after ``dist_timeout`` seconds when the peer's node is frozen or unreachable), and the
DeepSpeed launcher stops the other ranks of its node with SIGTERM; neither names the rank that went.
So every rank bumps its own counter in the rendezvous store (the TCPStore that torch.distributed's
``env://`` start serves at MASTER_ADDR:MASTER_PORT, in rank 0's process) from a daemon thread, once a
second. :func:`lost_ranks` reads the counters twice, a few beats apart: a rank whose counter stood still
is gone (killed, crashed, its node down or frozen). When the store itself does not answer, rank 0, which
serves it, is gone. Counters, not clocks: the nodes' clocks need not agree.

:func:`reporting_lost_ranks` wraps a multi-rank run: any failure (or SIGTERM) inside it is checked against
the counters and becomes one :class:`~singularity_ds.errors.RankLostError` line naming the lost ranks.
"""
import contextlib
import datetime
import logging
import os
import signal
import threading
import time

from .errors import RankLostError, SingularityError

logger = logging.getLogger(__name__)

INTERVAL = 1.0  # seconds between beats
KEY = "singularity_ds/heartbeat/{}"
_beat = None  # (rank, world, stop event, pid) of this process's heartbeat


def _store(timeout: float):
    """A client of the rendezvous store of its own (the heartbeat thread must never share a socket with
    the process group's or the checker's requests)."""
    import torch.distributed as tdist
    return tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False)


def start(rank: int, world: int):
    """Start this rank's heartbeat (once the process group is up: the store is served from then on)."""
    global _beat
    if world < 2 or _beat is not None:
        return
    store, stop = _store(timeout=30), threading.Event()

    def beat():
        while not stop.wait(INTERVAL):
            try:
                store.add(KEY.format(rank), 1)
            except Exception:  # the store has gone with rank 0: lost_ranks() reports it
                return
    threading.Thread(target=beat, name="singularity-ds-heartbeat", daemon=True).start()
    _beat = (rank, world, stop, os.getpid())


def stop():
    """Stop the heartbeat (a finished rank's counter standing still is not a loss: nobody asks then)."""
    global _beat
    if _beat is not None:
        _beat[2].set()
        _beat = None


def lost_ranks(rank: int, world: int, beats: float = 3.0) -> list:
    """The ranks (other than ``rank``) whose heartbeat stopped, in order; ``[0]`` when the store that
    rank 0 serves does not answer. Takes ``beats`` heartbeat intervals."""
    try:
        store = _store(timeout=max(5.0, 2 * INTERVAL))
        counts = lambda: [store.add(KEY.format(r), 0) for r in range(world)]  # noqa: E731 (add 0 reads)
        before = counts()
        time.sleep(beats * INTERVAL)
        after = counts()
    except Exception:  # refused (rank 0's process is gone) or timed out (its node is)
        return [0] if rank != 0 else []
    return [r for r in range(world) if r != rank and after[r] == before[r]]


class _Terminated(Exception):
    """SIGTERM, turned into an exception so that the run's failure path reports it."""


def _on_sigterm(signum, frame):
    # no other rank to ask about, or a forked DataLoader worker (it inherits the handler): end as without it
    if _beat is None or _beat[3] != os.getpid():
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise _Terminated()


@contextlib.contextmanager
def reporting_lost_ranks():
    """Run the body; if it fails or receives SIGTERM while another rank is gone, raise one line naming
    that rank instead. Anything else passes through unchanged: a user error (it names its own cause),
    or a failure with every rank alive. Does nothing special without a multi-rank heartbeat."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        yield
    except SingularityError:
        stop()  # this rank stops for a reason it names itself: the others must see it go at once
        raise
    except BaseException as e:
        if _beat is None or isinstance(e, KeyboardInterrupt):
            stop()
            raise
        if _main_thread():  # the launcher stops us with SIGTERM while we look (it waits 30 s, then kills)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        rank, world = _beat[:2]
        lost = lost_ranks(rank, world)  # still beating meanwhile: a rank checking at once must not name us
        stop()
        if lost:
            what = (f"{type(e).__name__}: {_first_line(e)}" if not isinstance(e, _Terminated)
                    else "stopped by SIGTERM (the launcher stops a node's ranks when one of them exits)")
            raise RankLostError(f"rank {', '.join(map(str, lost))} of {world} was lost (its heartbeat "
                                f"stopped: killed, crashed, or its node is down or frozen); rank {rank} "
                                f"stopped too ({what}); resume=auto continues from the last "
                                f"checkpoint") from e
        if isinstance(e, _Terminated):  # stopped from outside (scancel, kill) with every rank alive
            logger.error("rank %d: stopped by SIGTERM", rank)
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    finally:
        if previous is not None and _main_thread():
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""
