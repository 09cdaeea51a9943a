"""Bad input and faults as a user meets them (issue 11): each case asserts the error (type or exit
code 2), a message naming the problem, and that the folders involved are byte-for-byte unchanged."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import snapshot

from gpt2_flax import GPT2, ConfigError, TokenDataset, build_gpt2_config
from gpt2_flax.config import Config
from gpt2_flax.errors import CheckpointError, DataError, ExportError, TrainingError
from gpt2_flax.run_dir import LOCK_FILE, RunDir

ROOT = Path(__file__).resolve().parents[1]
TRAIN = dict(batch_size=16, log_every=2, save_every=4, progress=False)


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run(
        [sys.executable, "-m", "gpt2_flax.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def _gpt2(tokenizer_files, vocab_size: int, **kw) -> GPT2:
    vocab, merges = tokenizer_files
    config = build_gpt2_config(vocab_size=vocab_size, max_length=32, n_embd=32, n_layer=2, n_head=4, **kw)
    return GPT2(vocab_file=vocab, merges_file=merges, config=config, seed=1)


@pytest.fixture(scope="module")
def run_folder(tokenizer_files, vocab_size, dataset, tmp_path_factory) -> Path:
    """A finished 8-step run (checkpoints at 4 and 8) with its export, to copy and abuse."""
    out = tmp_path_factory.mktemp("run")
    _gpt2(tokenizer_files, vocab_size).train(dataset, num_steps=8, output_dir=out, **TRAIN)
    return out


@pytest.fixture
def run_copy(run_folder, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_folder, dst)
    return dst


# ----------------------------------------------------------------------------- exports


def test_export_over_another_model_is_refused_and_changes_nothing(run_folder, trained_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained_run.out_dir, other)  # same architecture, other weights
    before = snapshot(other)
    out = cli("export", "--checkpoint", str(run_folder), "--output", str(other))
    assert out.returncode == 2, out.stderr
    assert "already holds another model" in out.stderr and "--overwrite" in out.stderr
    assert "Traceback" not in out.stderr
    assert snapshot(other) == before
    # Exporting the same run twice is fine: the folder is its own.
    mine = tmp_path / "mine"
    assert cli("export", "--checkpoint", str(run_folder), "--output", str(mine)).returncode == 0
    assert cli("export", "--checkpoint", str(run_folder), "--output", str(mine)).returncode == 0


def test_export_with_changed_weights_counts_as_another_model(trained_run, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(trained_run.out_dir, folder)
    ai = GPT2(model_folder=folder)
    ai.save(folder)  # its own folder: allowed
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # someone edited the weights since
    before = snapshot(folder)
    with pytest.raises(ExportError, match=r"model.safetensors changed since"):
        ai.save(folder)
    assert snapshot(folder) == before


def test_overwrite_replaces_only_model_files(trained_run, tokenizer_files, vocab_size, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(trained_run.out_dir, folder)
    (folder / "notes.txt").write_text("mine")
    ai = _gpt2(tokenizer_files, vocab_size)
    with pytest.raises(ExportError):
        ai.save(folder)
    ai.save(folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine"  # unrelated files stay
    assert (folder / "checkpoints").is_dir()  # the training run's own files are not an export's


def test_exported_files_have_ordinary_permissions(run_folder):
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        mode = stat.S_IMODE((run_folder / name).stat().st_mode)
        assert mode == 0o644, (name, oct(mode))


def test_training_into_another_models_export_changes_nothing(
    trained_run, tokenizer_files, vocab_size, dataset, tmp_path
):
    folder = tmp_path / "exported"
    shutil.copytree(trained_run.out_dir, folder)
    shutil.rmtree(folder / "checkpoints")  # an export folder: model files, no run to resume
    (folder / "run.json").unlink()
    before = snapshot(folder)
    with pytest.raises(ExportError, match="another model"):
        _gpt2(tokenizer_files, vocab_size).train(dataset, num_steps=4, output_dir=folder, **TRAIN)
    assert snapshot(folder) == before


# ----------------------------------------------------------------------------- the run folder


@pytest.mark.slow  # a CLI train: JAX import and tokenizer training in a subprocess
def test_refused_cli_run_changes_no_byte_of_the_existing_run(run_copy, corpus_file):
    before = snapshot(run_copy)
    out = cli(
        "train", "--config", str(ROOT / "configs/tiny.yaml"), "--data", str(corpus_file),
        "--output-dir", str(run_copy), "--model.n_embd=64", "--no-progress", "--samples=0",
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "holds a run with other settings" in out.stderr and "n_embd" in out.stderr
    assert snapshot(run_copy) == before  # the tokenizer was not retrained into it, run.json not rewritten


@pytest.mark.parametrize(
    ("change", "named"),
    [({"batch_size": 8}, "train.batch_size"), ({"seed": 7}, "train.seed")],
)
def test_resume_with_other_settings_says_what_differs(
    run_copy, tokenizer_files, vocab_size, dataset, change, named
):
    before = snapshot(run_copy)
    kw = {**TRAIN, **change}
    with pytest.raises(CheckpointError, match=named) as e:
        _gpt2(tokenizer_files, vocab_size).train(dataset, num_steps=12, output_dir=run_copy, **kw)
    assert "overwrite=True" in str(e.value)
    assert snapshot(run_copy) == before


def test_resume_with_other_data_is_an_error_unless_asked(
    run_copy, tokenizer_files, vocab_size, tmp_path, capsys
):
    vocab, merges = tokenizer_files
    text = tmp_path / "other.txt"
    text.write_text("JULIET: the moon doth shine upon my heart.\n" * 400)
    other = TokenDataset(text, vocab_file=vocab, merges_file=merges, block_size=32, cache_dir=tmp_path / "c")
    before = snapshot(run_copy)
    with pytest.raises(CheckpointError, match=r"the training data.*other.txt") as e:
        _gpt2(tokenizer_files, vocab_size).train(other, num_steps=12, output_dir=run_copy, **TRAIN)
    assert "resume_with_new_data" in str(e.value)
    assert snapshot(run_copy) == before
    _gpt2(tokenizer_files, vocab_size).train(
        other, num_steps=12, output_dir=run_copy, resume_with_new_data=True, **TRAIN
    )
    out = "".join(capsys.readouterr())
    assert "num_steps 8 -> 12" in out and "learning-rate schedule stretches" in out
    assert "resuming from checkpoint step 8" in out


def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(
    run_copy, tokenizer_files, vocab_size, dataset, capsys
):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": "now"}
        (run_copy / LOCK_FILE).write_text(json.dumps(lock))
        before = snapshot(run_copy)
        with pytest.raises(CheckpointError, match=rf"in use by another run \(pid {holder.pid}"):
            _gpt2(tokenizer_files, vocab_size).train(dataset, num_steps=12, output_dir=run_copy, **TRAIN)
        assert snapshot(run_copy) == before
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (as after a kill -9): its lock is reported and taken over.
    _gpt2(tokenizer_files, vocab_size).train(dataset, num_steps=12, output_dir=run_copy, **TRAIN)
    assert "which has ended" in "".join(capsys.readouterr())
    assert not (run_copy / LOCK_FILE).exists()  # released at the end


def test_a_run_whose_folder_is_taken_over_stops_before_its_next_checkpoint(
    run_copy, tokenizer_files, vocab_size, dataset, monkeypatch
):
    # Another run takes the folder over (train.take_over_lock) while this one trains: the lock's
    # next renewal finds its token, and the loop stops before the next save (on every process);
    # the checkpoints so far stay, and the other run's lock is left alone.
    from gpt2_flax import lock
    from gpt2_flax.checkpoint import Checkpointer

    taken: list[lock.FolderLock] = []
    real_acquire, real_save = lock.FolderLock.acquire, Checkpointer.save

    def acquire(self):
        real_acquire(self)
        taken.append(self)

    def save_then_lose_the_folder(self, step, *args, **kwargs):
        real_save(self, step, *args, **kwargs)
        other = {**lock.read_lock(run_copy), "token": "another run's"}
        (run_copy / LOCK_FILE).write_text(json.dumps(other))
        taken[0].renew()  # what the renewal thread does every RENEW_S

    monkeypatch.setattr(lock.FolderLock, "acquire", acquire)
    monkeypatch.setattr(Checkpointer, "save", save_then_lose_the_folder)
    with pytest.raises(CheckpointError, match=r"taken over by another run .*stops before writing"):
        _gpt2(tokenizer_files, vocab_size).train(dataset, num_steps=16, output_dir=run_copy, **TRAIN)
    steps = sorted(int(p.name) for p in (run_copy / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 12  # saved before the loss was found; the final one (16) was not
    assert json.loads((run_copy / LOCK_FILE).read_text())["token"] == "another run's"


def test_in_a_multi_process_run_only_the_primary_checks_the_lock(tmp_path):
    # Every process of a pod run checks the shared folder, but the lock is process 0's own: the
    # others must not read it as another run's (CI saw exactly that race).
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / LOCK_FILE).write_text(
            json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "now"})
        )
        RunDir(tmp_path).check(Config(), "fp", {}, primary=False)
        with pytest.raises(CheckpointError, match="in use by another run"):
            RunDir(tmp_path).check(Config(), "fp", {}, primary=True)
    finally:
        holder.kill()
        holder.wait()


_AGREE = """
import sys, jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
from gpt2_flax.sharding import agree
assert agree(None, "run-" + sys.argv[2]) == "run-0"  # everyone gets process 0's run id
try:
    agree(ValueError("folder is full") if sys.argv[2] == "1" else None, "x")
