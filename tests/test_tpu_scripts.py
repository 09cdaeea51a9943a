"""Tests of tpu_scripts/: every script runs as a subprocess against a fake `gcloud` first on PATH.

The fake appends its argv as one JSON line to a log and answers from a rules file: a list of
[substring, answers]; the first rule whose substring occurs in the space-joined argv answers, with
its answers consumed in order and the last one repeated (e.g. PREEMPTED, then READY for ever).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pty
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "tpu_scripts"
ALL_SCRIPTS = ["create", "setup", "launch", "status", "logs", "babysit", "delete"]

FAKE_GCLOUD = """\
#!{python} -S
import json, os, sys

args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
rules_file = os.environ["FAKE_GCLOUD_RULES"]
with open(rules_file) as f:
    rules = json.load(f)
counts_file = rules_file + ".counts"
counts = {{}}
if os.path.exists(counts_file):
    with open(counts_file) as f:
        counts = json.load(f)
line = " ".join(args)
for i, (pattern, answers) in enumerate(rules):
    if pattern in line:
        n = counts.get(str(i), 0)
        counts[str(i)] = n + 1
        with open(counts_file, "w") as f:
            json.dump(counts, f)
        answer = answers[min(n, len(answers) - 1)]
        if isinstance(answer, str):
            answer = {{"stdout": answer}}
        sys.stdout.write(answer.get("stdout", ""))
        sys.stderr.write(answer.get("stderr", ""))
        sys.exit(answer.get("rc", 0))
