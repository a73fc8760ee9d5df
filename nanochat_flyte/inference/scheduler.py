"""The server's scheduler: concurrent requests decoded together in one batch, on one thread of their own, so that the
event loop that submits them stays free to stream.
"""

import threading
from collections.abc import Callable

from nanochat_flyte.inference.engine import Batch, Engine, SamplingParams, Sequence


class Request:
    """A sequence submitted to a Scheduler. Its text arrives from the decode thread: take() it after notify()."""

    def __init__(self, sequence: Sequence, notify: Callable[[], None]):
        self.sequence, self._notify = sequence, notify
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._finished = False
        self.error: Exception | None = None  # set when decoding failed (the request is then finished)

    def deliver(self, delta: str, finished: bool, error: Exception | None = None) -> None:
        with self._lock:
            self._pending.append(delta)
            self._finished = finished
            self.error = error
        self._notify()

    @property
    def done(self) -> bool:
        """Finished, failed or cancelled: it holds no place in the batch any more (or will not by the next step)."""
        return self._finished or self.sequence.cancelled

    def take(self) -> tuple[list[str], bool]:
        """The text deltas that came since the last take, and whether the request is finished."""
        with self._lock:
            deltas, self._pending = [delta for delta in self._pending if delta], []
            return deltas, self._finished

    def cancel(self) -> None:
        """Stop decoding it (the client went away): its row leaves the batch before the next step."""
        self.sequence.cancelled = True


class Scheduler:
    """Concurrent requests decoded in one batch by one thread (the server's): a request joins the running batch
    between two steps, and leaves it when it finishes or is cancelled. Torch code never runs on the caller's
    thread, so an event loop that submits requests stays responsive."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._waiting: list[Request] = []
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="nanochat-decode", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], params: SamplingParams, notify: Callable[[], None]) -> Request:
        """Queue a request (ValueError if it is invalid). notify() is called from the decode thread whenever
        new text or the end is ready."""
        request = Request(self.engine.sequence(prompt, params), notify)
        with self._wake:
            self._waiting.append(request)
            self._wake.notify()
        return request

    def _run(self) -> None:
        batch = Batch(self.engine, max_len=self.engine.context)
        requests: dict[int, Request] = {}  # by id() of their sequence
        while True:
            with self._wake:
                while not self._waiting and not batch.sequences:
                    self._wake.wait()
                joining, self._waiting = self._waiting, []
            joining = [request for request in joining if not request.sequence.cancelled]
            try:
                joined = batch.add([request.sequence for request in joining])
            except Exception as error:  # e.g. a prompt too long for the memory left: these fail, the batch goes on
                for request in joining:
                    request.deliver("", finished=True, error=error)
            else:
                requests.update((id(request.sequence), request) for request in joining)
                self._deliver(joined, requests)
            try:
                self._deliver(batch.step(), requests)
            except Exception as error:  # e.g. out of memory: fail the requests in flight, keep serving
                for request in requests.values():
                    request.deliver("", finished=True, error=error)
                requests.clear()
                batch.close()  # its cache freed now (the error's traceback still holds the batch)
            for key in [key for key, request in requests.items() if request.sequence.cancelled]:
                del requests[key]

    @staticmethod
    def _deliver(events: list[tuple[Sequence, str]], requests: dict[int, Request]) -> None:
        for sequence, delta in events:
            if sequence.done:
                requests.pop(id(sequence)).deliver(delta, finished=True)
            elif delta:
                requests[id(sequence)].deliver(delta, finished=False)
