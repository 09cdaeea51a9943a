"""Shared helpers for the Cloud TPU scripts in tpu_scripts/ (standard library only).

Every script (create, setup, launch, status, logs, babysit, delete) is a thin layer over `gcloud`.
Where the TPU lives is read from flags first, then from environment variables. This is the one place
the defaults are written down (docs/tpu.md repeats this table):

    flag           environment variable                        default
    --name         TPU_NAME                                    gpt2-flax
    --zone         TPU_ZONE                                    none: required (e.g. us-central2-b)
    --project      TPU_PROJECT, then CLOUDSDK_CORE_PROJECT     none: required
    --type         TPU_TYPE                                    v4-8
    (binary)       GCLOUD                                      gcloud, found on PATH

Flags shared by all scripts: --dry-run prints the exact gcloud commands, shell-quoted, one per line
on stdout, and runs none. --queued addresses a queued resource (same id as its TPU VM) instead of
a plain TPU VM. Progress messages go to stderr with a UTC timestamp, so stdout stays clean.

Exit codes: 0 ok; 1 a gcloud command or a check on the TPU failed; 2 bad input (reported before any
gcloud call); 3 babysit stopped at --max-polls while training was still running.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFAULT_NAME = "gpt2-flax"
DEFAULT_TYPE = "v4-8"

# accelerator type -> (jax.device_count(), number of hosts). device_count() is the GLOBAL number of
# devices over every host of the slice; jax.local_device_count() is per host (= devices / hosts).
# v4 and v5p count TensorCores in the name but expose one device per chip (megacore): v4-8 is 4
# devices. v5e (v5litepod) and v6e count chips. Slices of more than 8 chips have 4 chips per host.
ACCELERATORS: dict[str, tuple[int, int]] = {
    "v4-8": (4, 1),
    "v4-16": (8, 2),
    "v4-32": (16, 4),
    "v4-64": (32, 8),
    "v4-128": (64, 16),
    "v5litepod-1": (1, 1),
    "v5litepod-4": (4, 1),
    "v5litepod-8": (8, 1),
    "v5litepod-16": (16, 4),
    "v5litepod-32": (32, 8),
    "v5litepod-64": (64, 16),
    "v5litepod-128": (128, 32),
    "v5litepod-256": (256, 64),
    "v5p-8": (4, 1),
    "v5p-16": (8, 2),
    "v5p-32": (16, 4),
    "v5p-64": (32, 8),
    "v5p-128": (64, 16),
    "v6e-1": (1, 1),
    "v6e-4": (4, 1),
    "v6e-8": (8, 1),
    "v6e-16": (16, 4),
    "v6e-32": (32, 8),
    "v6e-64": (64, 16),
    "v6e-128": (128, 32),
    "v6e-256": (256, 64),
}

# TPU VM software image per generation (the part of the type before the last "-").
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

# States after which the TPU will never become usable again: it must be deleted and recreated.
DEAD_VM_STATES = {"PREEMPTED", "TERMINATED", "NOT_FOUND"}
DEAD_QR_STATES = {"FAILED", "SUSPENDED", "NOT_FOUND"}

# Paths on every worker, relative to the home directory (where `tpu-vm ssh --command` starts).
# The package lives in its own virtualenv: the TPU images ship Python 3.10, too old for jax>=0.8.
REMOTE_VENV = "gpt2_flax_venv"
REMOTE_CONFIG = "gpt2_flax_config.yaml"
REMOTE_LOG_DIR = "gpt2_flax_logs"
REMOTE_LOG = f"{REMOTE_LOG_DIR}/train.log"
REMOTE_PID = f"{REMOTE_LOG_DIR}/train.pid"
# The trainer prints this line when it reaches the last step; babysit stops when it sees it.
FINISHED_MARKER = "gpt2-flax: training finished"


class UsageError(Exception):
    """Bad input, found before any gcloud call: exit code 2."""


class GcloudError(Exception):
    """A gcloud command or a check on the TPU failed: exit code 1."""


def log(message: str) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def env_default(*names: str, default: str | None = None) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return default


def make_parser(description: str, *, with_type: bool = True) -> argparse.ArgumentParser:
    """A parser with the flags every script shares (see the table in the module docstring)."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults come from TPU_NAME, TPU_ZONE, TPU_PROJECT (or CLOUDSDK_CORE_PROJECT), TPU_TYPE; "
        "see docs/tpu.md.",
    )
    parser.add_argument(
        "--name", default=env_default("TPU_NAME", default=DEFAULT_NAME), help="TPU VM name (env TPU_NAME)"
    )
    parser.add_argument("--zone", default=env_default("TPU_ZONE"), help="e.g. us-central2-b (env TPU_ZONE)")
    parser.add_argument(
        "--project",
        default=env_default("TPU_PROJECT", "CLOUDSDK_CORE_PROJECT"),
        help="GCP project id (env TPU_PROJECT or CLOUDSDK_CORE_PROJECT)",
    )
    if with_type:
        parser.add_argument(
            "--type",
            dest="accel_type",
            default=env_default("TPU_TYPE", default=DEFAULT_TYPE),
            help=f"accelerator type (env TPU_TYPE), one of: {', '.join(ACCELERATORS)}",
        )
    parser.add_argument("--queued", action="store_true", help="use a queued resource, not a plain TPU VM")
    parser.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run none")
    return parser


