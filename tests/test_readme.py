"""Every fenced code block of README.md and experiments/README.md, run as
written (tests/readme_blocks.py does the work), from a CSV file to a served
prediction, online through Kafka, the servers, snapshots, the cluster and
the experiments' short variants.

Each fenced block has a marker on the line right before its fence:

    <!-- run: KIND[, KEY=VALUE | , FLAG]... -->

KIND
  python   run by this venv's Python in a subprocess (the repository on
           PYTHONPATH), in the block's folder
  bash     run by `bash -e` in the block's folder, with this venv's bin/
           first on PATH (`monolith`, `python`) and the repository on
           PYTHONPATH (as if run from the repository root)
  file     not a program: its text is written to `as=PATH` in the shared
           working folder (a json block must parse)
  output   not code (program output, a diagram): not run
  skip     not run; `why=` says why and what runs instead

KEYS
  fixture=A+B+...   what the block needs (python and bash blocks name at
                    least one; `none` for none):
      none            a fresh, empty temporary folder of its own
      workdir         the file's shared temporary working folder, with
                      what earlier blocks left there
      clicks_csv      workdir, holding my_job.py and clicks.csv as the
                      walkthrough's blocks write them (checked)
      embedded_kafka  HOST:PORT is librdkafka's embedded cluster
                      (monolith_jax.stream.kafka.EmbeddedKafka), one for the file
      tansu_broker    HOST:PORT is a tansu broker in its own process
                      (monolith_jax.stream.broker.BrokerProcess, as
                      tests/conftest.py's tansu_broker), one for the file
      serving_ps      a serving PS on 127.0.0.1:50051 (the section's port)
                      in its own process, serving workdir's model/ and
                      snaps/; started by the test unless a block of the
                      section already serves that port
      predictor       serving_ps, and a predictor on 127.0.0.1:50052, likewise
  continues         runs in the session of the previous block of the same
                    kind: the same Python namespace, or the same shell (and
                    folder); it may add Kafka and server fixtures. A bash
                    continuation stays in its section.
  as=PATH           python: also written to PATH in its folder (then run);
                    file: where the text goes
  ready=T1|T2|...   a bash block that starts background processes (`cmd &`;
                    required there): after its script returns, each text
                    must appear in its output within 150 s. The processes
                    then run on until the end of the section (`## ` heading),
                    when they get SIGTERM one at a time in the order they
                    started, the fixtures' servers last (SIGKILL 40 s later).
  why=REASON        last, takes the rest of the marker (commas included)

Each block runs once, in file order, bounded (240 s a block); a block
that fails fails the blocks that continue it. Child processes get their
own TMPDIR under the test's temporary folder (the demo's and the cluster
launcher's run folders). The two files run side by side, each in its own
temporary folders.

Placeholders, the only text substituted: HOST:PORT (the block's Kafka
fixture), and ports: the number after `127.0.0.1:` or `--port ` becomes a
free loopback port, the same number the same port within a section, a new
one in the next section.

A block without a marker, an unknown kind, key or fixture, a skip without
a reason, and a marker that precedes no fence fail the test. The test
prints a table of every block (file, line, marker, result, seconds, what
was done) with -s, and on failure.
"""

import concurrent.futures
import os
import pathlib
import re

import pytest

from tests import readme_blocks as rb

ROOT = rb.ROOT
FILES = ["README.md", "experiments/README.md"]
SECTION = "## Your own model"
RESULTS: list = []


