"""The Python binding of the fedhive device SDK against a real server.

Two devices, each with 500 Fashion-MNIST images passed as bytes, join a FedAvg task of the built-in
MLP and train until it finishes (2 rounds of 2 devices). Device 0 cancels its first round from the
progress callback and resumes it on the next call. Then the server's rounds are checked over HTTP:
every round committed with both updates, each counted once.

Run by the end-to-end test `tests/tests/bindings.rs` (which generates `fedhive_ffi.py` from the
built library and starts the server); exits non-zero on any failure.
"""

import argparse
import gzip
import json
import struct
import sys
import threading
import time
import urllib.request

import fedhive_ffi as fh

DATA = "/usr/share/datasets/fashion-mnist"
PIXELS = 28 * 28


def fashion_mnist(first, n):
    """Images `first..first+n` of the training set: (pixels as bytes, labels as bytes)."""
    with gzip.open(f"{DATA}/train-images-idx3-ubyte.gz") as f:
        magic, count, rows, cols = struct.unpack(">IIII", f.read(16))
        assert (magic, rows * cols) == (2051, PIXELS), (magic, rows, cols)
        f.read(first * PIXELS)
        pixels = f.read(n * PIXELS)
    with gzip.open(f"{DATA}/train-labels-idx1-ubyte.gz") as f:
        magic, count = struct.unpack(">II", f.read(8))
        assert magic == 2049, magic
        f.read(first)
        labels = f.read(n)
    return pixels, labels


class Stages(fh.ProgressListener):
    """Records the stages it hears; optionally cancels the round at its first training step."""

    def __init__(self, session=None):
        self.heard = []
        self.cancel_session = session

    def on_progress(self, stage, round_id, step, total_steps):
        self.heard.append(stage)
        if stage == "training" and self.cancel_session is not None:
            self.cancel_session.cancel()
            self.cancel_session = None


def run_device(session, results, name, cancel_first):
    try:
        outcomes = []
        if cancel_first:
            listener = Stages(session)
            first = session.run_round(fh.RoundLimits(max_wall_time_ms=None, max_network_bytes=None), listener)
            assert first.is_stopped() and first.reason == "cancelled", first
            assert listener.heard[:3] == ["checked_in", "downloaded", "training"], listener.heard
            outcomes.append(("stopped", first.round_id))
        while True:
            listener = Stages()
            r = session.run_round(fh.RoundLimits(max_wall_time_ms=600_000, max_network_bytes=None), listener)
            if r.is_contributed():
                assert listener.heard[-2:] == ["upload_acknowledged", "reported"], listener.heard
                assert r.loss > 0 and r.num_samples == 500, r
                outcomes.append(("contributed", r.round_id, r.resumed))
            elif r.is_not_now():
                time.sleep(r.retry_after_ms / 1000)
            elif r.is_finished():
                outcomes.append(("finished", r.model_version))
                break
            else:
                raise AssertionError(f"{name}: unexpected {r}")
        results[name] = outcomes
    except BaseException as e:  # reported by the main thread
        results[name] = e


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--admin-token", required=True)
    p.add_argument("--state", required=True)
    args = p.parse_args()

    task = fh.create_builtin_task(args.server, args.admin_token, fh.BuiltinModel.MLP, 2, 2, True)
    key = fh.create_enrolment_key(args.server, args.admin_token, "python-test")

    # Bad input is a Python exception with a message, not a crash.
    try:
        fh.DeviceSession(args.server, task, f"{args.state}/bad", fh.BuiltinModel.MLP, b"\0" * 10, b"\1", None)
        raise AssertionError("10 pixels for 1 label were accepted")
    except fh.FedhiveError as e:
        assert "784 per label" in str(e), e

    sessions = []
    for i in range(2):
        pixels, labels = fashion_mnist(i * 500, 500)
        s = fh.DeviceSession(args.server, task, f"{args.state}/device-{i}", fh.BuiltinModel.MLP, pixels, labels, i)
        device_id = s.enrol(key)
        assert s.enrol(key) == device_id, "a second enrol must keep the stored identity"
        sessions.append(s)

    results = {}
    threads = [
        threading.Thread(target=run_device, args=(s, results, f"device-{i}", i == 0)) for i, s in enumerate(sessions)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    for name, outcome in sorted(results.items()):
        if isinstance(outcome, BaseException):
            raise outcome
        print(name, outcome)
    assert len(results) == 2, results
    # Device 0's cancelled round was resumed, not redone: its first contribution says so.
    assert results["device-0"][1] == ("contributed", results["device-0"][0][1], True), results["device-0"]

    request = urllib.request.Request(
        f"{args.server}/v1/tasks/{task}/rounds", headers={"Authorization": f"Bearer {args.admin_token}"}
    )
    rounds = json.load(urllib.request.urlopen(request))
    summary = [(r["state"], r["accepted"], r["total_samples"]) for r in rounds]
    print("rounds", summary)
    assert summary == [("committed", 2, 1000)] * 2, summary
    print("python binding: 2 devices completed 2 rounds of a real task")


if __name__ == "__main__":
    sys.exit(main())
