"""Admission control: how many engine requests and prompt tokens may wait for the engine.

An engine request waits from admission until its first engine output (or its end). Beyond
`max_queue` waiting requests or `max_queued_tokens` waiting prompt tokens, new HTTP requests
get 503 + Retry-After at once instead of queueing behind work the engine cannot reach soon.
All counting happens on the event loop thread, so no lock is needed.
"""

import time

from enduro.server.errors import invalid, unavailable


class WaitSlot:
    """One admitted engine request's place in the queue; `release` is idempotent."""

    def __init__(self, admission: "Admission", num_tokens: int) -> None:
        self._admission = admission
        self.num_tokens = num_tokens
        self.released = False
        self.admitted_at = time.monotonic()  # the queue time runs from here

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission.num_waiting -= 1
            self._admission.num_waiting_tokens -= self.num_tokens


class Admission:
    def __init__(self, max_queue: int, max_queued_tokens: int) -> None:
        self.max_queue = max_queue
        self.max_queued_tokens = max_queued_tokens
        self.num_waiting = 0
        self.num_waiting_tokens = 0

    def check_room(self) -> None:
        """Cheap early 503, before a request is tokenized, when the queue is already full."""
        if self.num_waiting >= self.max_queue or self.num_waiting_tokens >= self.max_queued_tokens:
            raise unavailable("the server is overloaded; retry later", "overloaded")

    def check_fits(self, num_requests: int, num_tokens: int) -> None:
        """400 for a request that could never be admitted, even into an empty queue."""
        if num_requests > self.max_queue:
            raise invalid(f"prompts x n must be at most {self.max_queue} (the server's max_queue)")
        if num_tokens > self.max_queued_tokens:
            raise invalid(f"the prompts must total at most {self.max_queued_tokens} tokens")

    def admit(self, token_counts: list[int]) -> list[WaitSlot]:
        """One slot per engine request (its prompt's token count), or 503 for all of them."""
        self.check_fits(len(token_counts), sum(token_counts))
        over_queue = self.num_waiting + len(token_counts) > self.max_queue
        over_tokens = self.num_waiting_tokens + sum(token_counts) > self.max_queued_tokens
        if over_queue or over_tokens:
            raise unavailable("the server is overloaded; retry later", "overloaded")
        self.num_waiting += len(token_counts)
        self.num_waiting_tokens += sum(token_counts)
        return [WaitSlot(self, n) for n in token_counts]
