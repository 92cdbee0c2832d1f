"""The fault proxy itself (tests/faultproxy.py), against a real echo server on 127.0.0.1: each fault does what
its docstring says, switched on and off at run time, in-process and as a subprocess."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultproxy import FaultProxy


class Echo:
    """A threaded echo server that records how each connection ended: 'eof', 'reset' or 'open'."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.ends: list[str] = []
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(c,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, c: socket.socket) -> None:
        end = "eof"
        c.settimeout(30)
        try:
            while True:
                data = c.recv(65536)
                if not data:
                    break
                c.sendall(data)
        except ConnectionResetError:
            end = "reset"
        except OSError:
            end = "error"
        finally:
            c.close()
            with self.lock:
                self.ends.append(end)

    def wait_ends(self, n: int, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.ends) >= n:
                    return list(self.ends)
            time.sleep(0.02)
        raise AssertionError(f"only {self.ends} connection ends within {timeout} s")

    def close(self) -> None:
        self.sock.close()
        for t in self.threads:
            t.join(0.1)


@pytest.fixture
def echo() -> Iterator[Echo]:
    e = Echo()
    yield e
    e.close()


@pytest.fixture
def proxy(echo: Echo) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", echo.port)) as p:
        yield p


_opened: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    yield
    while _opened:
        _opened.pop().close()


