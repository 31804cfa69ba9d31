"""The README's examples are tests: every ```bash, ```sh and ```python block runs, in order, against a real
server.

The README's examples address the server ``make serve`` starts (``localhost:8080``, the embedded default
backbone with its demo domain). Here ``ragadapt serve`` runs the same on a free port; URLs naming
``localhost:8080`` or ``127.0.0.1:8080`` are rewritten to it, and ``RAGADAPT_URL`` / ``RAGADAPT_ADMIN_TOKEN``
point the SDK and shell examples at it. Shell blocks run with ``bash -euo pipefail`` (``sh -e`` for ``sh``)
from the repository root with the virtualenv first on ``PATH``; Python blocks run with ``exec`` in one
namespace shared by all of them, so a later block can use what an earlier one defined. A block preceded by
``<!-- not-tested: reason -->`` is skipped with that reason (for what cannot run here, such as ``docker
compose``).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LANGUAGES = {"bash": ["bash", "-euo", "pipefail", "-c"], "sh": ["sh", "-e", "-c"], "python": None}
DEFAULT_ADDRESS = re.compile(r"\b(?:localhost|127\.0\.0\.1):8080\b")
ADMIN_TOKEN = "readme-admin-token"
BLOCK_TIMEOUT_S = 600
# Set for the examples' processes: a README example that runs the test suite (``make test``) must not run the
# README's examples again inside itself.
NESTED = "RAGADAPT_INSIDE_README_EXAMPLE"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")
_MARKER = re.compile(r"^\s*<!--\s*not-tested(?::\s*(?P<reason>.*?))?\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    skip: str | None = None  # the reason given by a not-tested marker

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.lang}"


def extract_blocks(markdown: str, source: str = "README.md") -> list[Block]:
    """The fenced bash, sh and python blocks, in order. A ``<!-- not-tested: reason -->`` line marks the next
    block if only blank lines stand between them; a marker without a reason is an error."""
    lines = markdown.splitlines()
    blocks: list[Block] = []
    pending: str | None = None
    number = 0
    while number < len(lines):
        line = lines[number]
        marker = _MARKER.match(line)
        fence = _FENCE.match(line)
        if marker:
            if not (marker.group("reason") or "").strip():
                raise ValueError(f"{source}:{number + 1}: a not-tested marker needs a reason")
            pending = marker.group("reason").strip()
        elif fence:
            indent, opening = fence.group("indent"), fence.group("fence")
            lang = fence.group("info").split()[0].lower() if fence.group("info") else ""
            body: list[str] = []
            end = number + 1
            while end < len(lines):
                closing = _FENCE.match(lines[end])
                if (
                    closing
                    and closing.group("fence")[0] == opening[0]
                    and len(closing.group("fence")) >= len(opening)
                    and not closing.group("info")
                ):
                    break
                text = lines[end]
                body.append(text[len(indent) :] if text.startswith(indent) else text.lstrip())
                end += 1
            else:
                raise ValueError(f"{source}:{number + 1}: the code block is never closed")
            if lang in LANGUAGES:
                blocks.append(Block(lang, "\n".join(body) + "\n", number + 1, pending))
            elif pending is not None:
                raise ValueError(
                    f"{source}:{number + 1}: a not-tested marker on a {lang or 'plain'} block, "
                    "which is never run anyway"
                )
            pending = None
            number = end
        elif line.strip():
            pending = None
        number += 1
    return blocks


def run_block(block: Block, url: str, env: dict[str, str], namespace: dict, cwd: Path) -> None:
    """Run one block against the server at ``url``; fails the test with the block's output if it fails."""
    address = url.split("://", 1)[1]
    code = DEFAULT_ADDRESS.sub(address, block.code)
    where = f"README.md:{block.line}"
    if block.lang == "python":
        saved_env, saved_cwd = dict(os.environ), Path.cwd()
        os.environ.update(env)
        os.chdir(cwd)
        try:
            # Blank lines in front, so tracebacks name the README's own line numbers.
            exec(compile("\n" * block.line + code, "README.md", "exec"), namespace)
        finally:
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
        return
    done = subprocess.run(
        [*LANGUAGES[block.lang], code],
        cwd=cwd,
        env={**os.environ, **env},
        text=True,
        capture_output=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    if done.returncode != 0:
        pytest.fail(
            f"{where} ({block.lang}) exited {done.returncode}\n--- code\n{code}--- stdout\n"
            f"{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}",
            pytrace=False,
        )


def example_env(url: str) -> dict[str, str]:
    """What a reader's shell would have after following the README: the venv first on PATH, the SDK's URL."""
    venv_bin = str(Path(sys.executable).parent)
    return {
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAGADAPT_URL": url,
        "RAGADAPT_ADMIN_TOKEN": ADMIN_TOKEN,
        NESTED: "1",
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the extraction and the runner, on a small markdown file ------------------------------------------------

FIXTURE = """\
# Example

```bash
curl -fsS http://localhost:8080/healthz
```

Some prose.

<!-- not-tested: needs Docker -->

```sh
docker compose up -d
```

<!-- not-tested: this marker is cut off by the paragraph below -->
A paragraph.

```python
from ragadapt_client import Client
client = Client()
```

```json
{"not": "run"}
```

1. In a list:

   ````python
   status = client.health().status
   print("```", status)
   ````

```console
$ not run either
```
"""


def test_extract_blocks_finds_languages_markers_and_nesting():
    blocks = extract_blocks(FIXTURE)
    assert [(b.lang, b.line, b.skip) for b in blocks] == [
        ("bash", 3, None),
        ("sh", 11, "needs Docker"),
        ("python", 18, None),
        ("python", 29, None),
    ]
    assert blocks[0].code == "curl -fsS http://localhost:8080/healthz\n"
    assert blocks[3].code == 'status = client.health().status\nprint("```", status)\n'


@pytest.mark.parametrize(
    ("markdown", "message"),
    [
        ("<!-- not-tested -->\n```bash\nls\n```\n", "needs a reason"),
        ("<!-- not-tested: x -->\n```json\n{}\n```\n", "never run anyway"),
        ("```bash\nls\n", "never closed"),
    ],
)
def test_extract_blocks_rejects_mistakes(markdown, message):
    with pytest.raises(ValueError, match=message):
        extract_blocks(markdown)


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"status": "alive"}' if self.path == "/healthz" else b'{"code": "not_found"}'
        self.send_response(200 if self.path == "/healthz" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_runner_points_shell_and_python_examples_at_the_test_server(health_server, tmp_path, capfd):
    namespace: dict = {}
    env = example_env(health_server)
    for block in extract_blocks(FIXTURE):
        if block.skip is None:
            run_block(block, health_server, env, namespace, tmp_path)
    assert namespace["status"] == "alive"  # the second python block used the first one's client
    assert "``` alive" in capfd.readouterr().out
    assert NESTED not in os.environ  # the examples' environment did not leak into this process


def test_runner_reports_the_readme_line_of_a_failing_block(health_server, tmp_path):
    block = extract_blocks("\n\n```bash\ncurl -fsS http://localhost:8080/missing\n```\n")[0]
    with pytest.raises(pytest.fail.Exception, match=r"README.md:3 \(bash\) exited 22"):
        run_block(block, health_server, example_env(health_server), {}, tmp_path)


def test_python_block_errors_point_at_the_readme(health_server, tmp_path):
    block = extract_blocks("```python\nx = 1\nraise RuntimeError('from the README')\n```\n")[0]
    with pytest.raises(RuntimeError) as caught:
        run_block(block, health_server, example_env(health_server), {}, tmp_path)
    origin = traceback.extract_tb(caught.value.__traceback__)[-1]
    assert (origin.filename, origin.lineno) == ("README.md", 3)


# --- the README itself --------------------------------------------------------------------------------------

README_BLOCKS = extract_blocks(README.read_text()) if README.is_file() else []


def _marks(block: Block) -> list[pytest.MarkDecorator]:
    if os.environ.get(NESTED):
        return [pytest.mark.skip(reason="inside a README example: its examples do not run again")]
    return [pytest.mark.skip(reason=block.skip)] if block.skip else []


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory):
    """``ragadapt serve`` as ``make serve`` runs it (embedded default, demo domain), on a free loopback port;
    ready once the demo domain has an index."""
    from tests.conftest import EMBEDDED_CACHE

    port = _free_port()
    data = tmp_path_factory.mktemp("readme-server")
    env = {
        **os.environ,
        "RAGADAPT_SERVER__HOST": "127.0.0.1",
        "RAGADAPT_SERVER__PORT": str(port),
        "RAGADAPT_SERVER__ADMIN_TOKEN": ADMIN_TOKEN,
        "RAGADAPT_DATA_DIR": str(data),
        "RAGADAPT_BACKBONE__CACHE_DIR": str(EMBEDDED_CACHE),
    }
    log = (data / "server.log").open("w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "ragadapt"), "serve"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_demo(url, process, data / "server.log")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_for_demo(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ragadapt serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            demo = httpx.get(f"{url}/domains/demo", timeout=5)
            if demo.status_code == 200 and demo.json()["live"]["index_version"]:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the demo domain had no index after {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def readme_namespace() -> dict:
    return {}


@pytest.mark.integration
@pytest.mark.parametrize(
    "block", [pytest.param(block, id=block.id, marks=_marks(block)) for block in README_BLOCKS]
)
def test_readme_example(block, readme_server, readme_namespace):
    run_block(block, readme_server, example_env(readme_server), readme_namespace, ROOT)
