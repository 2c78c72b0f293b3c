"""Store calls made in the same event-loop turn, by all the requests in flight, go to Redis as one EVALSHA
of the batch script (proxy.store.redis's `_BATCH`): one round trip and one command to pack and parse
instead of one per call."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from proxy.store.base import StoreUnavailable


def _resp(args: list[Any]) -> bytes:
    """A command in Redis's wire format (RESP), packed in one pass: the arguments are strs and numbers,
    nearly always ASCII (then the whole command is encoded once)."""
    items = [a if isinstance(a, str) else repr(a) for a in args]
    text = f"*{len(items)}\r\n" + "".join([f"${len(x)}\r\n{x}\r\n" for x in items])
    if text.isascii():
        return text.encode()
    parts = [f"*{len(items)}\r\n".encode()]
    for x in items:
        data = x.encode()
        parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(parts)


# Operations per EVALSHA at most: a burst is split so that no one script holds Redis for long.
_BATCH_MAX = 256


class Batcher:
    """Store calls made in the same event-loop turn go to Redis as one EVALSHA of the batch script (what
    ioredis's auto-pipelining does for round trips, and one command to pack and parse instead of one
    per call): far less client CPU per call under concurrency."""

    def __init__(self, client: aioredis.Redis, script: Any):
        self._client = client
        self._script = script
        self._queue: list[tuple[str, list[str], list[Any], asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def call(self, operation: str, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._start_flush)
        self._queue.append((operation, keys, args, future))
        return future

    def _start_flush(self) -> None:
        queue, self._queue = self._queue, []
        loop = asyncio.get_running_loop()
        for i in range(0, len(queue), _BATCH_MAX):
            task = loop.create_task(self._flush(queue[i : i + _BATCH_MAX]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _execute(self, keys: list[str], argv: list[Any]) -> list[Any]:
        command = _resp(["EVALSHA", self._script.sha, len(keys), *keys, *argv])
        try:
            return await self._send(command)
        except NoScriptError:  # Redis restarted (or its scripts were flushed): load it again
            await self._client.script_load(self._script.script)
            return await self._send(command)

    async def _send(self, command: bytes) -> Any:
        """One packed command on a pooled connection, without redis-py's per-command machinery. A
        connection found dead (Redis restarted since it was last used) is reconnected once: the command
        did not run on it. A timeout is not retried (the command may have run): the caller's write ids
        and journal deal with that."""
        pool = self._client.connection_pool
        conn = await pool.get_connection()
        try:
            try:
                await conn.send_packed_command(command)
                return await conn.read_response()
            except RedisConnectionError:
                await conn.disconnect()
            await conn.send_packed_command(command)
            return await conn.read_response()
        except BaseException:
            # A reply may still be on its way (a timeout, a cancellation): never hand it to the next user.
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    async def _flush(self, batch: list[tuple[str, list[str], list[Any], asyncio.Future[Any]]]) -> None:
        keys: list[str] = []
        argv: list[Any] = [len(batch)]
        for operation, op_keys, op_args, _ in batch:
            keys += op_keys
            argv += (operation, len(op_keys), len(op_args), *op_args)
        try:
            results = await self._execute(keys, argv)
        except (RedisError, OSError) as e:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(StoreUnavailable(str(e)))
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(StoreUnavailable(str(result)))
            else:
                future.set_result(result)
