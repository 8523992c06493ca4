"""Runs the fenced code blocks of a Markdown file by their markers (the
vocabulary is documented in tests/test_readme.py): parsing, fixtures,
sessions (a Python interpreter or a bash shell that a block and its
continuations share), placeholders, and the table of results."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KINDS = {"python", "bash", "file", "output", "skip"}
KEYS = {"fixture", "continues", "as", "ready", "why"}
FIXTURES = {
    "none": "a fresh, empty temporary folder of its own",
    "workdir": "the file's shared temporary working folder, with what earlier blocks left there",
    "clicks_csv": "workdir, holding my_job.py and clicks.csv as the walkthrough's blocks write them",
    "embedded_kafka": "HOST:PORT = librdkafka's embedded cluster (monolith_jax.stream.kafka.EmbeddedKafka)",
    "tansu_broker": "HOST:PORT = a tansu broker in its own process (tests/conftest.py's tansu_broker)",
    "serving_ps": "a serving PS on 127.0.0.1:50051 (the section's port) in its own process, serving model/",
    "predictor": "serving_ps, and a predictor on 127.0.0.1:50052 in its own process",
}
KAFKA = ("embedded_kafka", "tansu_broker")
FOLDERS = ("workdir", "clicks_csv")

BLOCK_TIMEOUT_S = 240.0   # one block, its ready lines included
READY_TIMEOUT_S = 150.0   # a background process's readiness line
STOP_TIMEOUT_S = 40.0     # background processes after SIGTERM, before SIGKILL

MARKER = re.compile(r"^\s*<!--\s*run:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
# Ports: the number after "127.0.0.1:" or "--port ": each a free port, the same within a section.
PORT = re.compile(r"(?<=127\.0\.0\.1:)\d{4,5}\b|(?<=--port )\d{4,5}\b")


class MarkerError(ValueError):
    pass


@dataclasses.dataclass
class Block:
    file: str        # relative to the repository
    line: int        # of the opening fence, 1-based
    lang: str
    body: str
    marker: str      # the text after "run:", or "" when there is none
    section: str     # the "## " heading it is under
    kind: str = ""
    opts: dict = dataclasses.field(default_factory=dict)
    errors: list = dataclasses.field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def fixtures(self) -> list:
        value = self.opts.get("fixture", "")
        return [f for f in value.split("+") if f] if isinstance(value, str) else []

    @property
    def background(self) -> bool:
        """A bash line ending in `&` (not `&&`)."""
        return self.kind == "bash" and any(re.search(r"(?<!&)&\s*(#.*)?$", l) for l in self.body.splitlines())


def parse_marker(text: str) -> tuple[str, dict]:
    """'bash, fixture=a+b, ready=x|y, why=free text, with commas' -> ('bash', {...}).
    `why=` is last and takes the rest of the marker."""
    why = None
    m = re.search(r"(?:^|,)\s*why=", text)
    if m:
        text, why = text[:m.start()], text[m.end():].strip()
    parts = [p.strip() for p in text.split(",")]
    kind, opts = parts[0], {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        key = key.strip()
        if key in opts:
            raise MarkerError(f"{key!r} given twice")
        opts[key] = value.strip() if eq else True
    if why is not None:
        opts["why"] = why
    return kind, opts


def extract(relpath: str) -> tuple[list, list]:
    """Every fenced block of the file, with its marker; and the errors of
    markers that precede no fence."""
    lines = open(os.path.join(ROOT, relpath), encoding="utf-8").read().split("\n")
    blocks, stray = [], []
    section, i = "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        m = FENCE.match(line)
        if m:
            indent, lang = m.group(1), m.group(2)
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            body = "\n".join(l[len(indent):] if l.startswith(indent) else l for l in lines[i + 1:j]) + "\n"
            prev = MARKER.match(lines[i - 1]) if i else None
            blocks.append(Block(relpath, i + 1, lang, body, prev.group(1) if prev else "", section))
            i = j + 1
            continue
        if MARKER.match(line) and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
            stray.append(f"{relpath}:{i + 1}: a run marker that no fenced block follows")
        i += 1
    return blocks, stray


def check(blocks: list) -> None:
    """Fills each block's kind/opts and its marker errors (missing, unknown
    kind, key or fixture, missing reason, a continuation with nothing to continue)."""
    seen_kinds = {}
    for b in blocks:
        if not b.marker:
            b.errors.append("no <!-- run: ... --> marker right before the fence")
            continue
        try:
            b.kind, b.opts = parse_marker(b.marker)
        except MarkerError as err:
            b.errors.append(str(err))
            continue
        if b.kind not in KINDS:
            b.errors.append(f"unknown kind {b.kind!r} (known: {', '.join(sorted(KINDS))})")
        for key, value in b.opts.items():
            if key not in KEYS:
                b.errors.append(f"unknown key {key!r} (known: {', '.join(sorted(KEYS))})")
            elif (value is True) != (key == "continues"):
                b.errors.append("continues takes no value" if key == "continues" else f"{key}= needs a value")
        for f in b.fixtures:
            if f not in FIXTURES:
                b.errors.append(f"unknown fixture {f!r} (known: {', '.join(FIXTURES)})")
        if b.kind == "skip" and not b.opts.get("why"):
            b.errors.append("skip needs why=REASON")
        if b.kind in ("python", "bash") and not b.opts.get("continues") and not b.fixtures:
            b.errors.append("python and bash blocks name their fixture (fixture=none for none)")
        if b.kind == "file" and not b.opts.get("as"):
            b.errors.append("file needs as=PATH")
        if b.opts.get("ready") and b.kind != "bash":
            b.errors.append("ready= is for bash blocks that start background processes")
        if b.opts.get("as") and b.kind not in ("python", "file"):
            b.errors.append("as= is for python and file blocks")
        if b.opts.get("continues"):
            prev = seen_kinds.get(b.kind)
            if b.kind not in ("python", "bash"):
                b.errors.append("only python and bash blocks continue")
            elif prev is None:
                b.errors.append(f"continues, but no {b.kind} block comes before it")
            elif b.kind == "bash" and prev.section != b.section:
                b.errors.append("a bash continuation stays in its section (its shell ends with it)")
            elif set(b.fixtures) & {"none", *FOLDERS}:
                b.errors.append("a continuation runs in its session's folder: name the folder on the first block")
        if b.kind in ("python", "bash", "file") and "HOST:PORT" in b.body:
            if not set(chain_fixtures(blocks, b)) & set(KAFKA):
                b.errors.append("HOST:PORT needs a Kafka fixture (embedded_kafka or tansu_broker)")
        if b.background and not b.opts.get("ready"):
            b.errors.append("a block that starts background processes (`&`) names their readiness lines (ready=)")
        if b.kind in ("python", "bash"):
            seen_kinds[b.kind] = b


def chain_head(blocks: list, block: Block) -> Block:
    """The block a continuation's session started with."""
    head = block
    k = blocks.index(block)
    while head.opts.get("continues"):
        k -= 1
        while k >= 0 and blocks[k].kind != head.kind:
            k -= 1
        if k < 0:
            return head
        head = blocks[k]
    return head