except Exception as e:
    print(type(e).__name__, e)
"""


def test_a_process_that_is_refused_stops_every_process(tmp_path):
    # One refused process must not leave the others waiting in a collective until a timeout.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _AGREE, str(port), str(i)], env=env, stdout=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "TrainingError process(es) [1] of this run could not start" in outs[0], outs
    assert "ValueError folder is full" in outs[1], outs


@pytest.fixture
def agreed(monkeypatch) -> list[tuple[str | None, str]]:
    """Every `loop.agree` call of the test, as (error type, what failed); one process here, so each
    still raises its error as `agree` does."""
    from gpt2_flax import loop

    calls, real_agree = [], loop.agree

    def agree(error, token, what="could not start"):
        calls.append((type(error).__name__ if error is not None else None, what))
        return real_agree(error, token, what)

    monkeypatch.setattr(loop, "agree", agree)
    return calls


def test_a_first_batch_that_fails_is_agreed_before_the_first_step(
    run_copy, tokenizer_files, vocab_size, dataset, monkeypatch, agreed
):
    # On a pod, a process whose data fails at once (its part of a stream is empty) must stop the
    # others with a message (agree: the 2-process test above), not leave them in the first step's
    # collective until jax.distributed aborts them without one (seen: rc 134, no message).

    def no_text(*args, **kwargs):
        raise DataError("data.txt holds no text for process 1 of 2")
        yield

    monkeypatch.setattr(dataset, "iter_batches", no_text)
    before = {p: snapshot(run_copy / "checkpoints" / p) for p in ("4", "8")}
    with pytest.raises(DataError, match="holds no text for process 1 of 2"):
        _gpt2(tokenizer_files, vocab_size).train(dataset, num_steps=12, output_dir=run_copy, **TRAIN)
    assert ("DataError", "could not read its first batch") in agreed
    assert {p: snapshot(run_copy / "checkpoints" / p) for p in ("4", "8")} == before
    assert not (run_copy / LOCK_FILE).exists()


def test_a_batch_that_fails_mid_run_stops_every_process_before_anything_is_saved(
    run_copy, tokenizer_files, vocab_size, dataset, monkeypatch, agreed
):
    # On several processes, one whose data fails mid-run (a shard gone) must not leave the others
    # in the step's collective until jax.distributed aborts them without a message: it steps on
    # its last good batch and every process stops at the next log or checkpoint (agree), before
    # anything trained on the repeated batch is logged or saved.
    from gpt2_flax import loop

    real_batches = dataset.iter_batches

    def fails_after_one(*args, **kwargs):
        batches = real_batches(*args, **kwargs)
        yield next(batches)
        raise DataError("shard 3 of data.txt went missing")

    monkeypatch.setattr(loop, "_several_processes", lambda: True)
    monkeypatch.setattr(dataset, "iter_batches", fails_after_one)
    before = snapshot(run_copy / "checkpoints")
    with pytest.raises(DataError, match="shard 3 of data.txt went missing"):
        _gpt2(tokenizer_files, vocab_size).train(dataset, num_steps=12, output_dir=run_copy, **TRAIN)
    # steps 9 (its batch) and 10 (the repeat) ran; the log point at 10 agreed and stopped
    assert ("DataError", "could not read a batch; no step after it was logged or saved") in agreed
    assert snapshot(run_copy / "checkpoints") == before
    logged = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in logged if "loss" in r) == 8
    assert not (run_copy / LOCK_FILE).exists()


def test_a_validation_batch_that_fails_on_one_process_stops_every_process(
    run_copy, tokenizer_files, vocab_size, dataset, monkeypatch
):
    # On several processes, one whose validation data fails (or runs out before the others') must not
    # leave the others in the eval step's collective: before each validation batch every process says
    # whether it read one, ran out or failed, and all stop together, before the evaluation is logged.
    from gpt2_flax import loop

    good = next(dataset.eval_batches(TRAIN["batch_size"]))

    class Validation:
        def eval_batches(self, *args, **kwargs):
            yield good
            raise DataError("val.txt went missing")

    said, real_codes = [], loop.process_codes
    monkeypatch.setattr(loop, "process_codes", lambda code: said.append(code) or real_codes(code))
    monkeypatch.setattr(loop, "_several_processes", lambda: True)
    monkeypatch.setattr(dataset, "validation", Validation())
    before = snapshot(run_copy / "checkpoints")
    with pytest.raises(DataError, match="val.txt went missing"):
        _gpt2(tokenizer_files, vocab_size).train(
            dataset, num_steps=12, output_dir=run_copy, eval_every=2, **TRAIN
        )
    assert said == [loop._READ, loop._FAILED]  # the evaluation at step 10: one batch, then the failure
    assert snapshot(run_copy / "checkpoints") == before
    logged = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in logged) == 8 and not any("val_loss" in r for r in logged)
    assert not (run_copy / LOCK_FILE).exists()
    # What the other processes see: a peer that failed, or one whose batches ran out first.
    for peer, message in (
        (loop._FAILED, r"process\(es\) \[1\] of this run could not read a validation batch"),
        (loop._ENDED, r"process\(es\) \[1\] ran out before the others'.*eval_batches=<N>"),
    ):
        monkeypatch.setattr(loop, "process_codes", lambda code, peer=peer: np.array([code, peer]))
        with pytest.raises(TrainingError, match=message):
            list(loop._agreed_eval_batches(lambda: iter([good, good])))


def test_checkpoints_without_run_json_still_refuse_a_finished_run(
    run_copy, tokenizer_files, vocab_size, dataset
):
    (run_copy / "run.json").unlink()  # as written by an older version
    before = snapshot(run_copy)
    with pytest.raises(CheckpointError, match="already holds a run trained to step 8"):
        _gpt2(tokenizer_files, vocab_size).train(dataset, num_steps=8, output_dir=run_copy, **TRAIN)
    assert snapshot(run_copy) == before


def test_damaged_latest_checkpoint_falls_back_and_is_kept(
    run_copy, tokenizer_files, vocab_size, dataset, capsys
):
    for f in (run_copy / "checkpoints" / "8" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(b"garbage")
    _gpt2(tokenizer_files, vocab_size).train(dataset, num_steps=12, output_dir=run_copy, **TRAIN)
    out = "".join(capsys.readouterr())
    assert "checkpoint step 8 cannot be read" in out and "resuming from checkpoint step 4" in out
    kept = [p.name for p in (run_copy / "checkpoints").iterdir() if p.name.startswith("8.unreadable")]
    assert kept, "the damaged checkpoint was deleted"


def test_unwritable_or_full_folder_fails_before_writing(
    tokenizer_files, vocab_size, dataset, tmp_path, monkeypatch
):
    import gpt2_flax.run_dir as rd

    class Full:
        free = 1000

    monkeypatch.setattr(rd.shutil, "disk_usage", lambda _: Full())
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"GiB free but the run needs.*3 checkpoints"):
        _gpt2(tokenizer_files, vocab_size).train(dataset, num_steps=4, output_dir=out, **TRAIN)
    assert not out.exists()


# ----------------------------------------------------------------------------- inputs


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.csv", "id,text\n1,hello world\n2,hello, there friend\n3,bye\n", r"a.csv, line 3: 3 fields"),
        ("b.jsonl", '{"text": "a b"}\n{"body": "b"}\n{"text": "c"}\n', r"b.jsonl, line 2: no 'text' field"),
        ("c.jsonl", '{"text": "a b"}\nnot json\n', r"c.jsonl, line 2: not a JSON object"),
        ("d.csv", 'text\nhello\n""\nbye\n', r"d.csv, line 3: the text field is empty"),
    ],
)
def test_bad_records_are_errors_naming_file_and_line(tokenizer_files, tmp_path, name, text, message):
    vocab, merges = tokenizer_files
    path = tmp_path / "data" / name
    path.parent.mkdir()
    path.write_text(text)
    before = snapshot(path.parent)
    with pytest.raises(DataError, match=message):
        TokenDataset(path, vocab_file=vocab, merges_file=merges, block_size=8, cache_dir=tmp_path / "c")
    assert snapshot(path.parent) == before
    ds = TokenDataset(
        path, vocab_file=vocab, merges_file=merges, block_size=8, cache_dir=tmp_path / "c",
        line_by_line=True, skip_bad_records=True,
    )  # fmt: skip
    assert ds.num_documents == text.count("\n") - 1 - ("csv" in name)  # one bad record skipped


@pytest.mark.slow  # a CLI train that trains a tokenizer before the data check
def test_cli_bad_csv_exits_2_naming_the_line(tmp_path):
    data = tmp_path / "tweets.csv"
    data.write_text("text\n" + "a fine tweet about the moon\n" * 50 + "an, unquoted, comma\n")
    out = cli("train", "--config", str(ROOT / "configs/tiny.yaml"), "--data", str(data), "--output-dir",
              str(tmp_path / "run"), "--data.line_by_line=true", "--no-progress")  # fmt: skip
    assert out.returncode == 2 and "tweets.csv, line 52: 3 fields" in out.stderr, out.stderr[-1500:]
    # The fix as the command line spells it (Python's spelling, skip_bad_records=True, would not run).
    assert "--data.skip_bad_records=true" in out.stderr and "Traceback" not in out.stderr


def test_messages_spell_options_as_the_interface_called(tokenizer_files, tmp_path):
    from gpt2_flax.errors import cli_spelling, spell

    assert (
        spell("data.text_column", "body") == "text_column='body'"
        and spell("overwrite", True) == "overwrite=True"
    )
    with cli_spelling():
        assert spell("data.text_column", "body") == "--data.text_column=body"
        assert (
            spell("overwrite", True) == "--overwrite" and spell("data.header", False) == "--data.header=false"
        )
    data = tmp_path / "rows.csv"
    data.write_text("id,body\n" + "1,some text here\n" * 20)
    vocab, merges = tokenizer_files
    with pytest.raises(DataError, match=r"pass text_column=<name> naming"):
        TokenDataset(
            data, vocab_file=vocab, merges_file=merges, cache_dir=tmp_path / "c", text_column="tweet"
        )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\0\0\0binary", "looks like a binary file"),
        (b"caf\xe9 au lait\n" * 10, "not valid UTF-8"),
    ],
)
def test_tokenizer_training_checks_files_first(tmp_path, content, message):
    bad = tmp_path / "data" / "bad.txt"
    bad.parent.mkdir()
    bad.write_bytes(content)
    out = cli("train-tokenizer", str(bad), "--vocab-size", "300", "--save-path", str(tmp_path / "tok"))
    assert out.returncode == 2 and message in out.stderr and "bad.txt" in out.stderr, out.stderr
    assert not (tmp_path / "tok").exists()
    if message == "not valid UTF-8":  # encoding_errors applies here too
        out = cli("train-tokenizer", str(bad), "--vocab-size", "300", "--save-path", str(tmp_path / "tok"),
                  "--encoding-errors", "replace")  # fmt: skip
        assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"learning_rate": float("nan")}, "train.learning_rate must be a finite number > 0"),
        ({"adam_b2": 1.0}, r"train.adam_b2 must be in \[0, 1\)"),
        ({"warmup_steps": -1}, "train.warmup_steps must be >= 0"),
        ({"save_every": -5}, "train.save_every must be >= 0"),
        ({"batch_size": 3.5}, "train.batch_size: expected int, got 3.5"),
    ],
)
def test_config_numbers_are_range_checked(trained_run, dataset, tmp_path, kw, message):
    args = {**TRAIN, **kw}
    with pytest.raises(ConfigError, match=message):
        trained_run.ai.train(dataset, num_steps=4, output_dir=tmp_path / "o", **args)
    assert not (tmp_path / "o").exists()


def test_cli_config_error_is_fast_and_has_no_traceback(tmp_path):
    start = time.perf_counter()
    out = cli("train", "--config", str(ROOT / "configs/tiny.yaml"), "--train.learning_rate=nan",
              "--output-dir", str(tmp_path / "run"))  # fmt: skip
    assert out.returncode == 2 and "train.learning_rate must be a finite number" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()
    assert time.perf_counter() - start < 15  # no JAX import before the config is checked
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: {n_layer: 2\n")
    out = cli("train", "--config", str(bad_yaml))
    assert out.returncode == 2 and "bad.yaml" in out.stderr and "Traceback" not in out.stderr


def test_model_folder_with_another_tokenizer_is_refused(trained_run, tmp_path):
    from gpt2_flax import train_tokenizer

    text = tmp_path / "t.txt"
    text.write_text("completely different words here, zebra quartz jumps.\n" * 300)
    vocab_size = trained_run.ai.config.vocab_size
    v, m = train_tokenizer(text, vocab_size=vocab_size, save_path=tmp_path / "tok", min_frequency=1)
    with pytest.raises(ConfigError, match="not the one of model_folder"):
        GPT2(model_folder=trained_run.out_dir, vocab_file=v, merges_file=m)


def test_damaged_weights_name_the_file_and_fall_back(trained_run, tmp_path):
    pytest.importorskip("torch")
    folder = tmp_path / "model"
    shutil.copytree(trained_run.out_dir, folder, ignore=shutil.ignore_patterns("checkpoints"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    GPT2(model_folder=folder)  # pytorch_model.bin is good: used instead
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(
        DataError, match=r"model.safetensors cannot be read.*pytorch_model.bin cannot be read"
    ):
        GPT2(model_folder=folder)


def test_bin_with_objects_is_refused_with_our_message(trained_run, tmp_path):
    torch = pytest.importorskip("torch")
    bad = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "evil": Path("/")}, bad)
    with pytest.raises(DataError, match="objects other than tensors") as e:
        GPT2(
            model=bad,
            config=trained_run.out_dir / "config.json",
            tokenizer_file=trained_run.out_dir / "tokenizer.json",
        )
    assert "weights_only=False" not in str(e.value)


def test_truncated_tokenizer_and_config_name_the_file(trained_run, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(trained_run.out_dir, folder, ignore=shutil.ignore_patterns("checkpoints"))
    config = folder / "config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(DataError, match=r"config.json is not a readable config.json"):
        GPT2(model_folder=folder)
    shutil.copy(trained_run.out_dir / "config.json", config)
    tok = folder / "tokenizer.json"
    tok.write_text(tok.read_text()[:100])
    out = cli("generate", "--model-folder", str(folder), "--max-length", "4")
    assert out.returncode == 2 and "tokenizer.json cannot be read" in out.stderr, out.stderr[-1500:]
    assert "Traceback" not in out.stderr


def test_finished_run_asked_for_fewer_steps_changes_nothing(run_copy, tokenizer_files, vocab_size, dataset):
    before = snapshot(run_copy)
    with pytest.raises(CheckpointError, match=r"already holds a run trained to step 8.*num_steps > 8"):
        _gpt2(tokenizer_files, vocab_size).train(
            dataset,
            num_steps=8,
            output_dir=run_copy,
            log_every=4,
            **{k: v for k, v in TRAIN.items() if k != "log_every"},
        )
    assert snapshot(run_copy) == before  # run.json is not rewritten with the new call's settings


def test_lock_of_a_run_on_another_host_is_never_taken_over(run_copy, tokenizer_files, vocab_size, dataset):
    # Its pid cannot be checked from here (a shared folder, e.g. NFS): refused, whatever the pid.
    (run_copy / LOCK_FILE).write_text(json.dumps({"pid": 999999999, "host": "tpu-vm-7", "started": "then"}))
    before = snapshot(run_copy)
    with pytest.raises(CheckpointError, match=r"in use by another run \(pid 999999999 on tpu-vm-7.*delete"):
        _gpt2(tokenizer_files, vocab_size).train(dataset, num_steps=12, output_dir=run_copy, **TRAIN)
    assert snapshot(run_copy) == before


def test_unreadable_vocab_and_merges_name_both_files(tmp_path):
    from gpt2_flax import load_tokenizer

    vocab, merges = tmp_path / "v.json", tmp_path / "m.txt"
    vocab.write_text('{"a": 0, "b":')  # truncated
    merges.write_text("#version: 0.2\na b\n")
    with pytest.raises(
        DataError, match=r"v\.json / .*m\.txt cannot be read as a GPT-2 vocab.json \+ merges.txt"
    ):
        load_tokenizer(vocab, merges)
    (tmp_path / "text.txt").write_text("some text\n")
    args = ["encode", str(tmp_path / "text.txt"), "--vocab-file", str(vocab), "--merges-file", str(merges)]
    out = cli(*args, "--output", str(tmp_path / "cache"))
    assert out.returncode == 2 and "cannot be read as a GPT-2 vocab.json" in out.stderr, out.stderr[-1500:]
    assert "Traceback" not in out.stderr and not (tmp_path / "cache").exists()


def test_disk_full_during_a_save_keeps_the_older_checkpoints(
    run_copy, tokenizer_files, vocab_size, dataset, monkeypatch
):
    # The resumed run's save at step 12 finds the disk full: the error says so and how to go on,
    # the checkpoints already there are untouched and the folder is not left locked.
    import errno

    from gpt2_flax.checkpoint import Checkpointer
    from gpt2_flax.cli import _message

    before = {p: snapshot(run_copy / "checkpoints" / p) for p in ("4", "8")}

    def full(self, step, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Checkpointer, "save", full)
    with pytest.raises(OSError) as err:
        _gpt2(tokenizer_files, vocab_size).train(dataset, num_steps=16, output_dir=run_copy, **TRAIN)
    assert "the disk is full; free space (older checkpoints are intact) and run again" in _message(err.value)
    assert {p: snapshot(run_copy / "checkpoints" / p) for p in ("4", "8")} == before
    assert not (run_copy / LOCK_FILE).exists()


def test_disk_full_in_the_background_save_names_the_step_and_a_rerun_resumes(
    run_copy, tokenizer_files, vocab_size, dataset, monkeypatch
):
    # The asynchronous save of step 12 fails in Orbax's background thread, where it renames the
    # finished step into place: the error reaches the user at the next save/wait as one message
    # naming the step; 4 and 8 stay byte-identical, and the same call later resumes from 8.
    import errno

    from orbax.checkpoint._src.path import async_path

    before = {p: snapshot(run_copy / "checkpoints" / p) for p in ("4", "8")}
    real = async_path.rename

    async def rename(src, dst, *args, **kwargs):
        if Path(str(dst)).name == "12":
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return await real(src, dst, *args, **kwargs)

    monkeypatch.setattr(async_path, "rename", rename)
    message = r"step 12 could not be written .*the disk is full.*intact: run again"
    with pytest.raises(CheckpointError, match=message):
        _gpt2(tokenizer_files, vocab_size).train(dataset, num_steps=16, output_dir=run_copy, **TRAIN)
    assert {p: snapshot(run_copy / "checkpoints" / p) for p in ("4", "8")} == before
    assert not (run_copy / LOCK_FILE).exists()
    monkeypatch.undo()
    history = _gpt2(tokenizer_files, vocab_size).train(dataset, num_steps=16, output_dir=run_copy, **TRAIN)
    assert [r["step"] for r in history] == [10, 12, 14, 16]  # resumed from 8


def test_checkpoint_export_of_a_run_json_without_run_id(run_copy, tmp_path):
    # run.json of an older version has no run_id: the export's lineage is the run folder, so a
    # second export into the same folder replaces the first without --overwrite.
    from gpt2_flax.convert import export_checkpoint

    run = json.loads((run_copy / "run.json").read_text())
    del run["run_id"]
    (run_copy / "run.json").write_text(json.dumps(run))
    export_checkpoint(run_copy, tmp_path / "e", step=4)
    first = (tmp_path / "e" / "model.safetensors").read_bytes()
    export_checkpoint(run_copy, tmp_path / "e", step=8)
    assert (tmp_path / "e" / "model.safetensors").read_bytes() != first
    with pytest.raises(ExportError, match="already holds another model"):
        export_checkpoint(run_copy, run_copy)  # the run's own final export has the run id lineage


def test_a_run_json_from_before_new_model_keys_still_resumes(run_copy, tokenizer_files, vocab_size, dataset):
    # run.json written before model.initializer_range / model.init_from existed: their defaults.
    run = json.loads((run_copy / "run.json").read_text())
    for key in ("initializer_range", "init_from"):
        del run["model"][key]
        del run["config"]["model"][key]
    (run_copy / "run.json").write_text(json.dumps(run))
    history = _gpt2(tokenizer_files, vocab_size).train(dataset, num_steps=10, output_dir=run_copy, **TRAIN)
    assert [r["step"] for r in history] == [10]  # resumed from step 8
