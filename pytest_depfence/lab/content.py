"""What the lab hosts serve: fake GitHub's git repository and release, the mirror, the API.

The git repository is built with the real ``git`` (bare, dumb-HTTP ready) and
the release archive is byte-stable, so tests can compare what clients fetched.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

from .errors import LabError
from .hosts import LabHost
from .http import _Route

RELEASE_TAG = "v1.2.3"
GIT_REPO_PATH = "/org/tool.git"


def _make_tool_archive() -> bytes:
    """A tiny, byte-stable release archive: tool/bin/tool prints its version."""
    script = f"#!/bin/sh\necho tool {RELEASE_TAG}\n".encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("tool/bin/tool")
        info.size, info.mode, info.mtime = len(script), 0o755, 0
        tar.addfile(info, io.BytesIO(script))
    return gzip.compress(raw.getvalue(), mtime=0)


def _make_git_repo(root: Path) -> Path:
    """A bare repository with one commit and a tag, prepared for dumb HTTP."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(root),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": "Lab",
        "GIT_AUTHOR_EMAIL": "lab@mirror.internal",
        "GIT_COMMITTER_NAME": "Lab",
        "GIT_COMMITTER_EMAIL": "lab@mirror.internal",
        "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
        "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z",
    }
    work, bare = root / "tool", root / "tool.git"

    def git(*args: str) -> None:
        try:
            subprocess.run(
                ["git", *args], env=env, check=True, capture_output=True, stdin=subprocess.DEVNULL
            )
        except FileNotFoundError as exc:
            raise LabError("the lab needs the `git` command (apt-get install git)") from exc
        except subprocess.CalledProcessError as exc:
            raise LabError(
                f"git {' '.join(args)} failed: {exc.stderr.decode(errors='replace')}"
            ) from exc

    git("init", "-q", "-b", "main", str(work))
    (work / "README").write_text("tool: served by the depfence lab\n")
    git("-C", str(work), "add", "README")
    git("-C", str(work), "commit", "-q", "-m", "tool")
    git("-C", str(work), "tag", RELEASE_TAG)
    git("clone", "-q", "--bare", str(work), str(bare))
    git("-C", str(bare), "update-server-info")
    return bare


def _site(host: LabHost, repo: Path, archive: bytes) -> tuple[dict[str, _Route], dict[str, Path]]:
    """What `host` serves over HTTP: exact paths, and static trees by path prefix."""
    index = f"lab:{host.name}\n".encode()
    routes: dict[str, _Route] = {"/": lambda: (200, "text/plain", index)}
    static: dict[str, Path] = {}
    if host.name == "github.com":
        static[GIT_REPO_PATH] = repo.resolve()
        routes["/org/tool/releases/latest/download/tool.tgz"] = lambda: (
            200,
            "application/gzip",
            archive,
        )
    elif host.name == "api.github.com":
        release = json.dumps({"tag_name": RELEASE_TAG}).encode() + b"\n"
        routes["/repos/org/tool/releases/latest"] = lambda: (200, "application/json", release)
    elif host.name == "mirror.internal":
        routes["/tool.tgz"] = lambda: (200, "application/gzip", archive)
    return routes, static