def chain_fixtures(blocks: list, block: Block) -> list:
    """The fixtures of a block and of the blocks whose session it continues."""
    names, k = list(block.fixtures), blocks.index(block)
    while block.opts.get("continues"):
        k -= 1
        while k >= 0 and blocks[k].kind != block.kind:
            k -= 1
        if k < 0:
            break
        block = blocks[k]
        names = block.fixtures + [n for n in names if n not in block.fixtures]
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# A Python session: blocks are exec'd, in order, in one namespace. Paths come
# on one pipe, "ok"/"error" goes back on another; output goes to the log.
DRIVER = r"""
import os, sys, traceback
cmd, res = os.fdopen(int(sys.argv[1]), "r"), os.fdopen(int(sys.argv[2]), "w")
ns = {"__name__": "__main__", "__builtins__": __builtins__}
for path in cmd:
    path = path.strip()
    try:
        exec(compile(open(path, encoding="utf-8").read(), path, "exec"), ns)
        status = "ok"
    except BaseException:
        traceback.print_exc()
        status = "error"
    sys.stdout.flush(); sys.stderr.flush()
    res.write(status + "\n"); res.flush()
"""


class Session:
    """A Python interpreter or a bash -e shell in its own process group
    (so that it and whatever it starts in the background stop together),
    fed one block at a time."""

    def __init__(self, kind: str, cwd: str, env: dict, name: str, cancel: threading.Event):
        self.kind, self.cwd, self.name, self.cancel = kind, cwd, name, cancel
        self.log_path = os.path.join(cwd, f".readme-{name}.log")
        self.log = open(self.log_path, "ab")
        self.background = False
        self.blocks = 0
        self.cmd = self.res = None
        if kind == "python":
            cmd_r, self.cmd = os.pipe()
            self.res, res_w = os.pipe()
            self.proc = subprocess.Popen([sys.executable, "-u", "-c", DRIVER, str(cmd_r), str(res_w)], cwd=cwd,
                                         env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                         pass_fds=(cmd_r, res_w), start_new_session=True)
            os.close(cmd_r)
            os.close(res_w)
        else:
            self.proc = subprocess.Popen(["bash", "-e"], cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=self.log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def output(self, start: int = 0) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(start)
            return f.read().decode("utf-8", "replace")

    def offset(self) -> int:
        self.log.flush()
        return os.path.getsize(self.log_path)

    def run(self, code: str, deadline: float) -> tuple[bool, str]:
        """Runs one block; (passed, why not)."""
        self.blocks += 1
        path = os.path.join(self.cwd, f".readme-{self.name}-{self.blocks}" + (".py" if self.kind == "python" else ".sh"))
        with open(path, "w", encoding="utf-8") as f:
            f.write(code)
        if self.kind == "python":
            os.write(self.cmd, (path + "\n").encode())
            while time.monotonic() < deadline and not self.cancel.is_set():
                ready, _, _ = select.select([self.res], [], [], 0.5)
                if ready:
                    status = os.read(self.res, 64).decode().strip()
                    return (status == "ok"), ("" if status == "ok" else "raised (its traceback is in its output)")
                if self.proc.poll() is not None:
                    return False, f"the interpreter exited with {self.proc.returncode}"
            return False, "cancelled" if self.cancel.is_set() else "timed out"
        # bash -e: a failing command exits the shell; its background jobs read nothing.
        token = f"readme-block-{self.blocks}-done\n"
        start = self.offset()
        self.proc.stdin.write(f"source {path} </dev/null\necho {token}".encode())
        self.proc.stdin.flush()
        while time.monotonic() < deadline and not self.cancel.is_set():
            if token in self.output(start):
                return True, ""
            if self.proc.poll() is not None:
                return False, f"bash -e exited with {self.proc.returncode}"
            time.sleep(0.2)
        return False, "cancelled" if self.cancel.is_set() else "timed out"

    def wait_for(self, start: int, texts: list, timeout_s: float) -> tuple[bool, str]:
        """Until each text is in the output after `start`."""
        deadline = time.monotonic() + timeout_s
        while True:
            out = self.output(start)
            missing = [t for t in texts if t not in out]
            if not missing:
                return True, ""
            if self.proc.poll() is not None:
                return False, f"the shell exited with {self.proc.returncode} before printing: " + " | ".join(missing)
            if time.monotonic() > deadline or self.cancel.is_set():
                return False, f"not printed in {timeout_s:.0f} s: " + " | ".join(missing)
            time.sleep(0.3)

    def begin_stop(self) -> None:
        """Background jobs get SIGTERM one at a time, in the order they
        started, each waited for (a trainer's last push finds its serving PS
        still up); a Python session's loop ends."""
        if self.proc.poll() is not None:
            return
        try:
            if self.kind == "bash":
                self.proc.stdin.write(b"for j in $(jobs -p); do kill -TERM $j 2>/dev/null || true; "
                                      b"wait $j || true; done\nexit 0\n")
                self.proc.stdin.close()
            elif self.cmd is not None:
                os.close(self.cmd)
                self.cmd = None
        except OSError:
            pass

    def finish_stop(self) -> None:
        """After at most STOP_TIMEOUT_S, SIGKILL to whatever is left in the group."""
        if self.log.closed:
            return
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            for fd in (self.cmd, self.res):
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self.cmd = self.res = None
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
            self.log.close()

    def stop(self) -> None:
        self.begin_stop()
        self.finish_stop()


@dataclasses.dataclass
class Result:
    block: Block
    status: str = ""       # ok, FAIL, skip, output, marker
    seconds: float = 0.0
    detail: str = ""
    output: str = ""


class FileRun:
    """One Markdown file's blocks, run in order. Background processes end
    with their section: they are sent SIGTERM there and waited for on a
    thread of their own while the next section runs."""

    def __init__(self, relpath: str, tmp_root: str):
        self.relpath = relpath
        self.blocks, self.stray = extract(relpath)
        check(self.blocks)
        self.tmp_root = tmp_root
        self.workdir = os.path.join(tmp_root, "work")
        os.makedirs(self.workdir, exist_ok=True)
        bin_dir = os.path.dirname(sys.executable)
        assert shutil.which("monolith", path=bin_dir), f"no monolith console script in {bin_dir}"
        # TMPDIR: the run folders that the demo and the cluster launcher make
        # (tempfile.mkdtemp) go with this run's temporary folder.
        os.makedirs(os.path.join(tmp_root, "tmp"), exist_ok=True)
        self.env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                    "PYTHONPATH": ROOT, "MPLBACKEND": "Agg", "TMPDIR": os.path.join(tmp_root, "tmp")}
        self.env.pop("MONOLITH_KAFKA_CONFIG", None)
        self.cancel = threading.Event()
        self.results: list = []
        self.seconds = self.close_seconds = 0.0
        self.sessions: dict = {}          # id(head block) -> Session
        self.broken: set = set()          # id(head block) of sessions whose block failed
        self.section_sessions: list = []  # sessions with background processes that end with the section
        self.fixture_sessions: list = []  # the section's fixture servers: stopped after those
        self.stoppers: list = []          # threads waiting for a section's processes to stop
        self.section = None
        self.ports: dict = {}
        self._kafka: dict = {}
        self._closers: list = []
        self._n = 0

    # ------------------------------------------------------------ fixtures
    def bootstrap(self, kind: str) -> str:
        if kind not in self._kafka:
            from monolith_jax.stream import kafka as K

            if kind == "embedded_kafka":
                cluster = K.EmbeddedKafka()
                self._closers.append(cluster.close)
                address = cluster.bootstrap
            else:
                from monolith_jax.stream.broker import BrokerProcess

                broker = BrokerProcess()
                address = broker.__enter__()
                self._closers.append(broker.__exit__)
            K.ensure_topics(address, {t: 2 for t in K.TOPICS.values()})
            self._kafka[kind] = address
        return self._kafka[kind]

    def port(self, literal: str) -> str:
        if literal not in self.ports:
            self.ports[literal] = str(free_port())
        return self.ports[literal]

    def fill(self, text: str, block: Block) -> str:
        """The documented placeholders: the ports, then HOST:PORT (whose port stays)."""
        text = PORT.sub(lambda m: self.port(m.group(0)), text)
        kafka = [f for f in chain_fixtures(self.blocks, block) if f in KAFKA]
        if kafka:
            text = text.replace("HOST:PORT", self.bootstrap(kafka[0]))
        return text

    def folder(self, block: Block) -> str:
        head = chain_head(self.blocks, block)
        if set(head.fixtures) & set(FOLDERS) or head.kind == "file":
            return self.workdir
        path = os.path.join(self.tmp_root, f"block-{head.line}")
        os.makedirs(path, exist_ok=True)
        return path

    def fixtures(self, block: Block) -> list:
        """Sets up the block's fixtures; what was started for it."""
        names, started = chain_fixtures(self.blocks, block), []
        if "clicks_csv" in names:
            missing = [n for n in ("my_job.py", "clicks.csv") if not os.path.exists(os.path.join(self.workdir, n))]
            if missing:
                raise RuntimeError(f"clicks_csv: {', '.join(missing)} missing (the walkthrough's blocks that "
                                   "write them did not run, or failed)")
        for kind in KAFKA:
            if kind in names and kind not in self._kafka:
                self.bootstrap(kind)
                started.append(kind)
        if "serving_ps" in names or "predictor" in names:
            ps = self.port("50051")
            started += self.server(ps, ["monolith", "serving-ps", "--model", "model/", "--snapshot-dir", "snaps/",
                                        "--port", ps])
            if "predictor" in names:
                pred = self.port("50052")
                started += self.server(pred, ["monolith", "predictor", "--model", "model/", "--serving-ps",
                                              f"127.0.0.1:{ps}", "--port", pred])
        return started

    def server(self, port: str, argv: list) -> list:
        """A server of the fixture, unless a block of the section already serves the port."""
        if port_open(int(port)):
            return []
        self._n += 1
        s = Session("bash", self.workdir, self.env, f"fixture-{self._n}", self.cancel)
        self.fixture_sessions.append(s)
        start = s.offset()
        ok, why = s.run(" ".join(argv) + " &\n", time.monotonic() + 30)
        if ok:
            ok, why = s.wait_for(start, ["listening on"], READY_TIMEOUT_S)
        if not ok:
            raise RuntimeError(f"fixture server {' '.join(argv)}: {why}\n{s.output(start)[-3000:]}")
        return [argv[1]]

    # ---------------------------------------------------------------- run
    def stop_later(self, sessions: list) -> None:
        """Stops the sessions one after the other, on a thread, while the run goes on."""
        def stop():
            for s in sessions:
                s.stop()
        if sessions:
            stopper = threading.Thread(target=stop, daemon=True)
            stopper.start()
            self.stoppers.append(stopper)

    def end_section(self) -> None:
        """The section's processes, the blocks' first (in the order they
        started), then the fixtures' servers they may still talk to."""
        sessions = self.section_sessions + self.fixture_sessions
        self.section_sessions, self.fixture_sessions = [], []
        self.stop_later(sessions)
        self.ports = {}

    def close(self) -> None:
        """Stops everything, each part even when stopping another one fails
        (or is interrupted); the first such error is raised at the end."""
        first = None
        sessions = list(self.sessions.values()) + self.section_sessions + self.fixture_sessions
        self.sessions, self.section_sessions, self.fixture_sessions = {}, [], []
        for stop in [s.stop for s in sessions] + [lambda: [t.join() for t in self.stoppers]] \
                + self._closers[::-1]:
            try:
                stop()
            except BaseException as err:  # noqa: BLE001 - the rest must stop too
                first = first or err
        self._closers = []
        if first is not None:
            raise first

    def last_of_chain(self, block: Block) -> bool:
        k = self.blocks.index(block)
        for later in self.blocks[k + 1:]:
            if later.kind == block.kind:
                return not later.opts.get("continues")
        return True

    def run(self) -> list:
        t0 = time.monotonic()
        try:
            for b in self.blocks:
                if b.section != self.section:
                    self.end_section()
                    self.section = b.section
                r = Result(b)
                t1 = time.monotonic()
                if self.cancel.is_set():
                    r.status, r.detail = "FAIL", "cancelled"
                else:
                    try:
                        self.run_block(b, r)
                    except Exception as err:  # a fixture or a file block that failed
                        r.status, r.detail = "FAIL", f"{type(err).__name__}: {err}"
                r.seconds = time.monotonic() - t1
                self.results.append(r)
        finally:
            t1 = time.monotonic()
            self.close()
            self.close_seconds = time.monotonic() - t1
            self.seconds = time.monotonic() - t0
        return self.results

    def run_block(self, b: Block, r: Result) -> None:
        if b.errors:
            r.status, r.detail = "marker", "; ".join(b.errors)
            return
        if b.kind in ("skip", "output"):
            r.status, r.detail = b.kind, b.opts.get("why", "not code")
            return
        head = chain_head(self.blocks, b)
        if id(head) in self.broken:
            r.status, r.detail = "FAIL", f"the block it continues ({head.where}) failed"
            return
        started = self.fixtures(b)
        code = self.fill(b.body, b)
        cwd = self.folder(b)
        if b.opts.get("as"):
            with open(os.path.join(cwd, b.opts["as"]), "w", encoding="utf-8") as f:
                f.write(code)
        if b.kind == "file":
            if b.lang == "json":
                json.loads(code)
            r.status = "ok"
            r.detail = "; ".join([f"written to {b.opts['as']}" + (", parsed" if b.lang == "json" else "")]
                                 + (["started " + " and ".join(started)] if started else []))
            return
        s = self.sessions.get(id(head))
        notes = [f"in {head.where}'s session"] if s is not None else []
        if s is None:
            s = Session(b.kind, cwd, self.env, f"{b.kind}-{b.line}", self.cancel)
            self.sessions[id(head)] = s
        if b.opts.get("as"):
            notes.append(f"written to {b.opts['as']}")
        if started:
            notes.append("started " + " and ".join(started))
        start = s.offset()
        ok, why = s.run(code, time.monotonic() + BLOCK_TIMEOUT_S)
        texts = [t for t in str(b.opts.get("ready", "")).split("|") if t]
        if ok and texts:
            ok, why = s.wait_for(start, texts, READY_TIMEOUT_S)
            if ok:
                why = "printed: " + " | ".join(texts) + "; SIGTERM at the section's end"
        r.output = s.output(start)
        r.status, r.detail = ("ok" if ok else "FAIL"), "; ".join(notes + ([why] if why else []))
        s.background = s.background or b.background
        if not ok:
            self.broken.add(id(head))
        if self.last_of_chain(b) or not ok:
            del self.sessions[id(head)]
            if s.background and s.proc.poll() is None:
                self.section_sessions.append(s)
            else:
                self.stop_later([s])


def table(results: list) -> str:
    rows = [("file:line", "marker", "result", "s", "detail")]
    for r in results:
        marker = r.block.marker or "(none)"
        rows.append((r.block.where, marker if len(marker) <= 70 else marker[:67] + "...", r.status,
                     f"{r.seconds:.1f}", r.detail.replace("\n", " ")[:110]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in rows)
