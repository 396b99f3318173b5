"""The workspace the bad-input and run-folder tests share: a sound synthetic cache and a
finished ``sasa train`` run on it, plus the snapshot that proves a command changed nothing."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import NamedTuple

from sasa.cli import main

TRAIN = ["--hookpoint", "synthetic", "--groups", "8", "--rank", "2", "--top-s", "2",
         "--batch-size", "256", "--device", "cpu", "--log-every", "2", "--checkpoint-every", "4"]
TOKENS = ["--tokens", "2048"]

class Workspace(NamedTuple):
    root: Path
    cache: Path
    """A sound synthetic cache (4 shards of 512 rows, d=16)."""
    run: Path
    """A finished `sasa train` run on it: 8 steps, one SASA SAE."""

    @property
    def sae(self) -> Path:
        return next(p for p in self.run.iterdir() if (p / "config.json").is_file())

    def copy(self, src: Path, name: str) -> Path:
        dst = self.root / "cases" / name
        shutil.copytree(src, dst)
        return dst

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.root / "cases" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` -> a hash of its bytes ('dir' for folders)."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}



def make_workspace(root: Path) -> Workspace:
    from sasa.analysis.synth import write_synthetic_cache
    from sasa.analysis.synthetic import SyntheticSpec

    cache, run = root / "cache", root / "run"
    write_synthetic_cache(str(cache), spec=SyntheticSpec(d=16, features_per_dim={1: 4, 2: 2}),
                          n_tokens=2048, ctx_len=16, shard_seqs=32, progress=False)
    assert main(["train", "--cache", str(cache), *TRAIN, *TOKENS, "--out", str(run)]) == 0
    return Workspace(root, cache, run)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err
