"""Throw-away clusters for tests: a 3-node RabbitMQ cluster and a 3+3 Redis Cluster, each started by
the test session itself on free loopback ports in its own temporary folder, and gone afterwards.

Nothing here imports ``indexer``.  Use them through the fixtures of tests/clusters/conftest.py
(module scope; ``rabbit``/``redis_nodes`` also restart what an earlier test killed), or as context
managers::

    with RabbitCluster() as rabbit, RedisCluster() as cache:
        rabbit.urls                 # amqp://guest:guest@127.0.0.1:P/ of nodes 0, 1, 2
        rabbit.kill(0); rabbit.start(0)
        primary = cache.primary_for("key")
        cache.kill(primary); seconds = cache.wait_failover(primary)

Measured here (2 cores shared with other engineers' suites, load average 2-3.5): RabbitMQ cluster
start 11.2-16.0 s (the 3 nodes boot in parallel in 7-9 s, joining 3-5 s, the final check ~1 s);
after kill -9 of a quorum queue's leader the first confirmed publish on another node 0.13-0.57 s,
0 confirmed messages lost; a killed node restarts and rejoins in 3.7-4.3 s.  Redis Cluster start
2.9-3.7 s; failover after kill -9 of a primary 3.9-4.9 s with cluster-node-timeout 2000 ms; a
killed primary restarts as a replica in 0.1-1 s.  The whole tests/clusters module: 43-52 s.

What the next engineer needs to know about running these here (Debian 12, RabbitMQ 3.10.8 on
Erlang 25, Redis 7.0.15, root, under gVisor).  The machine's own RabbitMQ (rabbit@localhost, :5672,
dist :25672), its epmd (:4369), Redis (:6379) and Postgres are shared: nothing here stops, restarts
or reconfigures them; the only contact is read-only (``listener_pids`` reads ``ss``; the last test
pings them).

RabbitMQ
* ``/usr/sbin/rabbitmq-server`` and ``/usr/sbin/rabbitmqctl`` ``su`` to the ``rabbitmq`` user, whose
  HOME holds the machine broker's Erlang cookie: we run the scripts of
  ``/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/`` as root instead, with HOME set to a private
  folder holding our own ``.erlang.cookie`` (0400) for the nodes *and* every ``rabbitmqctl`` call.
  A wrong cookie or a wrong epmd both read "unable to perform an operation on node".
* Each cluster runs its own ``epmd -port P -address 127.0.0.1`` in the foreground, and every node and
  CLI call gets ``ERL_EPMD_PORT=P``.  Without it the CLI says nodedown; with no epmd listening a
  booting node starts a *daemon* epmd that outlives everything.  Start epmd first and wait for it.
  (``epmd -names`` on :4369 keeps listing only ``rabbit`` while our clusters run.)
* The machine's /etc/rabbitmq/rabbitmq-env.conf (NODENAME=rabbit@localhost) and rabbitmq.conf
  (:5672) would be read by our nodes too: every ``RABBITMQ_*`` path (conf-env file, config file,
  conf.d, advanced config, enabled plugins ``[].``, base, mnesia, logs, pid file, feature flags,
  plugin expansion, motd) points into the temp folder, and inherited ``RABBITMQ_*``/``ERL_*``
  variables are dropped.  Plugins off keeps :15672 free.  Distribution listens on 127.0.0.1 only
  (``-kernel inet_dist_use_interface``).
* ``RABBITMQ_DIST_PORT`` defaults to AMQP port + 20000, so it is set; ``rabbitmqctl`` listens on
  35672-35682 itself.  Ports here are drawn at random *below* the kernel's ephemeral range
  (ip_local_port_range, 32768-60999 here) and checked free by binding: the other suites' ports come
  from ``bind(0)``, i.e. the ephemeral range, so they never collide with ours, and no outgoing
  connection can take one of ours between the check and the server's bind.
* ``rabbitmq-server`` is a /bin/sh that runs beam.smp as its child: ``kill(i)`` kill -9s the PID of
  ``RABBITMQ_PID_FILE`` (checked first to be a beam.smp of this cluster), and ``start(i)`` removes
  the stale pid file before booting the node again.  The restarted node rejoins by itself (its
  mnesia folder remembers the cluster).
* Joining is ``rabbitmqctl -n N stop_app; join_cluster <node 1>; start_app`` for nodes 2 and 3
  (stop_app and start_app of both in parallel, join_cluster one at a time).  Each ``rabbitmqctl`` call
  costs 0.5-1.2 s of CLI start-up (Erlang + Elixir) on these 2 cores: keep CLI calls out of loops.
* A quorum queue declared on a 3-node cluster gets all 3 nodes as members (the initial group size
  defaults to the cluster size): ``list_queues name type leader members online`` and
  ``rabbitmq-queues quorum_status Q`` (JSON keys "Node Name", "Raft State") show them.  After kill
  -9 of its leader the peers see the TCP close at once (net_ticktime never comes into it) and elect
  a new leader within a second; ``basic.get`` right after can fail with ``541 INTERNAL_ERROR ...
  nodedown`` (the connection is closed): reconnect and retry.
* ``list_queues ... messages_*`` counts of quorum queues are refreshed on a ~5 s tick; a passive
  ``queue.declare`` gives the current ready count.

Redis Cluster
* ``redis-server --cluster-enabled yes ... --bind 127.0.0.1`` (its default bind is every interface)
  with an explicit ``--cluster-port`` (the bus defaults to port + 10000, which lands in the
  ephemeral range), then ``redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes``.
  ``--cluster create`` returns before gossip converges: ``wait_ready`` waits until every live node
  reports the same topology, 3 primaries own all 16384 slots, ``cluster_state:ok`` everywhere and
  every replica has ``master_link_status:up``.  ``--repl-diskless-sync-delay 0`` saves 5 s there.
* ``--set-proc-title no``: otherwise redis-server overwrites its argv *and* its environment (the
  machine's redis-server shows a blank /proc/PID/environ), and the marker below could not find it.
* Failover takes about 2x ``cluster-node-timeout`` (2000 ms here).  Replication is asynchronous: the
  tests wait until the replica has a key (``READONLY`` + ``GET`` on it) before killing its primary;
  a write not covered by ``WAIT`` can be lost in a failover.  redis-py's cluster client gets
  connection errors until the failover is done, then finds the new primary by itself.
* Keyspace notifications are per node: ``notify-keyspace-events`` is empty by default, a
  ``CONFIG SET`` on a primary is neither propagated to other nodes nor replicated to its replica,
  and an event is published only on the node holding the key.  A listener must subscribe on every
  primary (and configure the replicas too, or lose events after a failover).
* redis-py 8 speaks RESP3 by default: ``CONFIG GET`` answers a dict, not a flat list.  A pubsub's
  ``subscribed`` turns true only once ``get_message`` has read the (p)subscribe reply.

Teardown
* Every process we start carries ``MI_TEST_CLUSTER=<cluster id>`` in its environment (the CLI's own
  beam.smp too); ``stop()`` kill -9s whatever still carries it, removes the temp folder, and raises
  if anything is left.  Other engineers' suites run redis-servers and rabbitmqctl at the same time:
  find ours by the marker, never by name.
* ``stop()`` runs from the fixtures' teardown: a failing test, Ctrl-C (tried: everything gone once
  pytest exits) and pytest-timeout's signal method all get there.  For what never reaches it
  (pytest killed with SIGKILL or SIGTERM, pytest-timeout's thread method calling ``os._exit``),
  each cluster starts a small reaper in its own session: when pytest's PID goes away it kill -9s
  every process with the cluster's marker and removes the folder (tried: kill -9 of pytest while
  the RabbitMQ nodes booted left nothing 4 s later).
* This machine runs under gVisor: PID 1 reaps orphans lazily, so a killed server whose parent died
  first can show as a zombie (``<defunct>``, empty environ) for a moment; the checks here count a
  zombie as gone.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import redis

T = TypeVar("T")

MARKER = "MI_TEST_CLUSTER"
"""The environment variable every process of a cluster carries (value: the cluster's id)."""

TIMINGS: list[tuple[str, float]] = []
"""(what, seconds) of start-ups, kills, failovers: tests/clusters/conftest.py prints them."""

ALL_CLUSTER_IDS: list[str] = []
"""The id of every cluster created in this process (for the final "nothing of ours is left")."""

MACHINE_SERVICE_PORTS = {"RabbitMQ": 5672, "epmd": 4369, "Redis": 6379}
"""The machine's own services, which the clusters must leave alone (checked by ``listener_pids``)."""

_PORT_LOW = 20000
_AVOID = {4369, 5432, 5672, 6379, 15672, 16379, 25672, *range(35672, 35693)}
_handed_out: set[int] = set()


class ClusterDied(RuntimeError):
    """A server of a cluster exited while it was being waited for: no point waiting longer."""


def record_timing(what: str, seconds: float) -> float:
    TIMINGS.append((what, seconds))
    print(f"[clusters] {what}: {seconds:.2f} s", flush=True)
    return seconds


def _wait(check: Callable[[], T], *, timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = check()
        except ClusterDied:
            raise
        except Exception as exc:  # the thing waited for may raise until it is there
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s}s (last: {last!r})")
        time.sleep(interval_s)


def _parallel(call: Callable[[int], T], items: list[int]) -> list[T]:
    """``call`` on every item at once (threads: these are subprocesses); the results in order."""
    if len(items) <= 1:
        return [call(item) for item in items]
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(call, items))