def add_wait_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait-tries", type=int, default=120, help="describe polls before giving up")
    parser.add_argument("--wait-seconds", type=float, default=30.0, help="sleep between describe polls")


def quote(word: str) -> str:
    """shlex.quote, but with double quotes where they are just as safe: remote commands travel inside
    the single-quoted --command=... that --dry-run prints, where every inner ' becomes '"'"'."""
    quoted = shlex.quote(word)
    if quoted == word or re.search(r'["$`\\!]', word):
        return quoted
    return f'"{word}"'


def hosts(accel_type: str) -> int:
    return ACCELERATORS[accel_type][1]


def devices(accel_type: str) -> int:
    return ACCELERATORS[accel_type][0]


def require_gs_output(output: str, why: str) -> None:
    if not output.startswith("gs://"):
        raise UsageError(
            f"--output {output!r} is not a gs:// path, but {why}. "
            "Fix: create a bucket in the TPU's region and pass --output gs://BUCKET/RUN_NAME."
        )


@dataclass
class Tpu:
    """One TPU VM (or queued resource) and the gcloud commands that act on it."""

    name: str
    zone: str
    project: str
    accel_type: str | None
    queued: bool
    dry_run: bool
    binary: str = "gcloud"

    @property
    def label(self) -> str:
        return f"{'queued resource' if self.queued else 'TPU VM'} {self.name}"

    @property
    def ready_state(self) -> str:
        return "ACTIVE" if self.queued else "READY"

    @property
    def dead_states(self) -> set[str]:
        return DEAD_QR_STATES if self.queued else DEAD_VM_STATES

    def gcloud(
        self, *args: str, capture: bool = False, check: bool = True, timeout: float | None = None
    ) -> subprocess.CompletedProcess:
        """Run (or with --dry-run only print) one gcloud command."""
        cmd = [self.binary, *args]
        if self.dry_run:
            print(shlex.join(cmd), flush=True)
            return subprocess.CompletedProcess(cmd, 0, "", "")
        log(f"+ {shlex.join(cmd)}")
        try:
            result = subprocess.run(cmd, capture_output=capture, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise GcloudError(f"{shlex.join(cmd)} did not finish within {timeout:.0f} s") from e
        if check and result.returncode != 0:
            detail = f": {result.stderr.strip()[-2000:]}" if capture and result.stderr else ""
            raise GcloudError(f"{shlex.join(cmd)} failed with exit code {result.returncode}{detail}")
        return result

    def resource(self, verb: str, *extra: str, **kwargs) -> subprocess.CompletedProcess:
        """`gcloud compute tpus {tpu-vm|queued-resources} VERB NAME --project --zone ...`."""
        group = "queued-resources" if self.queued else "tpu-vm"
        where = (f"--project={self.project}", f"--zone={self.zone}")
        return self.gcloud("compute", "tpus", group, verb, self.name, *where, *extra, **kwargs)

    def vm(self, verb: str, *extra: str, **kwargs) -> subprocess.CompletedProcess:
        """Same, always on the TPU VM itself: ssh and scp go to the VM even for a queued resource."""
        where = (f"--project={self.project}", f"--zone={self.zone}")
        return self.gcloud("compute", "tpus", "tpu-vm", verb, self.name, *where, *extra, **kwargs)

    def ssh(self, command: str, worker: str = "all", **kwargs) -> subprocess.CompletedProcess:
        # --worker=all runs the command on every host at once, which multi-host JAX needs.
        return self.vm("ssh", f"--worker={worker}", f"--command={command}", **kwargs)

    def scp(self, local: str, remote: str, recurse: bool = False) -> subprocess.CompletedProcess:
        # gcloud's scp takes SRC then NAME:DEST, so it cannot go through vm() (NAME comes first there).
        flags = ["--recurse"] if recurse else []
        where = (f"--project={self.project}", f"--zone={self.zone}")
        return self.gcloud(
            "compute", "tpus", "tpu-vm", "scp", local, f"{self.name}:{remote}", *where, "--worker=all", *flags
        )

    def state(self) -> str:
        """The current state (READY, PREEMPTED, ACTIVE, ...) or NOT_FOUND when it does not exist."""
        field = "state.state" if self.queued else "state"
        result = self.resource("describe", f"--format=value({field})", capture=True, check=False)
        if self.dry_run:
            return self.ready_state
        if result.returncode != 0:
            if "NOT_FOUND" in result.stderr or "not found" in result.stderr.lower():
                return "NOT_FOUND"
            raise GcloudError(f"describe {self.label} failed: {result.stderr.strip()[-2000:]}")
        return result.stdout.strip() or "UNKNOWN"

    def wait_until_ready(self, tries: int, seconds: float) -> None:
        """Poll describe until READY (queued resource: ACTIVE); fail fast on a dead state."""
        if self.dry_run:
            self.state()  # prints the describe command
            return
        for attempt in range(1, tries + 1):
            state = self.state()
            if state == self.ready_state:
                log(f"{self.label} is {state}")
                return
            if state in self.dead_states:
                raise GcloudError(f"{self.label} went {state} while waiting for {self.ready_state}")
            log(f"{self.label} is {state}, waiting for {self.ready_state} ({attempt}/{tries})")
            if attempt < tries:
                time.sleep(seconds)
        raise GcloudError(
            f"{self.label} not {self.ready_state} after {tries} checks; raise --wait-tries or look at "
            "`gcloud compute tpus ... describe` yourself."
        )

    def latest_checkpoint(self, output: str) -> int | None:
        """Largest integer directory name under OUTPUT/checkpoints/ (None when there is none yet)."""
        path = f"{output.rstrip('/')}/checkpoints/"
        result = self.gcloud("storage", "ls", f"--project={self.project}", path, capture=True, check=False)
        steps = []
        for line in result.stdout.splitlines():
            last = line.strip().rstrip("/").rsplit("/", 1)[-1]
            if re.fullmatch(r"\d+", last):  # skips half-written "<step>.orbax-checkpoint-tmp-*" dirs
                steps.append(int(last))
        return max(steps) if steps else None


def make_tpu(args: argparse.Namespace) -> Tpu:
    """Validate the shared flags (raising UsageError) and return the Tpu they describe."""
    if not args.zone:
        raise UsageError("no zone given. Fix: pass --zone ZONE (e.g. us-central2-b) or set TPU_ZONE.")
    if not args.project:
        raise UsageError(
            "no project given. Fix: pass --project PROJECT_ID or set TPU_PROJECT (or CLOUDSDK_CORE_PROJECT)."
        )
    accel_type = getattr(args, "accel_type", None)
    if accel_type is not None and accel_type not in ACCELERATORS:
        raise UsageError(
            f"unknown accelerator type {accel_type!r}. Fix: pass --type (or set TPU_TYPE) to one of: "
            f"{', '.join(ACCELERATORS)}."
        )
    binary = os.environ.get("GCLOUD") or "gcloud"
    if not args.dry_run and shutil.which(binary) is None:
        raise UsageError(
            f"{binary!r} not found. Fix: install the Google Cloud SDK (https://cloud.google.com/sdk) "
            "or set GCLOUD=/path/to/gcloud."
        )
    return Tpu(args.name, args.zone, args.project, accel_type, args.queued, args.dry_run, binary)


def main_wrapper(main: Callable[[Sequence[str]], int]) -> None:
    """Run a script's main() and turn our exceptions into clear messages and exit codes."""
    script = os.path.basename(sys.argv[0])
    try:
        code = main(sys.argv[1:])
    except UsageError as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        code = 2
    except GcloudError as e:
        print(f"{script}: failed: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
