"""WISP's edge speculation controller: features, labels, training, the model file, the CLI.

The trainer is fed run folders written by hand with :class:`harness.results.RunWriter`,
whose rounds follow a known rule: a drafted token is rejected when its draft confidence is
below 0.5 (a steep logistic, so a little noise near the boundary). The controller must learn
it from the four features alone.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from harness.cli import main as cli_main
from harness.results import RunWriter, build_manifest
from harness.train_controller import collect, far_threshold, rates, round_labels, split, train
from systems.records import RequestRecord, RoundRecord
from systems.wisp.controller import FEATURES, RejectionPredictor, draft_features, draft_features_many
from tests.support import shared_scope

TARGET = 0.1
DRAFTED = 5  # tokens drafted per round


def _manifest(system: str) -> dict:
    return build_manifest({"system": system, "pair": "toy"}, {"clock": "virtual", "link": "inprocess"})


def _record(rid: str, system: str, rounds: list[RoundRecord]) -> RequestRecord:
    n = sum(r.emitted for r in rounds)
    return RequestRecord(request_id=rid, system=system, prompt_tokens=5, output_tokens=list(range(n)),
                         start=0.0, end=float(len(rounds)), token_times=[0.5 + 0.01 * i for i in range(n)],
                         rounds=rounds)


def _ctx(rid: str) -> dict:
    return {"pair": "toy", "network": "lan", "workload": "smoke", "prompt_id": rid, "seed": 0}


def _round(rid: str, i: int, features: list, verified: int, accepted: int, **extra) -> RoundRecord:
    return RoundRecord(rid, i, start=float(i), end=i + 0.5, drafted=len(features), uploaded=verified,
                       verified=verified, accepted=accepted, emitted=accepted + 1, wasted=len(features) - accepted,
                       extra={"draft_features": features, **extra})


def _write_run(path, requests: dict[str, list[RoundRecord]], system: str = "wisp", manifest=None):
    with RunWriter(path, manifest or _manifest(system), parquet_every=10_000) as w:
        for rid, rounds in requests.items():
            w.append(_record(rid, system, rounds), _ctx(rid))
    return path


def _synthetic_run(path, seed: int, n_requests: int, n_rounds: int = 6, manifest=None):
    """Rounds whose rejections follow the rule (confidence < 0.5), plus discarded rounds that
    contradict it (they must be ignored)."""
    rng = np.random.default_rng(seed)
    requests = {}
    for r in range(n_requests):
        rid = f"s{seed}-r{r}"
        rounds = []
        for i in range(n_rounds):
            feats = [list(draft_features(rng.normal(size=32) * rng.uniform(2.0, 8.0))) for _ in range(DRAFTED)]
            reject = [rng.random() < 1.0 / (1.0 + math.exp((f[0] - 0.5) / 0.02)) for f in feats]
            accepted = reject.index(True) if any(reject) else DRAFTED
            if i == n_rounds - 1 and r % 4 == 0:
                # discarded: the labels would say every confident token was rejected
                rounds.append(_round(rid, i, feats, verified=DRAFTED, accepted=0, discarded=True))
            else:
                rounds.append(_round(rid, i, feats, verified=DRAFTED, accepted=accepted))
        requests[rid] = rounds
    return _write_run(path, requests, manifest=manifest)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return _manifest("wisp")


@pytest.fixture(scope=shared_scope)
def runs(tmp_path_factory, manifest):
    base = tmp_path_factory.mktemp("wisp_runs")
    return [_synthetic_run(base / f"run{k}", seed=k, n_requests=150, manifest=manifest) for k in range(2)]


@pytest.fixture(scope=shared_scope)
def model(runs) -> RejectionPredictor:
    return train(runs, target_false_alarm=TARGET, hidden=(16, 16), epochs=150, seed=0)


# ---- features -----------------------------------------------------------------------------------


def test_features_of_a_hand_made_row():
    # logits ln 4, ln 2, 0, 0: p = (1/2, 1/4, 1/8, 1/8)
    ln2 = math.log(2.0)
    row = np.array([2 * ln2, ln2, 0.0, 0.0], dtype=np.float32)
    conf, ent, margin, spread = draft_features(row)
    assert conf == pytest.approx(0.5, abs=1e-7)  # float32 logits: ln 2 is off by ~3e-8
    assert ent == pytest.approx(1.75 * ln2, abs=1e-7)  # 1/2 ln 2 + 1/4 ln 4 + 2 (1/8 ln 8)
    assert margin == pytest.approx(0.25, abs=1e-7)
    assert spread == pytest.approx(ln2 * math.sqrt(1.25 - 0.75 ** 2), abs=1e-7)  # ln 2 * std(2, 1, 0, 0)
    exact = draft_features([2 * ln2, ln2, 0.0, 0.0])
    assert exact == pytest.approx((0.5, 1.75 * ln2, 0.25, ln2 * math.sqrt(0.6875)), rel=1e-14)
    # a masked (-inf) token has no probability and no place in the spread
    assert draft_features([2 * ln2, ln2, 0.0, -np.inf, 0.0]) == pytest.approx(exact, rel=1e-14)
    assert draft_features([3.0]) == (1.0, 0.0, 1.0, 0.0)
    assert all(isinstance(v, float) for v in exact)


def _features_before_the_speed_work(logits):
    """draft_features as it was written before it was vectorised (git bb24c8f), verbatim: the
    trained controllers in systems/wisp/trained/ were fitted to these definitions."""
    from systems.sampling import softmax

    z = np.asarray(logits, dtype=np.float64)
    finite = z[np.isfinite(z)]
    p = softmax(z)
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    if p.size == 1:
        top1, top2 = float(p[0]), 0.0
    else:
        top2, top1 = (float(v) for v in np.partition(p, p.size - 2)[-2:])
    return top1, max(entropy, 0.0), top1 - top2, float(finite.std())


def _rows_of_every_kind():
    """Rows of the fitted pair's and the toy's drafts, random ones of many widths and scales,
    masked tokens (-inf), probabilities that underflow to 0, one- and two-token rows."""
    from systems.engines import create_engine
    from systems.engines.fitted import FittedEngine
    from tests.test_fitted_pair import category

    rng = np.random.default_rng(7)
    fitted = FittedEngine("draft", categories={"default": category()}, vocab_size=256, seed=1)
    toy = create_engine("toy", role="draft", vocab_size=64, seed=0, agreement=0.8)
    blocks = [np.stack([fitted.logits_for([int(x) for x in rng.integers(1, 256, size=int(rng.integers(1, 30)))])
                        for _ in range(k)]) for k in (1, 2, 4, 5, 8) for _ in range(20)]
    s = toy.new_session()
    blocks += [s.prefill([int(x) for x in rng.integers(1, 64, size=9)])[None, :]]
    blocks += [np.asarray(s.score([int(x) for x in rng.integers(1, 64, size=k)])) for k in (1, 3, 6)]
    blocks += [rng.normal(0, scale, size=(k, v)).astype(np.float32) for scale in (0.3, 4.0, 40.0)
               for v in (2, 3, 64, 1000) for k in (1, 4)]
    masked = rng.normal(0, 2, size=(3, 50))
    masked[:, ::3] = -np.inf
    blocks += [masked, np.array([[0.0, -800.0, 1.0], [2.0, 2.0, -1.0]]), np.array([[1.5]]), np.array([[3.0, 3.0]])]
    return blocks


def test_the_vectorised_features_are_those_of_the_definitions_before():
    """draft_features (one row) and draft_features_many (a round's rows at once) give every row
    the features the original per-row code gives it, to 1e-9 (bit for bit on this suite's
    machine: the same arithmetic in the same order)."""
    n = 0
    for block in _rows_of_every_kind():
        want = [_features_before_the_speed_work(r) for r in block]
        for got in ([draft_features(r) for r in block], draft_features_many(block)):
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert np.allclose(g, w, rtol=0.0, atol=1e-9), (g, w)
                n += 1
    assert n > 400


def test_features_refuse_bad_rows():
    for bad in ([], [[1.0, 2.0]], [1.0, float("nan")], [-np.inf, -np.inf], [1.0, np.inf]):
        with pytest.raises(ValueError):
            draft_features(bad)


def test_controller_module_imports_no_torch():
    code = "import sys, systems.wisp.controller; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- labels -------------------------------------------------------------------------------------


def test_round_labels_follow_the_verdict():
    assert round_labels(5, verified=4, accepted=2) == [False, False, True]  # 2 left unlabelled
    assert round_labels(5, verified=4, accepted=4) == [False] * 4  # all judged accepted; the 5th never judged
    assert round_labels(5, verified=5, accepted=0) == [True]
    assert round_labels(5, verified=4, accepted=2, extra={"discarded": True}) == []
    assert round_labels(2, verified=4, accepted=2) == [False, False]  # no features for the rejected token


def test_collect_labels_a_hand_made_round(tmp_path):
    feats = [[0.9, 0.1, 0.8, 3.0], [0.8, 0.2, 0.7, 2.5], [0.3, 1.5, 0.1, 1.0], [0.2, 2.0, 0.05, 0.5],
             [0.1, 2.5, 0.01, 0.2]]
    run = _write_run(tmp_path / "run", {
        "a": [_round("a", 0, feats, verified=4, accepted=2),
              _round("a", 1, feats, verified=5, accepted=1, discarded=True)],
    })
    data = collect([run])
    assert data.features.tolist() == feats[:3]
    assert data.rejected.tolist() == [False, False, True]
    assert data.pair == "toy" and data.sources == ["run"]  # outside the working directory: the folder's name, no machine path
    assert data.request.tolist() == [0, 0, 0]


# ---- training -----------------------------------------------------------------------------------


def test_trained_controller_learns_the_rule(model):
    m = model.metrics
    assert m["n_test"] > 500 and m["test_rejected"] > 100
    # The threshold spends the whole false-alarm budget (10% of accepted tokens flagged), so
    # precision is capped near rejected / (rejected + 0.1 * accepted), about 0.8 here.
    assert m["recall"] >= 0.9
    assert m["precision"] >= 0.7
    # The held-out false-alarm rate is a binomial estimate over the held-out accepted tokens,
    # of a threshold that is itself a quantile estimated over the training accepted tokens:
    # sd ~ sqrt(t (1 - t) (1/n_test + 1/n_train)) (about 0.014 here). Four of those.
    sd = math.sqrt(TARGET * (1 - TARGET) * (1 / m["test_accepted"] + 1 / m["train_accepted"]))
    assert abs(m["false_alarm_rate"] - TARGET) <= 4 * sd
    assert m["target_false_alarm"] == TARGET and m["pair"] == "toy" and len(m["source_runs"]) == 2
    assert m["n_train"] == m["train_accepted"] + m["train_rejected"]
    assert model.hidden == (16, 16)
    # the controller stops on an unsure token and drafts on through a sure one
    assert model.stop(draft_features([1.0, 0.9, 0.8, 0.7, 0.6]))
    assert not model.stop(draft_features([12.0, 0.0, 0.0, 0.0]))


def test_threshold_is_the_smallest_meeting_the_training_false_alarm_rate(runs, model):
    data = collect(runs)
    held = split(data.groups("request"), 0.25, seed=0)
    assert model.metrics["n_test"] == int(held.sum())
    # the split keeps requests whole
    assert not set(data.request[held]) & set(data.request[~held])
    p = model.p_reject_many(data.features[~held & ~data.rejected])
    far = lambda t: float((p >= t).mean())  # noqa: E731
    assert far(model.threshold) <= TARGET
    assert far(np.nextafter(model.threshold, -np.inf)) > TARGET
    assert model.metrics["train_false_alarm_rate"] == pytest.approx(far(model.threshold))
    # held-out figures as rates() gives them from the model's own stop decisions
    stops = np.array([model.stop(f) for f in data.features[held]])
    got = rates(stops, data.rejected[held])
    assert (got["precision"], got["recall"], got["false_alarm_rate"]) == (
        model.metrics["precision"], model.metrics["recall"], model.metrics["false_alarm_rate"])


def test_far_threshold_edge_cases():
    p = np.array([0.9, 0.8, 0.8, 0.5, 0.1])
    assert far_threshold(p, 0.0) == np.nextafter(0.9, 1.0)  # nothing may be flagged
    assert far_threshold(p, 0.2) == np.nextafter(0.8, 1.0)  # one allowed, but 0.8 is a tie: flag 0.9 only
    assert far_threshold(p, 0.6) == np.nextafter(0.5, 1.0)  # three allowed
    assert far_threshold(p, 0.99) == np.nextafter(0.1, 1.0)
    assert far_threshold(np.full(30, 0.5), 0.1) == np.nextafter(0.5, 1.0)
    assert far_threshold(np.array([0.3]), 0.99) == np.nextafter(0.3, 1.0)


def test_training_is_deterministic_and_seeded(tmp_path):
    run = _synthetic_run(tmp_path / "run", seed=7, n_requests=20)
    a = train([run], epochs=5, seed=3, hidden=(4,))
    b = train([run], epochs=5, seed=3, hidden=(4,))
    c = train([run], epochs=5, seed=4, hidden=(4,))
    for (wa, ba), (wb, bb) in zip(a.layers, b.layers):
        assert np.array_equal(wa, wb) and np.array_equal(ba, bb)
    assert a.threshold == b.threshold and a.metrics == b.metrics
    assert not np.array_equal(a.layers[0][0], c.layers[0][0])


# ---- the model file -----------------------------------------------------------------------------


def test_save_load_round_trips_exactly(model, runs, tmp_path):
    path = model.save(tmp_path / "sub" / "controller.json")
    back = RejectionPredictor.load(path)
    x = collect(runs).features
    assert np.array_equal(back.p_reject_many(x), model.p_reject_many(x))
    assert [back.stop(f) for f in x[:300]] == [model.stop(f) for f in x[:300]]
    assert back.threshold == model.threshold and back.hidden == model.hidden
    assert back.metrics == json.loads(json.dumps(model.metrics)) and back.training == model.training
    data = json.loads(path.read_text())
    assert data["format"] == "specwan.wisp_controller" and data["version"] == 1
    assert data["features"] == list(FEATURES) and "WISP-like" in data["note"]
    assert [len(layer["W"]) for layer in data["layers"]] == [16, 16, 1]


@pytest.mark.parametrize("change, problem", [
    (None, "no such controller file"),
    ("{not json", "not valid JSON"),
    (lambda d: d.update(format="other"), "not a WISP controller file"),
    (lambda d: d.update(version=99), "format version 99"),
    (lambda d: d["layers"][1].update(W=[[0.0] * 3] * 16), "layer 1"),
    (lambda d: d["layers"].pop(), "the last layer has 16 outputs"),
    (lambda d: d["normaliser"].update(std=[1.0, 0.0, 1.0, 1.0]), "normaliser"),
    (lambda d: d.update(threshold="high"), "'threshold' must be a number"),
    (lambda d: d["layers"][0].update(b="x"), "layer 0 b"),
])
def test_load_errors_name_the_file_and_the_problem(model, tmp_path, change, problem):
    path = tmp_path / "controller.json"
    if isinstance(change, str):
        path.write_text(change)
    elif change is not None:
        data = model.to_dict()
        change(data)
        path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        RejectionPredictor.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message


# ---- errors -------------------------------------------------------------------------------------


def _one_line_error(fn, *words):
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


def test_training_errors_are_one_line(tmp_path):
    _one_line_error(lambda: train([]), "no run folders", "system=sled or system=wisp")
    vanilla = tmp_path / "vanilla"
    with RunWriter(vanilla, _manifest("vanilla")) as w:
        w.append(_record("a", "vanilla", [RoundRecord("a", 0, 0.0, 1.0, drafted=4, verified=4, accepted=4,
                                                       emitted=5)]), _ctx("a"))
    _one_line_error(lambda: train([vanilla]), str(vanilla), "system=vanilla", "system=sled or system=wisp")
    _one_line_error(lambda: train([tmp_path / "nowhere"]), "nowhere", "cannot be read as a run folder")
    few = _write_run(tmp_path / "few", {"a": [_round("a", 0, [[0.9, 0.1, 0.8, 3.0]] * 3, verified=3, accepted=2)]})
    _one_line_error(lambda: train([few]), "only 3 labelled token(s)", "at least 20")
    sure = [[0.9, 0.1, 0.8, 3.0]] * 5
    all_ok = _write_run(tmp_path / "all_ok", {f"r{i}": [_round(f"r{i}", 0, sure, verified=5, accepted=5)]
                                               for i in range(6)})
    _one_line_error(lambda: train([all_ok]), "no rejected token")
    _one_line_error(lambda: train([all_ok], target_false_alarm=1.0), "target false-alarm rate")
    bad = _write_run(tmp_path / "bad", {"a": [_round("a", 0, [[0.9, 0.1]], verified=1, accepted=0)]})
    _one_line_error(lambda: train([bad]), "draft_features[0]", "4 finite numbers")


# ---- the command line ---------------------------------------------------------------------------


def test_cli_trains_prints_and_writes(tmp_path, capsys):
    runs = [_synthetic_run(tmp_path / f"run{k}", seed=10 + k, n_requests=40) for k in range(2)]
    out = tmp_path / "models" / "wisp.json"
    status = cli_main(["train-controller", *map(str, runs), "--out", str(out), "--target-false-alarm", "0.2",
                       "--hidden", "8", "--epochs", "40", "--seed", "1"])
    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4, lines
    assert lines[0].startswith("labelled tokens: train ") and "held-out " in lines[0] and "rejected" in lines[0]
    assert lines[1].startswith("threshold ") and "target 0.2" in lines[1]
    assert lines[2].startswith("held-out: precision ") and "recall " in lines[2]
    assert "false-alarm rate " in lines[2] and lines[2].endswith("(target 0.2)")
    assert lines[3] == f"wrote {out}"
    model = RejectionPredictor.load(out)
    m = model.metrics
    assert model.hidden == (8,) and m["target_false_alarm"] == 0.2 and model.training["seed"] == 1
    assert f"train {m['n_train']} ({m['train_accepted']} accepted, {m['train_rejected']} rejected)" in lines[0]
    assert f"precision {m['precision']:.3f}" in lines[2]


def test_cli_folder_without_features_is_one_line_status_2(tmp_path, capsys):
    vanilla = tmp_path / "vanilla"
    with RunWriter(vanilla, _manifest("vanilla")) as w:
        w.append(_record("a", "vanilla", [RoundRecord("a", 0, 0.0, 1.0, drafted=4, verified=4, accepted=4,
                                                       emitted=5)]), _ctx("a"))
    assert cli_main(["train-controller", str(vanilla), "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("specwan: error: ") and "system=sled or system=wisp" in err[0]
    assert not (tmp_path / "m.json").exists()
    assert cli_main(["train-controller", str(vanilla), "--out", "m.json", "--hidden", "8,x"]) == 2
    assert "--hidden" in capsys.readouterr().err