# --- ports -------------------------------------------------------------------------------------


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    for address in ("127.0.0.1", "0.0.0.0"):
        with socket.socket() as sock:
            try:
                sock.bind((address, port))
            except OSError:
                return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports below the ephemeral range, never handed out twice here."""
    high = min(_ephemeral_low(), 32768)
    if high < _PORT_LOW + 2000:  # an unusual ip_local_port_range: take our chances below 32768
        high = 32768
    rng = random.SystemRandom()
    ports: list[int] = []
    for _ in range(10_000):
        if len(ports) == count:
            break
        port = rng.randrange(_PORT_LOW, high)
        if port in _AVOID or port in _handed_out or port in ports:
            continue
        if _bindable(port):
            ports.append(port)
    else:
        raise RuntimeError(f"could not find {count} free ports in {_PORT_LOW}-{high}")
    _handed_out.update(ports)
    return ports


def answers(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def listener_pids(ports: Iterable[int]) -> dict[int, int | None]:
    """The PID listening on each loopback TCP port (read-only, via ``ss``), or None."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=10, check=True).stdout
    found: dict[int, int | None] = {}
    wanted = set(ports)
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        port = int(fields[3].rsplit(":", 1)[1])
        if port in wanted and "pid=" in line and found.get(port) is None:
            found[port] = int(line.split("pid=", 1)[1].split(",", 1)[0])
    return {port: found.get(port) for port in wanted}