def conn(p: FaultProxy | int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", p if isinstance(p, int) else p.port), timeout=10)
    _opened.append(s)
    return s


def recv_exact(s: socket.socket, n: int, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    out = b""
    while len(out) < n:
        data = s.recv(n - len(out))
        if not data:
            raise ConnectionError(f"EOF after {len(out)} of {n} bytes")
        out += data
    return out


def nothing_arrives(s: socket.socket, within: float = 0.3) -> bool:
    s.settimeout(within)
    try:
        data = s.recv(1)
    except TimeoutError:
        return True
    raise AssertionError(f"expected silence, got {data!r}")


def test_pass_through_and_stats(proxy: FaultProxy) -> None:
    s = conn(proxy)
    payload = bytes(range(256)) * 400
    s.sendall(payload)
    assert recv_exact(s, len(payload)) == payload
    st = proxy.stats()
    assert (st.accepted, st.live, st.bytes_up, st.bytes_down) == (1, 1, len(payload), len(payload)), st
    s.close()


def test_delay_holds_every_chunk_back_then_delivers_in_order(proxy: FaultProxy) -> None:
    s = conn(proxy)
    proxy.delay(0.6)
    s.sendall(b"one")
    s.sendall(b"two")
    assert nothing_arrives(s, 0.2)  # 0.6 s each way: nothing can be back after 0.2 s
    assert recv_exact(s, 6) == b"onetwo"
    proxy.delay(0)
    s.sendall(b"x")
    assert recv_exact(s, 1) == b"x"


def test_stall_holds_everything_until_resume(proxy: FaultProxy, echo: Echo) -> None:
    s = conn(proxy)
    s.sendall(b"a")
    assert recv_exact(s, 1) == b"a"
    proxy.stall()
    s.sendall(b"bcd")
    assert nothing_arrives(s)
    assert echo.ends == []  # nobody closed anything
    proxy.resume()
    assert recv_exact(s, 3) == b"bcd"


def test_drop_loses_bytes_but_keeps_the_connection(proxy: FaultProxy) -> None:
    s = conn(proxy)
    proxy.drop()
    s.sendall(b"lost")
    assert nothing_arrives(s)
    proxy.undrop()
    s.sendall(b"kept")
    assert recv_exact(s, 4) == b"kept"  # the dropped bytes never come
    assert proxy.stats().dropped_bytes >= 4


def test_half_open_closes_the_server_side_only(proxy: FaultProxy, echo: Echo) -> None:
    s = conn(proxy)
    s.sendall(b"hi")
    assert recv_exact(s, 2) == b"hi"
    assert proxy.half_open() == 1
    assert echo.wait_ends(1) == ["eof"]  # the server saw the connection close
    s.sendall(b"into the void")  # the client is not told: no error, no EOF, no reply
    assert nothing_arrives(s, 0.5)
    assert proxy.stats().half_opened == 1
    s.close()


def test_reset_resets_both_sides(proxy: FaultProxy, echo: Echo) -> None:
    s = conn(proxy)
    s.sendall(b"hi")
    assert recv_exact(s, 2) == b"hi"
    assert proxy.reset() == 1
    s.settimeout(5)
    with pytest.raises(ConnectionResetError):
        s.recv(1)
    assert echo.wait_ends(1) == ["reset"]
    s2 = conn(proxy)  # the proxy itself goes on
    s2.sendall(b"ok")
    assert recv_exact(s2, 2) == b"ok"


def test_refuse_and_blip(proxy: FaultProxy) -> None:
    proxy.refuse()
    with pytest.raises(ConnectionError):  # reset at once: at connect, at the send or at the read
        s = conn(proxy)
        s.settimeout(5)
        s.sendall(b"x")
        if not s.recv(1):
            raise ConnectionError("EOF")
    proxy.accept()
    live = conn(proxy)
    live.sendall(b"y")
    assert recv_exact(live, 1) == b"y"
    assert proxy.blip(1.0) == 1
    with pytest.raises(ConnectionResetError):
        live.recv(1)
    deadline = time.monotonic() + 10
    while True:  # accepting again by itself after the blip
        try:
            again = conn(proxy)
            again.sendall(b"z")
            if recv_exact(again, 1, timeout=2) == b"z":
                break
        except (ConnectionError, OSError):
            pass
        assert time.monotonic() < deadline, "the proxy never accepted again after the blip"
        time.sleep(0.1)
    st = proxy.stats()
    assert st.refused >= 1 and st.resets >= 1, st


def test_bandwidth_limit_paces_but_delivers_everything(proxy: FaultProxy) -> None:
    proxy.bandwidth(20_000)  # bytes per second, each way
    s = conn(proxy)
    payload = bytes(range(256)) * 160  # 40 KiB: about 2 s each way at the limit
    threading.Thread(target=s.sendall, args=(payload,), daemon=True).start()
    time.sleep(0.5)
    s.settimeout(0.05)
    early = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            early += chunk
    except TimeoutError:
        pass
    assert len(early) < len(payload) // 2, len(early)  # paced: at 20 kB/s not half is back after 0.5 s
    proxy.bandwidth(None)
    assert early + recv_exact(s, len(payload) - len(early), timeout=20) == payload


def test_as_a_subprocess_driven_on_stdin(echo: Echo) -> None:
    script = Path(__file__).resolve().parent.parent / "faultproxy.py"
    p = subprocess.Popen([sys.executable, str(script), "--upstream", f"127.0.0.1:{echo.port}"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    with p:
        assert p.stdout is not None and p.stdin is not None
        line = p.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])

        def cmd(c: str) -> str:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write(c + "\n")
            p.stdin.flush()
            return p.stdout.readline().strip()

        s = conn(port)
        s.sendall(b"abc")
        assert recv_exact(s, 3) == b"abc"
        assert cmd("stall") == "ok"
        s.sendall(b"d")
        assert nothing_arrives(s)
        assert cmd("resume") == "ok"
        assert recv_exact(s, 1) == b"d"
        assert cmd("delay nope").startswith("error: delay")
        assert cmd("frobnicate").startswith("error: unknown command")
        stats = json.loads(cmd("stats"))
        assert stats["accepted"] == 1 and stats["bytes_up"] == 4, stats
        assert cmd("reset") == "ok"
        with pytest.raises(ConnectionResetError):
            s.recv(1)
        p.stdin.write("quit\n")
        p.stdin.flush()
        try:
            assert p.wait(10) == 0
        finally:
            if p.poll() is None:
                p.kill()