"""

# The expected commands, spelled out.
WHERE = ["--project=my-proj", "--zone=us-central2-b"]
DESCRIBE_VM = ["compute", "tpus", "tpu-vm", "describe", "test-tpu", *WHERE, "--format=value(state)"]
DESCRIBE_QR = [
    "compute",
    "tpus",
    "queued-resources",
    "describe",
    "test-tpu",
    *WHERE,
    "--format=value(state.state)",
]
DELETE_VM = ["compute", "tpus", "tpu-vm", "delete", "test-tpu", *WHERE, "--quiet"]
DELETE_QR = ["compute", "tpus", "queued-resources", "delete", "test-tpu", *WHERE, "--quiet", "--force"]
WHEEL = "gpt2_flax-0.1.0-py3-none-any.whl"
INSTALL = (
    "python3 -m pip install --user --quiet --upgrade uv && rm -rf gpt2_flax_venv && "
    ".local/bin/uv venv --python 3.12 gpt2_flax_venv && "
    ".local/bin/uv pip install --python gpt2_flax_venv/bin/python "
)
DEVICE_CHECK = (
    "echo gpt2_flax-devices $(gpt2_flax_venv/bin/python -c "
    '"import jax; print(jax.device_count(), jax.local_device_count(), jax.process_index())")'
)
LAUNCH = (
    "set -e; mkdir -p gpt2_flax_logs; {replace}"
    'if [ -f gpt2_flax_logs/train.pid ] && kill -0 "$(cat gpt2_flax_logs/train.pid)" 2>/dev/null; then '
    'echo "gpt2_flax: training is already running on this worker (launch.py --replace stops it)" >&2; '
    "exit 1; fi; "
    "setsid nohup gpt2_flax_venv/bin/gpt2-flax train --config gpt2_flax_config.yaml {args} "
    "> gpt2_flax_logs/train.log 2>&1 < /dev/null & echo $! > gpt2_flax_logs/train.pid"
)
REPLACE = (
    'if [ -f gpt2_flax_logs/train.pid ]; then P="$(cat gpt2_flax_logs/train.pid)"; '
    '{ kill "$P" 2>/dev/null && timeout 60 tail --pid="$P" -f /dev/null; } || true; '
    'kill -9 "$P" 2>/dev/null || true; fi; '
)
BABYSIT_CHECK = (
    "tail -n 20 gpt2_flax_logs/train.log 2>/dev/null; "
    'if kill -0 "$(cat gpt2_flax_logs/train.pid 2>/dev/null)" 2>/dev/null; '
    'then echo "gpt2_flax-babysit: running"; else echo "gpt2_flax-babysit: stopped"; fi'
)
FINISHED = "step 5000 loss 3.1\ngpt2-flax: training finished\ngpt2_flax-babysit: stopped\n"
STAMP = r"\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\]"


def vm(verb: str, *extra: str) -> list[str]:
    return ["compute", "tpus", "tpu-vm", verb, "test-tpu", *WHERE, *extra]


def ssh(command: str, worker: str = "all") -> list[str]:
    return vm("ssh", f"--worker={worker}", f"--command={command}")


def scp(local: str, remote: str, *extra: str) -> list[str]:
    return ["compute", "tpus", "tpu-vm", "scp", local, f"test-tpu:{remote}", *WHERE, "--worker=all", *extra]


class FakeGcloud:
    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        fake = self.bin / "gcloud"
        fake.write_text(FAKE_GCLOUD.format(python=sys.executable))
        fake.chmod(0o755)
        self.log = tmp_path / "gcloud.log"
        self.rules = tmp_path / "rules.json"
        self.wheel = tmp_path / WHEEL
        self.wheel.write_text("not really a wheel")
        self.config = tmp_path / "tpu-v4-8-124m.yaml"
        self.config.write_text("train: {num_steps: 5000}\n")

    def run(self, script, *args, rules=(), env=None, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
        self.rules.write_text(json.dumps(list(rules)))
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k != "CLOUDSDK_CORE_PROJECT"
        }
        full_env.pop("GCLOUD", None)
        full_env.update(
            PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            FAKE_GCLOUD_LOG=str(self.log),
            FAKE_GCLOUD_RULES=str(self.rules),
            TPU_NAME="test-tpu",
            TPU_ZONE="us-central2-b",
            TPU_PROJECT="my-proj",
        )
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        cmd = [sys.executable, str(SCRIPTS / f"{script}.py"), *map(str, args)]
        return subprocess.run(cmd, env=full_env, capture_output=True, text=True, stdin=stdin, timeout=60)

    @property
    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def gc(tmp_path):
    return FakeGcloud(tmp_path)


def load_common():
    spec = importlib.util.spec_from_file_location("tpu_scripts_common", SCRIPTS / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ tables


def test_tables_of_devices_hosts_and_runtime_versions():
    common = load_common()
    expected = {
        "v4-8": (4, 1),
        "v4-32": (16, 4),
        "v5litepod-8": (8, 1),
        "v5litepod-16": (16, 4),
        "v5p-8": (4, 1),
        "v6e-8": (8, 1),
    }
    for accel, (devices, hosts) in expected.items():
        assert (common.devices(accel), common.hosts(accel)) == (devices, hosts), accel
    for accel, (devices, hosts) in common.ACCELERATORS.items():
        assert devices % hosts == 0, accel  # local_device_count = devices / hosts is a whole number
        assert accel.rsplit("-", 1)[0] in common.RUNTIME_VERSIONS, accel
    assert common.RUNTIME_VERSIONS == {
        "v4": "tpu-ubuntu2204-base",
        "v5litepod": "v2-alpha-tpuv5-lite",
        "v5p": "v2-alpha-tpuv5",
        "v6e": "v2-alpha-tpuv6e",
    }


def test_help_of_every_script(gc):
    for script in ALL_SCRIPTS:
        result = gc.run(script, "--help")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage:") and "--dry-run" in result.stdout, script
    assert gc.calls == []


# ------------------------------------------------------------------------------------------ create


def test_create_vm_waits_until_ready(gc):
    result = gc.run(
        "create", "--wait-seconds", "0", rules=[["tpu-vm describe", ["CREATING\n", "CREATING\n", "READY\n"]]]
    )
    assert result.returncode == 0, result.stderr
    create = vm("create", "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base")
    assert gc.calls == [create, DESCRIBE_VM, DESCRIBE_VM, DESCRIBE_VM]
    assert re.search(STAMP + " TPU VM test-tpu is READY", result.stderr)


@pytest.mark.parametrize(
    "accel, provisioning, runtime, flags",
    [
        ("v4-32", "spot", "tpu-ubuntu2204-base", ["--spot"]),
        ("v5litepod-16", "spot", "v2-alpha-tpuv5-lite", ["--spot"]),
        ("v5p-8", "preemptible", "v2-alpha-tpuv5", ["--preemptible"]),
        ("v6e-8", "on-demand", "v2-alpha-tpuv6e", []),
    ],
)
def test_create_runtime_version_per_generation(gc, accel, provisioning, runtime, flags):
    rules = [["describe", ["READY\n"]]]
    result = gc.run("create", "--type", accel, "--provisioning", provisioning, rules=rules)
    assert result.returncode == 0, result.stderr
    assert gc.calls == [
        vm("create", f"--accelerator-type={accel}", f"--version={runtime}", *flags),
        DESCRIBE_VM,
    ]


def test_create_runtime_version_flag_and_flags_beat_env(gc):
    rules = [["describe", ["READY\n"]]]
    args = ["--name", "other", "--zone", "europe-west4-a", "--runtime-version", "my-image"]
    result = gc.run("create", *args, rules=rules, env={"TPU_TYPE": "v5litepod-8"})
    assert result.returncode == 0, result.stderr
    where = ["--project=my-proj", "--zone=europe-west4-a"]
    assert gc.calls[0] == [
        *["compute", "tpus", "tpu-vm", "create", "other", *where],
        *["--accelerator-type=v5litepod-8", "--version=my-image"],
    ]


def test_create_queued_resource_waits_until_active(gc):
    states = ["WAITING_FOR_RESOURCES\n", "PROVISIONING\n", "ACTIVE\n"]
    args = ["--queued", "--type", "v5litepod-16", "--provisioning", "spot", "--wait-seconds", "0"]
    result = gc.run("create", *args, rules=[["queued-resources describe", states]])
    assert result.returncode == 0, result.stderr
    create = [
        *["compute", "tpus", "queued-resources", "create", "test-tpu", *WHERE, "--node-id=test-tpu"],
        *["--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"],
    ]
    assert gc.calls == [create, DESCRIBE_QR, DESCRIBE_QR, DESCRIBE_QR]


def test_create_gives_up_after_wait_tries(gc):
    result = gc.run(
        "create", "--wait-tries", "3", "--wait-seconds", "0", rules=[["describe", ["CREATING\n"]]]
    )
    assert result.returncode == 1
    assert gc.calls[1:] == [DESCRIBE_VM] * 3
    assert "not READY after 3 checks" in result.stderr


def test_create_stops_waiting_on_a_dead_state(gc):
    result = gc.run("create", "--wait-seconds", "0", rules=[["describe", ["CREATING\n", "PREEMPTED\n"]]])
    assert result.returncode == 1
    assert gc.calls[1:] == [DESCRIBE_VM] * 2
    assert "went PREEMPTED" in result.stderr


# ------------------------------------------------------------------------------------------- setup


def test_setup_wheel_on_all_workers_and_device_check(gc):
    rules = [["gpt2_flax-devices", ["gpt2_flax-devices 4 4 0\n"]]]
    result = gc.run("setup", "--wheel", gc.wheel, rules=rules)
    assert result.returncode == 0, result.stderr
    assert gc.calls == [
        scp(str(gc.wheel), WHEEL),
        ssh(INSTALL + f'"./{WHEEL}[tpu]"'),
        ssh(DEVICE_CHECK),
    ]
    assert "device check ok: 1 worker(s), jax.device_count()=4" in result.stderr


def test_setup_git_on_a_multi_host_slice(gc):
    # Every one of the 4 hosts of a v5litepod-16 must report the GLOBAL count, 16 (4 local each).
    answer = "".join(f"gpt2_flax-devices 16 4 {i}\n" for i in range(4))
    url = "https://github.com/org/gpt2_flax.git@main"
    result = gc.run("setup", "--type", "v5litepod-16", "--git", url, rules=[["gpt2_flax-devices", [answer]]])
    assert result.returncode == 0, result.stderr
    assert gc.calls == [ssh(INSTALL + f'"gpt2_flax[tpu] @ git+{url}"'), ssh(DEVICE_CHECK)]


def test_setup_source_tree(gc, tmp_path):
    src = tmp_path / "repo"
    src.mkdir()
    (src / "pyproject.toml").write_text("[project]\nname = 'gpt2_flax'\n")
    rules = [["gpt2_flax-devices", ["gpt2_flax-devices 8 8 0\n"]]]
    result = gc.run("setup", "--type", "v6e-8", "--source", src, "--extras", "tpu,torch", rules=rules)
    assert result.returncode == 0, result.stderr
    assert gc.calls == [
        ssh("rm -rf gpt2_flax_src"),
        scp(str(src), "gpt2_flax_src", "--recurse"),
        ssh(INSTALL + '"./gpt2_flax_src[tpu,torch]"'),
        ssh(DEVICE_CHECK),
    ]


@pytest.mark.parametrize(
    "answer, message",
    [
        # Each worker of a v4-32 only sees its own 4 chips: they did not join into one slice.
        ("".join(f"gpt2_flax-devices 4 4 {i}\n" for i in range(4)), "process 0 sees jax.device_count()=4"),
        # One worker never answered.
        ("".join(f"gpt2_flax-devices 16 4 {i}\n" for i in range(3)), "3 of 4 workers answered"),
    ],
)
def test_setup_device_check_fails_on_a_wrong_count(gc, answer, message):
    result = gc.run("setup", "--type", "v4-32", "--wheel", gc.wheel, rules=[["gpt2_flax-devices", [answer]]])
    assert result.returncode == 1
    assert message in result.stderr
    assert "jax.device_count()=16" in result.stderr and "GLOBAL" in result.stderr
    assert gc.calls[-1] == ssh(DEVICE_CHECK)


# ------------------------------------------------------------------------------------------ launch


def test_launch_on_all_workers_of_a_multi_host_slice(gc):
    # gs:// data goes to the trainer as it is: every worker reads it in place, nothing is copied.
    args = ["--type", "v4-32", "--config", gc.config, "--output", "gs://bkt/run"]
    args += ["--data-files", "gs://bkt/d/*.txt", "--", "--train.num_steps=100", "--train.learning_rate=3e-4"]
    result = gc.run("launch", *args)
    assert result.returncode == 0, result.stderr
    # Multi-host: --distributed starts jax.distributed from the TPU metadata.
    train = '--distributed "--data.files=gs://bkt/d/*.txt" --train.output_dir=gs://bkt/run '
    train += "--train.num_steps=100 --train.learning_rate=3e-4"
    assert gc.calls == [
        scp(str(gc.config), "gpt2_flax_config.yaml"),
        ssh(LAUNCH.format(replace="", args=train)),
    ]
    assert not any("storage cp" in " ".join(call) for call in gc.calls)


def test_launch_sends_a_preset_by_name(gc):
    # configs/ sits beside tpu_scripts/: a preset's name is enough, from any folder.
    result = gc.run("launch", "--type", "v4-8", "--config", "gpt2-124m", "--output", "gs://bkt/run")
    assert result.returncode == 0, result.stderr
    assert gc.calls[0] == scp(str(SCRIPTS.parent / "configs" / "gpt2-124m.yaml"), "gpt2_flax_config.yaml")


def test_launch_single_host_local_output_and_data_replacing_a_trainer(gc):
    args = ["--config", gc.config, "--output", "run1", "--data-files", "data/*.txt", "--replace"]
    result = gc.run("launch", *args)
    assert result.returncode == 0, result.stderr
    train = '"--data.files=data/*.txt" --train.output_dir=run1 --train.take_over_lock=true'
    assert gc.calls[1] == ssh(LAUNCH.format(replace=REPLACE, args=train))
    assert "lost if the VM is preempted" in result.stderr


# ---------------------------------------------------------------------------------- status / logs


def test_status_shows_state_log_tails_and_latest_checkpoint(gc):
    listing = "".join(
        f"gs://bkt/run/checkpoints/{d}/\n" for d in ["1000", "3000", "200", "4000.orbax-checkpoint-tmp-9"]
    )
    rules = [
        ["describe", ["READY\n"]],
        ["tpu-vm ssh", ["[t1v-n-1-w-0] step 3100 loss 3.3\n"]],
        ["storage ls", [listing]],
    ]
    result = gc.run("status", "--output", "gs://bkt/run/", "--lines", "5", rules=rules)
    assert result.returncode == 0, result.stderr
    assert gc.calls == [
        DESCRIBE_VM,
        ssh('tail -n 5 gpt2_flax_logs/train.log 2>&1 | sed -u "s/^/[$(hostname)] /"'),
        ["storage", "ls", "--project=my-proj", "gs://bkt/run/checkpoints/"],
    ]
    assert "TPU VM test-tpu: READY" in result.stdout
    assert "latest checkpoint step: 3000" in result.stdout


def test_status_of_a_missing_tpu_skips_ssh(gc):
    rules = [["describe", [{"rc": 1, "stderr": "ERROR: (gcloud) NOT_FOUND: Resource not found\n"}]]]
    result = gc.run("status", rules=rules)
    assert result.returncode == 0, result.stderr
    assert gc.calls == [DESCRIBE_VM]
    assert "TPU VM test-tpu: NOT_FOUND" in result.stdout


def test_logs_follow_one_worker(gc):
    result = gc.run("logs", "--worker", "0", "--lines", "100", "--follow")
    assert result.returncode == 0, result.stderr
    assert gc.calls == [
        ssh('tail -n 100 -F gpt2_flax_logs/train.log 2>&1 | sed -u "s/^/[$(hostname)] /"', "0")
    ]


# ----------------------------------------------------------------------------------------- babysit


def babysit_args(gc, *extra):
    return [
        *["--wheel", gc.wheel, "--config", gc.config, "--output", "gs://bkt/run"],
        *["--poll-seconds", "0", "--wait-seconds", "0", "--max-polls", "10", "--max-restarts", "3", *extra],
    ]


GS_RUN_TAKEN_OVER = "--train.output_dir=gs://bkt/run --train.take_over_lock=true"
RECREATE_VM = [
    vm("create", "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base", "--spot"),
    DESCRIBE_VM,
    scp("{wheel}", WHEEL),
    ssh(INSTALL + f'"./{WHEEL}[tpu]"'),
    ssh(DEVICE_CHECK),
    scp("{config}", "gpt2_flax_config.yaml"),
    # the VM was recreated: its old trainer's lease on the gs:// folder is taken over
    ssh(LAUNCH.format(replace="", args=GS_RUN_TAKEN_OVER)),
]


def recreate_vm(gc):
    paths = {"{wheel}": str(gc.wheel), "{config}": str(gc.config)}
    return [[paths.get(arg, arg) for arg in call] for call in RECREATE_VM]


@pytest.mark.parametrize("dead", ["PREEMPTED", "TERMINATED", "NOT_FOUND"])
def test_babysit_recreates_after_preemption_then_sees_training_finish(gc, dead):
    first = {"rc": 1, "stderr": "NOT_FOUND: Resource 'x' was not found\n"} if dead == "NOT_FOUND" else dead
    rules = [
        ["tpu-vm describe", [first, "READY\n"]],
        ["storage ls", ["gs://bkt/run/checkpoints/1000/\ngs://bkt/run/checkpoints/2000/\n"]],
        ["gpt2_flax-devices", ["gpt2_flax-devices 4 4 0\n"]],
        ["gpt2_flax-babysit", [FINISHED]],
    ]
    result = gc.run("babysit", *babysit_args(gc, "--provisioning", "spot"), rules=rules)
    assert result.returncode == 0, result.stderr
    deleted = [] if dead == "NOT_FOUND" else [DELETE_VM]
    assert gc.calls == [
        DESCRIBE_VM,
        ["storage", "ls", "--project=my-proj", "gs://bkt/run/checkpoints/"],
        *deleted,
        *recreate_vm(gc),
        DESCRIBE_VM,
        ssh(BABYSIT_CHECK, "0"),
    ]
    restart = (
        f"{STAMP} RESTART 1/3: TPU VM test-tpu is {dead}; recreating, resuming from checkpoint step 2000"
    )
    assert re.search(restart, result.stderr), result.stderr
    assert "training finished" in result.stderr


def test_babysit_recreates_a_suspended_queued_resource(gc):
    rules = [
        ["queued-resources describe", ["SUSPENDED\n", "ACTIVE\n"]],
        ["gpt2_flax-devices", ["".join(f"gpt2_flax-devices 16 4 {i}\n" for i in range(4))]],
        ["gpt2_flax-babysit", [FINISHED]],
    ]
    args = babysit_args(gc, "--queued", "--type", "v5litepod-16", "--provisioning", "spot")
    result = gc.run("babysit", *args, rules=rules)
    assert result.returncode == 0, result.stderr
    verbs = [call[2:4] if call[0] == "compute" else call[:2] for call in gc.calls]
    assert verbs == [
        ["queued-resources", "describe"],
        ["storage", "ls"],
        ["queued-resources", "delete"],
        ["queued-resources", "create"],
        ["queued-resources", "describe"],
        ["tpu-vm", "scp"],
        ["tpu-vm", "ssh"],
        ["tpu-vm", "ssh"],
        ["tpu-vm", "scp"],
        ["tpu-vm", "ssh"],
        ["queued-resources", "describe"],
        ["tpu-vm", "ssh"],
    ]
    assert gc.calls[2] == DELETE_QR
    assert "--spot" in gc.calls[3] and "--runtime-version=v2-alpha-tpuv5-lite" in gc.calls[3]
    assert "no checkpoint yet" in result.stderr


def test_babysit_relaunches_a_trainer_that_stopped(gc):
    rules = [
        ["describe", ["READY\n"]],
        [
            "gpt2_flax-babysit",
            ["Traceback ...\ngpt2_flax-babysit: stopped\n", "gpt2_flax-babysit: running\n", FINISHED],
        ],
    ]
    result = gc.run("babysit", *babysit_args(gc), rules=rules)
    assert result.returncode == 0, result.stderr
    assert gc.calls[2:5] == [
        ["storage", "ls", "--project=my-proj", "gs://bkt/run/checkpoints/"],
        scp(str(gc.config), "gpt2_flax_config.yaml"),
        # --replace semantics: a trainer left hanging on another worker is stopped first.
        # and it no longer holds the output folder's lock
        ssh(LAUNCH.format(replace=REPLACE, args=GS_RUN_TAKEN_OVER)),
    ]
    assert not any(call[3] in ("create", "delete") for call in gc.calls if call[0] == "compute")
    assert re.search(
        STAMP + " RESTART 1/3: the trainer is not running and did not finish; relaunching", result.stderr
    )


def test_babysit_gives_up_after_max_restarts(gc):
    result = gc.run(
        "babysit", *babysit_args(gc, "--max-restarts", "2"), rules=[["describe", ["PREEMPTED\n"]]]
    )
    assert result.returncode == 1
    creates = [call for call in gc.calls if call[:4] == ["compute", "tpus", "tpu-vm", "create"]]
    assert len(creates) == 2
    assert len(re.findall(STAMP + " RESTART [12]/2: TPU VM test-tpu is PREEMPTED", result.stderr)) == 2
    assert "giving up" in result.stderr


def test_babysit_stops_after_max_polls(gc):
    rules = [["describe", ["READY\n"]], ["gpt2_flax-babysit", ["gpt2_flax-babysit: running\n"]]]
    result = gc.run("babysit", *babysit_args(gc, "--max-polls", "3"), rules=rules)
    assert result.returncode == 3
    assert gc.calls == [DESCRIBE_VM, ssh(BABYSIT_CHECK, "0")] * 3


# ------------------------------------------------------------------------------------------ delete


def test_delete_refuses_without_a_terminal(gc):
    result = gc.run("delete", stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert "--yes" in result.stderr
    assert gc.calls == []


@pytest.mark.parametrize("queued, expected", [(False, DELETE_VM), (True, DELETE_QR)])
def test_delete_with_yes(gc, queued, expected):
    result = gc.run("delete", "--yes", *(["--queued"] if queued else []))
    assert result.returncode == 0, result.stderr
    assert gc.calls == [expected]


@pytest.mark.parametrize("answer, code, calls", [("y\n", 0, [DELETE_VM]), ("n\n", 1, [])])
def test_delete_asks_on_a_terminal(gc, answer, code, calls):
    leader, follower = pty.openpty()
    try:
        os.write(leader, answer.encode())
        result = gc.run("delete", stdin=follower)
    finally:
        os.close(leader)
        os.close(follower)
    assert result.returncode == code, result.stderr
    assert "Delete TPU VM test-tpu in us-central2-b (project my-proj)? [y/N]" in result.stdout
    assert gc.calls == calls


# ----------------------------------------------------------------------------- dry run, bad input


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_dry_run_runs_no_gcloud(gc, script):
    args = {
        "create": ["--queued", "--provisioning", "spot"],
        "setup": ["--wheel", gc.wheel],
        "launch": ["--config", gc.config, "--output", "gs://bkt/run"],
        "status": ["--output", "gs://bkt/run"],
        "logs": [],
        "babysit": babysit_args(gc),
        "delete": [],  # no confirmation needed: nothing gets deleted
    }[script]
    # An unusable GCLOUD: a dry run must not even need gcloud installed.
    result = gc.run(script, "--dry-run", *args, env={"GCLOUD": "/nonexistent/gcloud"})
    assert result.returncode == 0, result.stderr
    assert gc.calls == []
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert lines
    for line in lines:
        assert shlex.split(line)[0] == "/nonexistent/gcloud", line
    if script == "launch":
        assert shlex.split(lines[-1]) == [
            "/nonexistent/gcloud",
            *ssh(LAUNCH.format(replace="", args="--train.output_dir=gs://bkt/run")),
        ]


@pytest.mark.parametrize(
    "script, args, env, message",
    [
        ("create", ["--type", "v4-7"], {}, "unknown accelerator type 'v4-7'"),
        ("setup", ["--wheel", "x.whl"], {"TPU_TYPE": "tpu9"}, "unknown accelerator type 'tpu9'"),
        ("create", [], {"TPU_ZONE": None}, "no zone given. Fix: pass --zone"),
        ("delete", ["--yes"], {"TPU_PROJECT": None}, "no project given. Fix: pass --project"),
        ("create", ["--queued", "--provisioning", "preemptible"], {}, "use --provisioning spot"),
        (
            "launch",
            ["--type", "v4-32", "--output", "/tmp/run"],
            {},
            "not a gs:// path, but v4-32 has 4 hosts",
        ),
        ("launch", ["--type", "v5litepod-16", "--output", "run"], {}, "Fix: create a bucket"),
        (
            "launch",
            ["--output", "gs://b/r", "--", "train.steps=3"],
            {},
            "not of the form --section.key=value",
        ),
        (
            "launch",
            ["--config", "missing.yaml", "--output", "gs://b/r"],
            {},
            "config 'missing.yaml' not found. Fix: pass --config PATH/TO/CONFIG.yaml, "
            "or a preset by name: demo, gpt2-1.5b",
        ),
        ("setup", [], {}, "nothing to install"),
        ("setup", ["--git", "https://x/y.git", "--extras", "tpu torch"], {}, "not a comma-separated list"),
        ("setup", ["--wheel", "nope.whl"], {}, "is not a .whl file"),
        ("babysit", ["--git", "https://x/y.git", "--output", "run"], {}, "babysit recreates the TPU"),
        ("status", [], {"GCLOUD": "/nonexistent/gcloud"}, "Fix: install the Google Cloud SDK"),
    ],
)
def test_bad_input_exits_2_before_any_gcloud_call(gc, script, args, env, message):
    if script in ("launch", "babysit") and "--config" not in args:
        args = ["--config", str(gc.config), *args]
    result = gc.run(script, *args, env=env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert gc.calls == []


def test_project_from_cloudsdk_env_and_gcloud_from_env(gc, tmp_path):
    # GCLOUD names the binary even when no gcloud is on PATH.
    other = tmp_path / "elsewhere"
    other.mkdir()
    (gc.bin / "gcloud").rename(other / "my-gcloud")
    env = {"TPU_PROJECT": None, "CLOUDSDK_CORE_PROJECT": "sdk-proj", "GCLOUD": str(other / "my-gcloud")}
    result = gc.run("delete", "--yes", env=env)
    assert result.returncode == 0, result.stderr
    assert gc.calls == [
        [
            "compute",
            "tpus",
            "tpu-vm",
            "delete",
            "test-tpu",
            "--project=sdk-proj",
            "--zone=us-central2-b",
            "--quiet",
        ]
    ]