# --- processes ---------------------------------------------------------------------------------


def processes_of(cluster_ids: Iterable[str]) -> list[tuple[int, str]]:
    """(pid, command name) of every live process whose environment carries one of the markers."""
    tokens = {f"{MARKER}={cid}".encode() for cid in cluster_ids}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = set(f.read().split(b"\0"))
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
        except OSError:
            continue
        if tokens & environ:
            found.append((int(entry), comm))
    return found


def _kill_marked(cluster_id: str, rounds: int = 5) -> None:
    for _ in range(rounds):
        left = processes_of([cluster_id])
        if not left:
            return
        for pid, _comm in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _clean_env(cluster_id: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_", "REDIS")) and k != MARKER}
    env.setdefault("LANG", "C.UTF-8")
    env["LC_ALL"] = "C.UTF-8"
    env[MARKER] = cluster_id
    env.update(extra)
    return env


def _spawn(argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal reaches pytest only; the fixture stops us
        )


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({path}: {exc})"


_REAPER = r"""
import os, shutil, signal, sys, time
parent, root, token = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode()
def ours():
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/environ" % name, "rb") as f:
                    if token in f.read().split(b"\0"):
                        yield int(name)
            except OSError:
                pass
while os.path.isdir(root):
    if os.getppid() != parent:
        for _ in range(5):
            for pid in list(ours()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.2)
        shutil.rmtree(root, ignore_errors=True)
        break
    time.sleep(0.5)
"""


def _start_reaper(root: Path, cluster_id: str) -> subprocess.Popen[bytes]:
    """A watchdog that cleans up after a pytest that died without running its fixtures' teardown."""
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    return subprocess.Popen(
        [sys.executable, "-c", _REAPER, str(os.getpid()), str(root), f"{MARKER}={cluster_id}"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


class _Cluster:
    kind = "cluster"

    def __init__(self) -> None:
        self.id = "t" + secrets.token_hex(4)
        ALL_CLUSTER_IDS.append(self.id)
        self.root: Path | None = None
        self.boot_s: float | None = None
        self._reaper: subprocess.Popen[bytes] | None = None
        self._stopped = False

    def _make_root(self) -> Path:
        self.root = Path(tempfile.mkdtemp(prefix=f"mi-{self.kind}-{self.id}-"))
        self._reaper = _start_reaper(self.root, self.id)
        return self.root

    def _popens(self) -> list[subprocess.Popen[bytes]]:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.boot()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def boot(self) -> None:
        raise NotImplementedError

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command) of every live process of this cluster."""
        return processes_of([self.id])

    def stop(self) -> None:
        """Kill -9 everything of this cluster, remove its folder; raise if anything is left."""
        if self._stopped:
            return
        self._stopped = True
        children = [proc for proc in self._popens() if proc.poll() is None]
        # The servers first (beam.smp under its sh wrapper, redis-server, epmd), so that the wrappers
        # reap them and exit, then whatever is left; our own children are waited for below.
        mine = {proc.pid for proc in children}
        for pid, _comm in self.processes():
            if pid not in mine:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        for proc in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
        _kill_marked(self.id)
        for proc in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        left = self.processes()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        if self._reaper is not None:
            try:
                self._reaper.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
                self._reaper.wait(timeout=5)
        if left:
            raise AssertionError(f"{self.kind} {self.id}: processes left after stop: {left}")
        if self.root is not None and self.root.exists():
            raise AssertionError(f"{self.kind} {self.id}: {self.root} left after stop")


# --- RabbitMQ ----------------------------------------------------------------------------------


def rabbit_sbin() -> Path | None:
    """The sbin folder of the installed RabbitMQ (scripts that run as the current user), or None."""
    found = sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server"))
    return Path(found[-1]).parent if found else None


@dataclass
class RabbitNode:
    index: int
    name: str
    amqp_port: int
    dist_port: int
    dir: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    running: bool = False
    killed_at: float | None = None
    history: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def pid_file(self) -> Path:
        return self.dir / "rabbit.pid"

    @property
    def log(self) -> Path:
        return self.dir / "log" / "rabbit.log"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"


class RabbitCluster(_Cluster):
    """``size`` RabbitMQ nodes on loopback, joined into one cluster; node ``i`` is ``nodes[i]``.

    Indexes are 0-based everywhere (``urls[i]``, ``kill(i)``, ``start(i)``); node ``i`` is named
    ``rabbit-<id>-<i+1>@localhost``.
    """

    kind = "rabbit"

    def __init__(self, size: int = 3, *, boot_timeout_s: float = 90) -> None:
        super().__init__()
        self.size = size
        self.boot_timeout_s = boot_timeout_s
        self.nodes: list[RabbitNode] = []
        self.epmd_port: int | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        sbin = rabbit_sbin()
        if sbin is None:
            raise RuntimeError("RabbitMQ is not installed (/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin)")
        self.sbin = sbin

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def names(self) -> list[str]:
        return [node.name for node in self.nodes]

    def _popens(self) -> list[subprocess.Popen[bytes]]:
        procs = [p for node in self.nodes for p in node.history]
        return procs + ([self._epmd] if self._epmd else [])

    def node(self, which: int | str) -> RabbitNode:
        if isinstance(which, str):
            return next(n for n in self.nodes if n.name == which)
        return self.nodes[which]

    # start-up

    def boot(self) -> None:
        t0 = time.monotonic()
        root = self._make_root()
        home = root / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text("".join(secrets.choice(string.ascii_uppercase) for _ in range(32)))
        cookie.chmod(0o400)
        ports = free_ports(1 + 2 * self.size)
        self.epmd_port = ports[0]
        base_env = _clean_env(self.id, HOME=str(home), ERL_EPMD_PORT=str(self.epmd_port))
        (root / "epmd.log").touch()
        self._epmd = _spawn(["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                            base_env, root / "epmd.log", root)
        _wait(lambda: self._epmd is not None and self._epmd.poll() is None and answers(self.epmd_port or 0),
              timeout_s=10, what=f"private epmd on :{self.epmd_port}")
        for i in range(self.size):
            self.nodes.append(self._make_node(i, ports[1 + 2 * i], ports[2 + 2 * i], base_env))
        for node in self.nodes:
            self._spawn_node(node)
        deadline = time.monotonic() + self.boot_timeout_s
        for node in self.nodes:
            self._wait_booted(node, deadline)
        # stop_app and start_app of the joining nodes in parallel (each CLI call is ~1 s of start-up),
        # join_cluster one node at a time.
        first, joining = self.nodes[0].name, [n.index for n in self.nodes[1:]]
        _parallel(lambda i: self.ctl(i, "stop_app"), joining)
        for i in joining:
            self.ctl(i, "join_cluster", first)
        _parallel(lambda i: self.ctl(i, "start_app"), joining)
        self.wait_ready(timeout_s=max(10.0, deadline - time.monotonic()))
        self.boot_s = record_timing(f"RabbitMQ {self.size}-node cluster start", time.monotonic() - t0)

    def _make_node(self, i: int, amqp_port: int, dist_port: int, base_env: dict[str, str]) -> RabbitNode:
        assert self.root is not None
        d = self.root / f"n{i + 1}"
        for sub in ("mnesia", "log", "conf.d", "plugins-expand"):
            (d / sub).mkdir(parents=True)
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{amqp_port}\n"
            "loopback_users.guest = true\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        (d / "advanced.config").write_text("[].\n")
        (d / "enabled_plugins").write_text("[].\n")
        (d / "rabbitmq-env.conf").write_text("# empty: keeps /etc/rabbitmq/rabbitmq-env.conf out\n")
        (d / "motd").write_text("")
        name = f"rabbit-{self.id}-{i + 1}@localhost"
        env = dict(base_env)
        env.update(
            RABBITMQ_NODENAME=name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(amqp_port),
            RABBITMQ_DIST_PORT=str(dist_port),
            RABBITMQ_CONF_ENV_FILE=str(d / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
            RABBITMQ_CONFIG_FILES=str(d / "conf.d"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(d / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
            RABBITMQ_BASE=str(d),
            RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
            RABBITMQ_MNESIA_DIR=str(d / "mnesia" / name),
            RABBITMQ_LOG_BASE=str(d / "log"),
            RABBITMQ_LOGS=str(d / "log" / "rabbit.log"),
            RABBITMQ_PID_FILE=str(d / "rabbit.pid"),
            RABBITMQ_FEATURE_FLAGS_FILE=str(d / "feature_flags"),
            RABBITMQ_PLUGINS_EXPAND_DIR=str(d / "plugins-expand"),
            RABBITMQ_MOTD_FILE=str(d / "motd"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return RabbitNode(i, name, amqp_port, dist_port, d, env)

    def _spawn_node(self, node: RabbitNode) -> None:
        node.pid_file.unlink(missing_ok=True)
        node.proc = _spawn([str(self.sbin / "rabbitmq-server")], node.env, node.console, node.dir)
        node.history.append(node.proc)
        node.running = True
        node.killed_at = None

    def _wait_booted(self, node: RabbitNode, deadline: float) -> None:
        while not answers(node.amqp_port):
            if node.proc is None or node.proc.poll() is not None:
                raise ClusterDied(f"{node.name} exited while booting:\n{_tail(node.console)}\n{_tail(node.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node.name} did not open :{node.amqp_port} in time:\n{_tail(node.log)}")
            time.sleep(0.1)

    # the CLI

    def ctl(self, which: int | str, *args: str, timeout_s: float = 60, check: bool = True,
            tool: str = "rabbitmqctl") -> str:
        """``rabbitmqctl -n <node> ARGS`` with this cluster's HOME/cookie/epmd; stdout."""
        node = self.node(which)
        done = subprocess.run([str(self.sbin / tool), "-n", node.name, *args], env=node.env, cwd=node.dir,
                              capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise RuntimeError(f"{tool} -n {node.name} {' '.join(args)}: exit {done.returncode}\n"
                               f"{done.stdout}\n{done.stderr}")
        return done.stdout

    def ctl_json(self, which: int | str, *args: str, timeout_s: float = 60, tool: str = "rabbitmqctl") -> Any:
        return json.loads(self.ctl(which, *args, "--formatter", "json", timeout_s=timeout_s, tool=tool))

    def running_nodes(self, which: int | str | None = None) -> list[str]:
        """The running nodes of the cluster as node ``which`` (default: the first running one) sees them."""
        asked = self.node(which) if which is not None else self._any_running()
        return list(self.ctl_json(asked.index, "cluster_status")["running_nodes"])

    def _any_running(self) -> RabbitNode:
        for node in self.nodes:
            if node.running:
                return node
        raise RuntimeError("no node of the cluster is running")

    def queues(self, which: int | str | None = None) -> list[dict[str, Any]]:
        """``list_queues name type leader members online`` (quorum queues fill the last three)."""
        asked = self.node(which) if which is not None else self._any_running()
        return list(self.ctl_json(asked.index, "list_queues", "name", "type", "leader", "members", "online"))

    def queue(self, name: str, which: int | str | None = None) -> dict[str, Any]:
        for q in self.queues(which):
            if q["name"] == name:
                return q
        raise KeyError(name)

    def leader_index(self, queue: str) -> int:
        leader = self.queue(queue)["leader"]
        return self.node(leader).index

    # faults

    def beam_pid(self, which: int | str) -> int:
        node = self.node(which)
        pid = int(node.pid_file.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        if comm != "beam.smp" or (pid, comm) not in self.processes():
            raise RuntimeError(f"pid {pid} in {node.pid_file} is not a beam.smp of this cluster ({comm})")
        return pid

    def kill(self, which: int | str) -> float:
        """kill -9 the beam.smp of a node (its RABBITMQ_PID_FILE); returns the monotonic time of the kill."""
        node = self.node(which)
        pid = self.beam_pid(node.index)
        os.kill(pid, signal.SIGKILL)
        node.killed_at = time.monotonic()
        node.running = False
        assert node.proc is not None
        node.proc.wait(timeout=15)  # the sh wrapper returns once its beam is gone
        _wait(lambda: not Path(f"/proc/{pid}/environ").exists() or not Path(f"/proc/{pid}/environ").read_bytes(),
              timeout_s=10, what=f"beam {pid} of {node.name} gone")
        return node.killed_at

    def start(self, which: int | str, timeout_s: float = 60) -> float:
        """Boot a killed node again and wait until it has rejoined; returns the seconds it took."""
        node = self.node(which)
        if node.running:
            raise RuntimeError(f"{node.name} is running")
        t0 = time.monotonic()
        self._spawn_node(node)
        self._wait_booted(node, t0 + timeout_s)
        self.wait_ready(timeout_s=max(5.0, t0 + timeout_s - time.monotonic()))
        return record_timing(f"RabbitMQ node {node.index} restart and rejoin", time.monotonic() - t0)

    def heal(self) -> None:
        """Start every killed node again and wait until the cluster is whole (cheap when it is)."""
        down = [n for n in self.nodes if not n.running]
        for node in down:
            self.start(node.index)
        if not down and not all(answers(n.amqp_port) for n in self.nodes):
            self.wait_ready()

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Until every node meant to run answers on AMQP and each of them lists all of them as running."""
        expected = sorted(n.name for n in self.nodes if n.running)

        def ready() -> bool:
            for node in self.nodes:
                if node.running and node.proc is not None and node.proc.poll() is not None:
                    raise ClusterDied(f"{node.name} exited:\n{_tail(node.console)}\n{_tail(node.log)}")
                if node.running and not answers(node.amqp_port):
                    return False
            views = _parallel(self.running_nodes, [n.index for n in self.nodes if n.running])
            return all(sorted(view) == expected for view in views)

        _wait(ready, timeout_s=timeout_s, what=f"RabbitMQ cluster {self.id} running {expected}", interval_s=0.5)


# --- Redis Cluster -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisNode:
    """One node as the cluster sees it now (``RedisCluster.nodes``); compare nodes by ``node_id``."""

    port: int
    node_id: str
    role: str  # "primary" or "replica"
    primary_id: str | None
    slots: tuple[tuple[int, int], ...]
    failed: bool = False
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def owns(self, slot: int) -> bool:
        return any(lo <= slot <= hi for lo, hi in self.slots)


def redis_command(port: int, *args: Any, timeout_s: float = 2.0, host: str = "127.0.0.1") -> Any:
    """One command on one node, on a fresh connection, with no response parsing."""
    conn = redis.Connection(host=host, port=port, decode_responses=True, socket_timeout=timeout_s,
                            socket_connect_timeout=timeout_s)
    try:
        conn.connect()
        conn.send_command(*args)
        return conn.read_response()
    finally:
        conn.disconnect()


def redis_commands(port: int, *commands: tuple[Any, ...], timeout_s: float = 2.0,
                   host: str = "127.0.0.1") -> list[Any]:
    """Several commands on one fresh connection (``READONLY`` then a read on a replica, say)."""
    conn = redis.Connection(host=host, port=port, decode_responses=True, socket_timeout=timeout_s,
                            socket_connect_timeout=timeout_s)
    try:
        conn.connect()
        replies = []
        for command in commands:
            conn.send_command(*command)
            replies.append(conn.read_response())
        return replies
    finally:
        conn.disconnect()


def _info(port: int, section: str) -> dict[str, str]:
    text = redis_command(port, "INFO", section)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


def _parse_nodes(text: str) -> list[RedisNode]:
    nodes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        node_id, address, flags = fields[0], fields[1], set(fields[2].split(","))
        port = int(address.split("@", 1)[0].rsplit(":", 1)[1] or 0)
        slots = []
        for item in fields[8:]:
            if item.startswith("["):
                continue  # a slot being migrated or imported
            lo, _, hi = item.partition("-")
            slots.append((int(lo), int(hi or lo)))
        nodes.append(RedisNode(
            port=port, node_id=node_id, role="primary" if "master" in flags else "replica",
            primary_id=None if fields[3] == "-" else fields[3], slots=tuple(sorted(slots)),
            failed=bool(flags & {"fail", "fail?", "noaddr"}),
        ))
    return sorted(nodes, key=lambda n: n.port)


class RedisCluster(_Cluster):
    """``primaries`` Redis primaries with ``replicas`` replicas each, as one Redis Cluster on loopback."""

    kind = "redis"

    def __init__(self, primaries: int = 3, replicas: int = 1, *, node_timeout_ms: int = 2000,
                 boot_timeout_s: float = 60) -> None:
        super().__init__()
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server / redis-cli are not installed")
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.boot_timeout_s = boot_timeout_s
        self.ports: list[int] = []
        self.bus_ports: dict[int, int] = {}
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._history: list[subprocess.Popen[bytes]] = []
        self._killed: dict[int, tuple[float, list[RedisNode]]] = {}  # port -> (when, topology then)

    def _popens(self) -> list[subprocess.Popen[bytes]]:
        return list(self._history)

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", port) for port in self.ports]

    def live_ports(self) -> list[int]:
        return [p for p in self.ports if p in self._procs and self._procs[p].poll() is None]

    def client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        """A redis-py cluster client knowing every node (close it)."""
        from redis.cluster import ClusterNode
        from redis.cluster import RedisCluster as Client

        nodes = [ClusterNode(host, port) for host, port in self.startup_nodes]
        kwargs.setdefault("decode_responses", True)
        kwargs.setdefault("socket_timeout", 2)
        kwargs.setdefault("socket_connect_timeout", 2)
        return Client(startup_nodes=nodes, **kwargs)

    # start-up

    def boot(self) -> None:
        t0 = time.monotonic()
        root = self._make_root()
        count = self.primaries * (1 + self.replicas)
        ports = free_ports(2 * count)
        self.ports = ports[:count]
        self.bus_ports = dict(zip(self.ports, ports[count:], strict=True))
        self._env = _clean_env(self.id)
        for port in self.ports:
            (root / str(port)).mkdir()
            self._spawn(port)
        deadline = time.monotonic() + self.boot_timeout_s
        for port in self.ports:
            _wait(lambda port=port: self._alive(port) and redis_command(port, "PING") == "PONG",
                  timeout_s=max(1.0, deadline - time.monotonic()), what=f"redis-server :{port}")
        done = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            env=self._env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
            raise RuntimeError(f"redis-cli --cluster create failed: exit {done.returncode}\n{done.stdout}\n{done.stderr}")
        self.wait_ready(timeout_s=max(10.0, deadline - time.monotonic()))
        self.boot_s = record_timing(f"Redis Cluster {self.primaries}+{self.primaries * self.replicas} start",
                                    time.monotonic() - t0)

    def _alive(self, port: int) -> bool:
        proc = self._procs.get(port)
        if proc is None or proc.poll() is not None:
            assert self.root is not None
            raise ClusterDied(f"redis-server :{port} is not running:\n{_tail(self.root / str(port) / 'redis.log')}")
        return True

    def _spawn(self, port: int) -> None:
        assert self.root is not None
        d = self.root / str(port)
        argv = [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
            "--cluster-config-file", str(d / "nodes.conf"), "--cluster-port", str(self.bus_ports[port]),
            "--cluster-node-timeout", str(self.node_timeout_ms), "--save", "", "--appendonly", "no",
            "--dir", str(d), "--logfile", str(d / "redis.log"), "--daemonize", "no",
            "--repl-diskless-sync-delay", "0", "--set-proc-title", "no", "--protected-mode", "yes",
        ]
        proc = _spawn(argv, self._env, d / "stdout.log", d)
        self._procs[port] = proc
        self._history.append(proc)

    # topology

    def view(self, port: int) -> list[RedisNode]:
        """The cluster as the node on ``port`` sees it."""
        return _parse_nodes(redis_command(port, "CLUSTER", "NODES"))

    @property
    def nodes(self) -> list[RedisNode]:
        """Every node as the first live node sees it now (roles change after a failover)."""
        for port in self.live_ports():
            with contextlib.suppress(redis.RedisError, OSError):
                return self.view(port)
        raise RuntimeError("no node of the Redis Cluster answers")

    def primaries_now(self) -> list[RedisNode]:
        return [n for n in self.nodes if n.role == "primary" and n.slots and not n.failed]

    def replicas_of(self, primary: RedisNode) -> list[RedisNode]:
        return [n for n in self.nodes if n.primary_id == primary.node_id]

    def primary_for(self, key: str | bytes) -> RedisNode:
        from redis.crc import key_slot

        slot = key_slot(key.encode() if isinstance(key, str) else key)
        for node in self.nodes:
            if node.role == "primary" and node.owns(slot) and not node.failed:
                return node
        raise LookupError(f"no live primary owns slot {slot}")

    def _signature(self, port: int, live: set[int]) -> tuple[Any, ...]:
        return tuple((n.node_id, n.port, n.role, n.primary_id, n.slots) for n in self.view(port) if n.port in live)

    def _ready(self) -> bool:
        live = set(self.live_ports())
        signatures = set()
        for port in live:
            cinfo = dict(line.split(":", 1) for line in redis_command(port, "CLUSTER", "INFO").splitlines() if ":" in line)
            if cinfo.get("cluster_state") != "ok" or cinfo.get("cluster_slots_assigned") != "16384":
                return False
            signatures.add(self._signature(port, live))
        if len(signatures) != 1:
            return False
        (signature,) = signatures
        primaries = [s for s in signature if s[2] == "primary" and s[4]]
        if len(primaries) != self.primaries or sum(hi - lo + 1 for p in primaries for lo, hi in p[4]) != 16384:
            return False
        for _node_id, port, role, _primary, _slots in signature:
            if role == "replica" and _info(port, "replication").get("master_link_status") != "up":
                return False
            if role == "primary" and _info(port, "replication").get("role") != "master":
                return False
        return True

    def wait_ready(self, timeout_s: float = 30) -> None:
        """Until every live node reports the same topology, every slot is served by one of the
        ``primaries`` live primaries, ``cluster_state:ok`` everywhere and every live replica's link is up."""
        _wait(self._ready, timeout_s=timeout_s, what=f"Redis Cluster {self.id} converged", interval_s=0.1)

    # faults

    def kill(self, node: RedisNode | int) -> float:
        """kill -9 one redis-server (a ``RedisNode`` or its port); returns the monotonic time of the kill."""
        port = node if isinstance(node, int) else node.port
        topology = self.nodes
        proc = self._procs[port]
        if (proc.pid, "redis-server") not in self.processes():
            raise RuntimeError(f"pid {proc.pid} is not a redis-server of this cluster")
        proc.send_signal(signal.SIGKILL)
        when = time.monotonic()
        proc.wait(timeout=10)
        self._killed[port] = (when, topology)
        return when

    def wait_failover(self, old_primary: RedisNode, timeout_s: float = 30) -> float:
        """Until a replica of the killed ``old_primary`` owns its slots in every live node's view and
        the cluster state is ok everywhere; returns the seconds since the kill."""
        when, topology = self._killed[old_primary.port]
        candidates = {n.node_id for n in topology if n.primary_id == old_primary.node_id}
        if not candidates or not old_primary.slots:
            raise ValueError(f"{old_primary.port} was not a primary with replicas when it was killed")
        slot = old_primary.slots[0][0]

        def promoted() -> bool:
            for port in self.live_ports():
                owner = [n for n in self.view(port) if n.role == "primary" and n.owns(slot) and not n.failed]
                if len(owner) != 1 or owner[0].node_id not in candidates:
                    return False
                cinfo = redis_command(port, "CLUSTER", "INFO")
                if "cluster_state:ok" not in cinfo:
                    return False
            return True

        _wait(promoted, timeout_s=timeout_s, what=f"failover of :{old_primary.port}", interval_s=0.05)
        return time.monotonic() - when

    def heal(self) -> None:
        """Start every killed node again and wait until the cluster has converged."""
        for port in self.ports:
            if port not in self.live_ports():
                self.start(port)
        self.wait_ready()

    def start(self, node: RedisNode | int, timeout_s: float = 30) -> float:
        """Start a killed node again (same port and nodes.conf: it rejoins, as a replica if it was failed
        over) and wait until the cluster has converged; returns the seconds it took."""
        port = node if isinstance(node, int) else node.port
        if port in self.live_ports():
            raise RuntimeError(f"redis-server :{port} is running")
        t0 = time.monotonic()
        self._spawn(port)
        self._killed.pop(port, None)
        self.wait_ready(timeout_s=timeout_s)
        return record_timing(f"Redis node :{port} restart and rejoin", time.monotonic() - t0)


@contextlib.contextmanager
def both() -> Iterator[tuple[RabbitCluster, RedisCluster]]:
    """Both clusters at once (for a quick manual check: ``python -m tests.support.clusters``)."""
    with RabbitCluster() as rabbit, RedisCluster() as redis_cluster:
        yield rabbit, redis_cluster


if __name__ == "__main__":
    with both() as (rabbit_cluster, redis_cluster_):
        print("rabbit:", rabbit_cluster.urls, rabbit_cluster.running_nodes())
        print("redis:", [(n.port, n.role) for n in redis_cluster_.nodes])
