"""A byte budget shared by the requests of one ingress replica (bodies in flight, decoded image bytes).

Without it, memory grows with concurrency times the largest admissible request: sixteen 8 MiB bodies, or
sixteen small PNGs that each decode to 64 MiB of pixels. A request takes its bytes before the work and
gives them back after; when the budget is spent it waits up to `wait_s`, then is refused with a 503.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager


class Busy(Exception):
    """The budget stayed spent for the whole wait; answered with 503 and Retry-After."""

    status = 503

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ByteBudget:
    def __init__(self, name: str, capacity: int, wait_s: float):
        self.name, self.capacity, self.wait_s = name, capacity, wait_s
        self.used = 0
        self._freed: asyncio.Condition | None = None  # made on first use, inside the serving event loop

    def busy(self, n: int) -> Busy:
        return Busy(f"server busy: {self.used} of {self.capacity} bytes of {self.name} in use, this request needs "
                    f"{n}; retry shortly")

    async def take(self, n: int) -> None:
        """Reserve `n` bytes, waiting up to `wait_s` for others to give theirs back; `Busy` otherwise."""
        if n > self.capacity:
            raise self.busy(n)
        if self.used + n > self.capacity:
            self._freed = self._freed or asyncio.Condition()
            async with self._freed:
                try:
                    await asyncio.wait_for(self._freed.wait_for(lambda: self.used + n <= self.capacity), self.wait_s)
                except TimeoutError:
                    raise self.busy(n) from None
        self.used += n

    def take_now(self, n: int) -> None:
        """Reserve `n` more bytes without waiting (a body whose size is only known as it arrives)."""
        if self.used + n > self.capacity:
            raise self.busy(n)
        self.used += n

    async def give(self, n: int) -> None:
        self.used -= n
        if self._freed is not None:
            async with self._freed:
                self._freed.notify_all()

    @asynccontextmanager
    async def hold(self, n: int):
        await self.take(n)
        try:
            yield
        finally:
            await self.give(n)
