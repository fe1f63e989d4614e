"""Instructions per REST setpoint write, counted by valgrind's callgrind.

The REST suite's rates and CPU times move with whatever else the host is
doing; an instruction count does not. This runs ``calejo serve`` under
callgrind with the REST suite's stations and load (16 connections, each
writing its own pump), counts the service process's instructions only
while the measured writes run (not its start, not its shutdown), and
prints them per write. Under callgrind the service runs some fifty times
slower, so its periodic work (the engine's tick, checkpoints) weighs a
little more than at full speed: compare counts with each other, not with
CPU times. Needs valgrind (Debian's ``valgrind`` package). Run::

    .venv/bin/python -m benchmarks.instructions [--writes 2000]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks import test_bench_rest as rest
from benchmarks.support import (
    adapter_env,
    admin_token,
    free_port,
    start_adapter,
    wait_http,
)

START_TIMEOUT = 600.0
STOP_TIMEOUT = 300.0
WARM_UP_WRITES = 50


def count(writes: int) -> tuple[int, int]:
    """Run the load under callgrind: (instructions, writes answered 200)."""
    with tempfile.TemporaryDirectory(prefix="calejo-instructions-") as folder:
        where = Path(folder)
        config = where / "calejo.yaml"
        config.write_text(rest._bench_config(), encoding="utf-8")
        out = where / "callgrind.out"
        port = free_port()
        env = adapter_env(where / "data", http=port, admin_password=rest.ADMIN_PASSWORD)
        wrapper = (
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
        )
        process = start_adapter(config, env, wrapper)
        try:
            wait_http(f"http://127.0.0.1:{port}/api/v1/health", process, START_TIMEOUT)
            token = admin_token(port, rest.ADMIN_PASSWORD, START_TIMEOUT)
            requests = rest._setpoint_requests(token, writes)
            rest._run_load(port, [r[:WARM_UP_WRITES] for r in requests])

            _instrument(process.pid, "on")
            _, _, statuses = rest._run_load(port, requests)
            _instrument(process.pid, "off")
        finally:
            # callgrind writes its counts when the service exits.
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise SystemExit("the service did not stop under callgrind") from None

        return _totals(out), statuses.get(200, 0)


def _instrument(pid: int, state: str) -> None:
    subprocess.run(
        ["callgrind_control", "--instr=" + state, str(pid)],
        check=True,
        capture_output=True,
    )


def _totals(path: Path) -> int:
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise SystemExit(f"{path}: expected a 'totals:' line from callgrind, found none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--writes", type=int, default=2000, help="measured writes (default 2000)"
    )
    args = parser.parse_args()
    if args.writes < rest.CONNECTIONS:
        parser.error(f"expected at least {rest.CONNECTIONS} writes, got {args.writes}")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")

    instructions, answered = count(args.writes)
    if answered == 0:
        raise SystemExit("no write was answered 200")
    print(
        f"{instructions:,} instructions for {answered:,} writes: "
        f"{instructions / answered:,.0f} per write"
    )


if __name__ == "__main__":
    main()
