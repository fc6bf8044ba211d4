"""Ctrl-C while hctl releases a pod it rented: held off until the release is done.

When a job cannot start (a pod that never becomes reachable, a Ctrl-C while waiting for it), hctl
terminates the pod it created, which takes a request or two to RunPod. An impatient second Ctrl-C
in that moment would abort the release and leave the pod billing, unseen; and a pod hctl never
reached has no lease watchdog yet. So while a release runs, the next Ctrl-C only says what is
going on, and the one after it gives up on the release (the caller then says what may still bill).

`releasing` is that guard around a pod's stop or terminate, saying what a second Ctrl-C left.
Signals reach only the main thread: elsewhere the guard does nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType


@contextmanager
def interrupts_held(notice: Callable[[], None]) -> Iterator[None]:
    """Run the block with Ctrl-C held off: the first press calls `notice`, the second raises
    KeyboardInterrupt in the block as usual. A held press is not raised again afterwards: the
    caller is ending anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    presses = 0

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal presses
        presses += 1
        if presses > 1:
            raise KeyboardInterrupt
        notice()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def releasing(pod_id: str, verb: str, notify: Callable[[str], None], still: str) -> Iterator[None]:
    """Around a pod's `verb` ("stop" or "terminate"): Ctrl-C held off (the first press notifies
    `still`); after a second, the user is told the pod was left as it was and what to type, and
    KeyboardInterrupt goes on."""
    try:
        with interrupts_held(lambda: notify(still)):
            yield
    except KeyboardInterrupt:
        notify(f"left pod {pod_id} as it was: it may be billing — run `hctl {verb}-pod {pod_id}`")
        raise