def walkthrough(section_title: str = SECTION) -> tuple[list, str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index(section_title)
    end = text.find("\n## ", start + len(section_title))
    section = text[start:end if end > 0 else None]
    return re.findall(r"```(python|bash)\n(.*?)```", section, flags=re.S), section


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    if RESULTS:
        print("\n\nEvery fenced block of " + " and ".join(FILES) + ":\n" + rb.table(RESULTS), flush=True)


@pytest.fixture(scope="module")
def file_runs(request, tmp_path_factory):
    """The selected files' runs, started together: README.md mostly waits
    (on servers, streams and idle timeouts) while the experiments compute.
    Each test takes its file's run."""
    wanted = [item.callspec.params["path"] for item in request.session.items
              if getattr(item, "originalname", "") == "test_every_block_runs"]
    runs = {path: rb.FileRun(path, str(tmp_path_factory.mktemp(path.replace("/", "_").replace(".", "_"))))
            for path in FILES if path in wanted}
    pool = concurrent.futures.ThreadPoolExecutor(max(len(runs), 1))
    futures = {path: pool.submit(run.run) for path, run in runs.items()}
    try:
        yield {path: (runs[path], futures[path]) for path in runs}
    finally:
        for run in runs.values():
            run.cancel.set()
        pool.shutdown(wait=True)


def test_every_block_has_a_known_marker():
    problems = []
    for path in FILES:
        blocks, stray = rb.extract(path)
        rb.check(blocks)
        assert blocks or path != "README.md"
        problems += stray + [f"{b.where} ({b.marker or 'no marker'}): {'; '.join(b.errors)}"
                             for b in blocks if b.errors]
    assert not problems, "README blocks whose markers are missing or wrong:\n" + "\n".join(problems)


def test_a_marker_naming_an_unknown_fixture_fails(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("## A\n\n<!-- run: bash, fixture=kafkaa -->\n```bash\ntrue\n```\n\n```python\npass\n```\n"
                  "<!-- run: skip -->\n```bash\nfalse\n```\n<!-- run: python, fixture=none -->\n\ntext\n")
    blocks, stray = rb.extract(os.path.relpath(md, rb.ROOT))
    rb.check(blocks)
    assert "unknown fixture 'kafkaa'" in blocks[0].errors[0]
    assert blocks[1].errors == ["no <!-- run: ... --> marker right before the fence"]
    assert blocks[2].errors == ["skip needs why=REASON"]
    assert len(stray) == 1 and stray[0].endswith(":15: a run marker that no fenced block follows")
    assert rb.parse_marker("skip, why=a, b, c=d") == ("skip", {"why": "a, b, c=d"})


def test_the_walkthrough_has_a_job_file_commands_and_a_client():
    blocks, section = walkthrough()
    kinds = [k for k, _ in blocks]
    assert kinds.count("bash") >= 2 and kinds.count("python") >= 3
    assert blocks[0][1].startswith("# my_job.py")
    assert "monolith demo --job my_job:job --data clicks.csv" in section


def output_of(results, pick) -> str:
    found = [r for r in results if pick(r.block.body)]
    assert found, "no such block"
    return found[0].output


@pytest.mark.parametrize("path", FILES)
def test_every_block_runs(path, file_runs):
    run, future = file_runs[path]
    results = future.result()
    RESULTS.extend(results)
    print(f"\n{path}: {run.seconds:.0f} s beside the other file's run, the last {run.close_seconds:.0f} s "
          "stopping what was left running:\n" + rb.table(results), flush=True)
    failed = [r for r in results if r.status in ("FAIL", "marker")]
    assert not failed, "\n\n".join(
        f"{r.block.where} [{r.block.marker}] {r.status}: {r.detail}\n--- block:\n{r.block.body}"
        f"--- output (last 4000 characters):\n{r.output[-4000:]}" for r in failed) + "\n\n" + rb.table(results)
    assert all(r.status in ("ok", "skip", "output") for r in results)
    if path != "README.md":
        return
    # What the walkthrough's blocks print, besides running.
    work = pathlib.Path(run.workdir)
    assert (work / "clicks.csv").exists() and (work / "model" / "spec.json").exists()
    printed = output_of(results, lambda body: "PredictorClient" in body)
    probs = [float(x) for x in re.findall(r"[0-9.]+(?:e-?\d+)?", printed)]
    assert len(probs) == 2 and all(0.0 < p < 1.0 for p in probs), printed
    assert "trainer done" in output_of(results, lambda body: body.startswith("monolith train") and "--data" in body)
    online = output_of(results, lambda body: body.startswith("monolith replay"))
    assert "joiner done" in online and "trainer done" in online, online[-3000:]
    fit = output_of(results, lambda body: "trainer.fit(" in body)
    aucs = [float(x) for x in fit.split()[-2:]]
    assert all(0.6 < a < 1.0 for a in aucs), fit[-3000:]
