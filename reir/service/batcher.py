"""Queries that arrive together go through the network together."""

import asyncio

from reir.service.searcher import BadRequest, Searcher


class Busy(BadRequest):
    """The service is at its limit of requests or queued queries: 503, try again after ``Retry-After``."""

    def __init__(self, message: str):
        super().__init__(503, message)


class QueryBatcher:
    """Queries waiting at the same moment are embedded in one network pass.

    The first query opens a batch; others join for up to ``window_s`` (or until ``max_batch``),
    and queries that arrive while the network runs form the next batch. At most ``max_waiting``
    queries wait; beyond that a query is refused as busy.
    """

    def __init__(self, searcher: Searcher, max_batch: int, window_s: float, max_waiting: int):
        self.searcher = searcher
        self.max_batch = max_batch
        self.window_s = window_s
        self.max_waiting = max_waiting
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None

    async def search(self, tensor, k: int, query_label: str | None) -> list[dict]:
        if self.queue is None:
            self.queue = asyncio.Queue(self.max_waiting)
            self.worker = asyncio.create_task(self.run())
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((tensor, k, query_label, future))
        except asyncio.QueueFull:
            raise Busy(f"{self.max_waiting} queries are already waiting; retry shortly") from None
        return await future

    async def run(self) -> None:
        import torch
        from starlette.concurrency import run_in_threadpool

        loop = asyncio.get_running_loop()
        queue = self.queue
        if queue is None:
            raise RuntimeError("run() is started by the first search(), which makes the queue")
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(queue.get_nowait() if queue.qsize() else
                                 await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            batch = [entry for entry in batch if not entry[3].done()]  # clients that left are not searched
            if not batch:
                continue
            try:
                answers = await run_in_threadpool(self.searcher.search_batch, torch.stack([e[0] for e in batch]),
                                                  [e[1] for e in batch], [e[2] for e in batch])
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request, which reports it
                for entry in batch:
                    if not entry[3].done():
                        entry[3].set_exception(exc)
                continue
            for entry, answer in zip(batch, answers):
                if not entry[3].done():
                    entry[3].set_result(answer)
