"""Parse and validate the route config in a child process, with a time and a memory limit.

Why a process and not a thread: libyaml scans and pydantic validates in C calls that hold
the GIL from start to end, so a thread would still stop the event loop (about 0.6 s for a
1 MiB file), and a thread can be neither stopped at a deadline nor held to a memory limit.
The child is: it is killed when a parse outlives PARSE_TIMEOUT_S, and it cannot grow by more
than PARSE_MEMORY_BYTES. Whatever the file holds, the proxy keeps relaying, answers signals
and stays within its own memory.

Starting the child (an interpreter importing pydantic) takes about 0.3 s of CPU and 30 MiB,
so it is started on first use and kept while reloads come, then stopped when none came for
IDLE_S. It sends a valid config back as JSON, which pydantic's JSON validator turns into the
same objects in milliseconds: the proxy itself never walks what the file's author wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import resource
import signal
import struct
import sys
import traceback
from pathlib import Path
from typing import BinaryIO

from pydantic import ValidationError

from tcpproxy.config import (
    DEFAULT_MAX_CONFIG_BYTES,
    ConfigError,
    LoadedConfig,
    RouteConfig,
    parse_config,
    read_config_bytes,
)

# A parse that takes longer is stopped. Parsing a 1 MiB file (the default size limit, at the
# node limit) takes about 1.5 s on a loaded 2-core machine.
PARSE_TIMEOUT_S = 10.0
# How much the child may grow while parsing. The worst file within the limits (1 MiB, every
# node allowed) grows it by about 60 MiB.
PARSE_MEMORY_BYTES = 128 << 20
# The child is stopped after this long without a parse (and started again for the next).
IDLE_S = 60.0

# Request: source and data lengths, then both. Answer: a kind and a length, then the payload.
_REQUEST = struct.Struct("!II")
_ANSWER = struct.Struct("!cI")
_CONFIG = b"C"  # a valid config, as JSON
_PROBLEMS = b"P"  # a JSON list of problem lines
_EXITING = b"X"  # problem lines; the child exits after this answer (it ran out of memory)


class ConfigParser:
    """Parses config bytes in a child process, one at a time."""

    def __init__(
        self,
        timeout_s: float = PARSE_TIMEOUT_S,
        memory_bytes: int = PARSE_MEMORY_BYTES,
        idle_s: float = IDLE_S,
    ) -> None:
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self.idle_s = idle_s
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._idle: asyncio.TimerHandle | None = None
        self._ending: set[asyncio.Task[None]] = set()
        self.started = 0  # child processes started, for tests and the curious

    @property
    def busy(self) -> bool:
        """A parse is under way (its request is with the child whenever the loop looks)."""
        return self._lock.locked()

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return None if self._process is None else self._process.pid

    async def start(self) -> int:
        """Start the child now (it is started by the first parse otherwise); its pid."""
        async with self._lock:
            return (await self._running()).pid

    async def parse(self, data: bytes, source: str) -> LoadedConfig:
        """The config in `data`, or ConfigError with one line per problem."""
        async with self._lock:
            if self._idle is not None:
                self._idle.cancel()
            try:
                kind, payload = await self._exchange(data, source)
            finally:
                if self._process is not None:
                    self._idle = asyncio.get_running_loop().call_later(self.idle_s, self._retire)
        if kind == _CONFIG:
            try:
                config = RouteConfig.model_validate_json(payload)
            except ValidationError as exc:  # a bug: what the child validated must validate
                reason = exc.errors(include_url=False)[0]["msg"]
                raise ConfigError(
                    [f"{source}: the parsed config did not validate: {reason}"]
                ) from None
            return LoadedConfig(config, hashlib.sha256(data).hexdigest(), source)
        problems = json.loads(payload)
        if kind == _EXITING:
            self._end(kill=False)
        raise ConfigError(problems)

    async def _exchange(self, data: bytes, source: str) -> tuple[bytes, bytes]:
        process = await self._running()
        assert process.stdin is not None
        assert process.stdout is not None
        name = source.encode()
        try:
            async with asyncio.timeout(self.timeout_s):
                process.stdin.write(_REQUEST.pack(len(name), len(data)) + name + data)
                await process.stdin.drain()
                kind, size = _ANSWER.unpack(await process.stdout.readexactly(_ANSWER.size))
                return kind, await process.stdout.readexactly(size)
        except TimeoutError:
            self._end(kill=True)
            raise ConfigError(
                [
                    f"{source}: parsing took longer than {self.timeout_s:g}s and was stopped "
                    "(the file is too complex)"
                ]
            ) from None
        except (asyncio.IncompleteReadError, ConnectionError):
            ending = self._end(kill=False)
            if ending is not None:
                await ending
            raise ConfigError(
                [f"{source}: the config parser process ended while parsing ({_how(process)})"]
            ) from None
        except BaseException:  # cancelled (the proxy is stopping): the child must not linger
            self._end(kill=True)
            raise

    async def _running(self) -> asyncio.subprocess.Process:
        if self._process is None or self._process.returncode is not None:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tcpproxy.config_worker",
                str(self.memory_bytes),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            self.started += 1
        return self._process

    def _retire(self) -> None:
        self._idle = None
        if not self._lock.locked():
            self._end(kill=False)

    def _end(self, kill: bool) -> asyncio.Task[None] | None:
        """Stop the child: end of its input (it exits), or SIGKILL; reaped in the background."""
        process, self._process = self._process, None
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if process is None:
            return None
        if kill:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        elif process.stdin is not None:
            process.stdin.close()
        task = asyncio.get_running_loop().create_task(self._reap(process))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)
        return task

    @staticmethod
    async def _reap(process: asyncio.subprocess.Process) -> None:
        try:
            await asyncio.wait_for(process.wait(), timeout=5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    def stop(self) -> None:
        """Stop the child, at once if it is parsing (that parse fails); a later parse starts
        another."""
        self._end(kill=self._lock.locked())

    async def close(self) -> None:
        """Stop the child and wait until it is gone."""
        self.stop()
        await asyncio.gather(*self._ending, return_exceptions=True)


def _how(process: asyncio.subprocess.Process) -> str:
    code = process.returncode
    if code is not None and code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"


async def load_isolated(path: Path, max_bytes: int = DEFAULT_MAX_CONFIG_BYTES) -> LoadedConfig:
    """Read and parse a config file with every limit the proxy applies (`tcpproxy check`)."""
    data = read_config_bytes(path, max_bytes)
    parser = ConfigParser()
    try:
        return await parser.parse(data, str(path))
    finally:
        await parser.close()


# -- the child ------------------------------------------------------------------------------


def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    parts = []
    while n:
        part = stream.read(n)
        if not part:
            return None
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _limit_memory(growth: int) -> None:
    """Let the address space grow by `growth` bytes from its size now, no more: a parse that
    needs more meets MemoryError, not the out-of-memory killer."""
    with open("/proc/self/status") as status:
        size_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = size_kib * 1024 + growth
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _answer(data: bytes, source: str, growth: int) -> tuple[bytes, bytes]:
    try:
        loaded = parse_config(data, source)
        return _CONFIG, loaded.config.model_dump_json(by_alias=True).encode()
    except ConfigError as exc:
        return _PROBLEMS, json.dumps(exc.problems).encode()
    except MemoryError:
        pass  # out of the except block first, so that what the parse built can be freed
    except Exception as exc:  # a bug in the parser: one line for the proxy, the rest here
        traceback.print_exc()
        return _PROBLEMS, json.dumps([f"{source}: cannot parse: {exc!r}"]).encode()
    problem = (
        f"{source}: parsing needs more than {growth >> 20} MiB of memory (the file is too complex)"
    )
    return _EXITING, json.dumps([problem]).encode()


def main(argv: list[str]) -> int:
    growth = int(argv[0]) if argv else PARSE_MEMORY_BYTES
    with contextlib.suppress(OSError, StopIteration, ValueError):
        _limit_memory(growth)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while (header := _read_exactly(stdin, _REQUEST.size)) is not None:
        name_size, data_size = _REQUEST.unpack(header)
        name, data = _read_exactly(stdin, name_size), _read_exactly(stdin, data_size)
        if name is None or data is None:
            break
        kind, payload = _answer(data, name.decode(), growth)
        stdout.write(_ANSWER.pack(kind, len(payload)) + payload)
        stdout.flush()
        if kind == _EXITING:
            return 1
    return 0


if __name__ == "__main__":
    # A Ctrl-C reaches the terminal's whole process group: the proxy ends this child itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(main(sys.argv[1:]))
