"""A small event loop: file events and time events on one thread, in the manner of Redis's ae.c.

Everything the server does happens in callbacks run by :meth:`EventLoop.run`: a socket
became readable or writable (file events, through ``selectors``, so epoll or kqueue
where the platform has them), or a time came (time events).  One thread owns all the
state, so nothing needs a lock.  A time event's callback returns the delay until it
should run again, or None to end, as ae.c's timeProc returns AE_NOMORE.
"""

import heapq
import itertools
import selectors
import time
from typing import Callable, Dict, List, Optional, Tuple

FileCallback = Callable[[], None]
MAX_WAIT = 86400.0  # seconds: longer waits are cut, and the loop simply waits again
_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
TimeCallback = Callable[[], Optional[float]]


def _never() -> Optional[float]:
    """A cancelled timer's callback: never called."""
    return None


class Timer:
    """A scheduled time event; :meth:`EventLoop.cancel` keeps it from running."""

    __slots__ = ("when", "callback", "cancelled", "scheduled")

    def __init__(self, when: float, callback: TimeCallback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False
        self.scheduled = False  # in the loop's heap


class _Handlers:
    """The callbacks registered for one file: reading, writing, or both."""

    __slots__ = ("reader", "writer", "registered")

    def __init__(self) -> None:
        self.reader: Optional[FileCallback] = None
        self.writer: Optional[FileCallback] = None
        self.registered = False

    @property
    def mask(self) -> int:
        return (selectors.EVENT_READ if self.reader else 0) | (
            selectors.EVENT_WRITE if self.writer else 0
        )


class EventLoop:
    """Runs file and time callbacks until :meth:`stop` is called."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._selector = selectors.DefaultSelector()
        self._files: Dict[int, _Handlers] = {}
        self._timers: List[Tuple[float, int, Timer]] = []
        self._sequence = itertools.count()  # orders timers due at the same time
        self._cancelled = 0  # cancelled timers still in the heap
        self._soon: List[FileCallback] = []  # to run on the next turn, without waiting
        self._running = False
        self.turns = 0  # how many times the loop has waited for events
        self.now = clock()  # the time when the last wait ended: cheaper than asking again
        # Called before each wait, as ae.c's beforesleep: work that must see the turn's effects.
        self.before_wait: Optional[Callable[[], None]] = None

    # File events.

    def add_reader(self, fd: int, callback: FileCallback) -> None:
        self._handlers(fd).reader = callback
        self._reregister(fd)

    def remove_reader(self, fd: int) -> None:
        handlers = self._files.get(fd)
        if handlers is not None and handlers.reader is not None:
            handlers.reader = None
            self._reregister(fd)

    def add_writer(self, fd: int, callback: FileCallback) -> None:
        self._handlers(fd).writer = callback
        self._reregister(fd)

    def remove_writer(self, fd: int) -> None:
        handlers = self._files.get(fd)
        if handlers is not None and handlers.writer is not None:
            handlers.writer = None
            self._reregister(fd)

    def forget(self, fd: int) -> None:
        """Drop every callback of ``fd``; call it before the file is closed."""
        handlers = self._files.pop(fd, None)
        if handlers is None:
            return
        handlers.reader = handlers.writer = None  # an event already fetched is not delivered
        if handlers.registered:
            self._selector.unregister(fd)

    def _handlers(self, fd: int) -> _Handlers:
        handlers = self._files.get(fd)
        if handlers is None:
            handlers = self._files[fd] = _Handlers()
        return handlers

    def _reregister(self, fd: int) -> None:
        """Tell the selector what ``fd`` is now waited for (nothing: not at all)."""
        handlers = self._files[fd]
        mask = handlers.mask
        if not handlers.registered:
            if mask:
                self._selector.register(fd, mask, handlers)
                handlers.registered = True
        elif mask:
            self._selector.modify(fd, mask, handlers)
        else:
            self._selector.unregister(fd)
            handlers.registered = False

    # Time events.

    def call_later(self, delay: float, callback: TimeCallback) -> Timer:
        """Run ``callback`` after ``delay`` seconds; it returns its next delay, or None."""
        return self.call_at(self.clock() + delay, callback)

    def call_at(self, when: float, callback: TimeCallback) -> Timer:
        timer = Timer(when, callback)
        self._schedule(timer)
        return timer

    def _schedule(self, timer: Timer) -> None:
        timer.scheduled = True
        heapq.heappush(self._timers, (timer.when, next(self._sequence), timer))

    def cancel(self, timer: Timer) -> None:
        """Keep ``timer`` from running; the heap is rebuilt once most of it is cancelled."""
        if timer.cancelled:
            return
        timer.cancelled = True
        timer.callback = _never  # what it would have called is let go now, not when popped
        if not timer.scheduled:  # running now, or done: nothing in the heap to skip
            return
        self._cancelled += 1
        if self._cancelled > 64 and self._cancelled * 2 > len(self._timers):
            self._timers = [entry for entry in self._timers if not entry[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled = 0

    def call_soon(self, callback: FileCallback) -> None:
        """Run ``callback`` at the end of this turn (after its file events and timers), or of
        the next one when added by those; the wait before it is skipped."""
        self._soon.append(callback)

    # Running.

    def stop(self) -> None:
        """Make :meth:`run` return after the current turn; safe from signal handlers."""
        self._running = False

    def run(self) -> None:
        """Wait for events and run their callbacks until :meth:`stop`."""
        self._running = True
        while self._running:
            self.run_once()

    def run_once(self, timeout: Optional[float] = None) -> None:
        """Wait at most until the next timer (or ``timeout``), then run what is due."""
        if self.before_wait is not None:
            self.before_wait()
        wait = 0.0 if self._soon else self._until_next_timer()
        if timeout is not None:
            wait = timeout if wait is None else min(wait, timeout)
        if wait is not None:
            wait = min(wait, MAX_WAIT)  # epoll takes at most 2**31 - 1 ms
        self.turns += 1
        ready = self._selector.select(wait)
        now = self.now = self.clock()
        for key, events in ready:
            handlers = key.data
            if events & _READ and handlers.reader is not None:
                handlers.reader()
            if events & _WRITE and handlers.writer is not None:
                handlers.writer()
        timers = self._timers
        if timers and timers[0][0] <= now:
            self._run_due_timers()
        if self._soon:
            soon, self._soon = self._soon, []
            for callback in soon:
                callback()

    def close(self) -> None:
        self._selector.close()
        self._files.clear()
        self._timers.clear()

    def _until_next_timer(self) -> Optional[float]:
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)[2].scheduled = False
            self._cancelled -= 1
        if not timers:
            return None
        return max(timers[0][0] - self.clock(), 0.0)

    def _run_due_timers(self) -> None:
        """Run the timers due now (run_once has seen that one is); ones that a callback
        schedules for now wait a turn."""
        timers = self._timers
        now = self.now
        due = []
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)[2]
            timer.scheduled = False
            if timer.cancelled:
                self._cancelled -= 1
            else:
                due.append(timer)
        for timer in due:
            if timer.cancelled:  # by a callback that ran before it in this batch
                continue
            delay = timer.callback()
            if delay is not None and not timer.cancelled:
                timer.when = self.clock() + delay
                self._schedule(timer)
