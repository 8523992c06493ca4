"""The `runs` fixture: an experiment's run folders go under a temporary
folder, and the committed results of every experiment are checked byte for
byte (and mtime for mtime) unchanged when the test ends."""

import hashlib
import pathlib

import pytest

from experiments import run_folder

EXPERIMENTS = pathlib.Path(run_folder.__file__).resolve().parent


def committed_results() -> dict:
    """Every file under every experiment's results/ folder: path -> (size, mtime_ns, sha256)."""
    state = {}
    for path in sorted(EXPERIMENTS.glob("*/results/**/*")):
        if path.is_file():
            st = path.stat()
            state[str(path.relative_to(EXPERIMENTS))] = (st.st_size, st.st_mtime_ns,
                                                        hashlib.sha256(path.read_bytes()).hexdigest())
    return state


class Runs:
    def __init__(self, root: pathlib.Path):
        self.root = root

    def folders(self) -> list:
        return sorted(self.root.iterdir()) if self.root.exists() else []

    def folder(self, experiment: str, printed: str) -> pathlib.Path:
        """The one run folder the run made; it printed where it is."""
        (folder,) = [p for p in self.folders() if p.name.startswith(experiment + "-")]
        assert str(folder) in printed, f"{folder} not printed"
        return folder


@pytest.fixture
def runs(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv(run_folder.RUNS_ENV, str(root))
    before = committed_results()
    assert before, "no committed results found"
    yield Runs(root)
    after = committed_results()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"committed results changed: {changed}"
