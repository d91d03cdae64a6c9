"""Sentiment: data loading, the feeling proxy, the probe, batching, the feature cache, the sentiment trace, CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from core.errors import UserError
from core.hooks import Hooks
from core.sentiment import (
    CLASSES,
    FeelingProxy,
    LabelledTexts,
    LinearReader,
    SentimentDataError,
    confusion,
    evaluate,
    extract_features,
    load_labelled,
    load_project_texts,
    make_prompt,
    probe_layer_sweep,
    read_texts,
    word_ids,
)
from core.sentiment_trace import (
    CATEGORIES,
    average_sentiment_trace,
    default_proxy,
    text_token_range,
    trace_sentiment,
)

ROOT = Path(__file__).resolve().parent.parent
TWEETS = ROOT.parent / "shared" / "data" / "tweeteval_sentiment"

SHORT = [
    "I love it!",
    "This is awful.",
    "Great day at the beach with friends",
    "The bus was late again",
    "What a wonderful surprise",
    "I hate waiting",
    "Best pizza ever",
    "Worst service in town, never again",
]
SHORT_LABELS = np.array([1, 0, 1, 0, 1, 0, 1, 0])


def labelled(texts=SHORT, labels=SHORT_LABELS) -> LabelledTexts:
    return LabelledTexts(list(texts), np.asarray(labels), "test")


# ---------------------------------------------------------------------------------------------- data


def test_load_tsv_with_word_labels_drops_neutral(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("text\tlabel\nI love it\tpositive\nmeh\tneutral\nI hate it\tNegative\n  so good  \tPOSITIVE\n")
    data = load_labelled(path)
    assert data.texts == ["I love it", "I hate it", "so good"]
    assert data.labels.tolist() == [1, 0, 1]
    assert data.neutral_dropped == 1
    assert data.counts() == {"negative": 1, "positive": 2}


def test_load_csv_with_01_labels_quotes_and_bytes():
    raw = b'text,label\n"Hello, world",1\n"He said ""no""",0\n'
    data = load_labelled(raw, name="upload.csv")
    assert data.texts == ["Hello, world", 'He said "no"']
    assert data.labels.tolist() == [1, 0]
    assert load_labelled(io.BytesIO(raw), name="x.csv").texts == data.texts


@pytest.mark.parametrize(
    "content, message",
    [
        ("words\tlabel\nhi\tpositive\n", "columns 'text' and 'label'"),
        ("text\tlabel\nhi\tgreat\n", "row 2"),
        ("text\tlabel\nhi\tpositive\n\t0\n", "row 3 of"),
        ("text\tlabel\nhi\tneutral\n", "no positive or negative rows"),
        ("", "is empty"),
        ('text,label\n"open quote,1\n', "cannot be parsed"),
    ],
)
def test_malformed_files_raise_one_clear_error(tmp_path, content, message):
    path = tmp_path / ("d.csv" if "," in content.split("\n")[0] else "d.tsv")
    path.write_text(content)
    with pytest.raises(SentimentDataError, match=message) as err:
        load_labelled(path)
    assert "\n" not in str(err.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_labelled(tmp_path / "nope.tsv")
    bad = tmp_path / "latin.tsv"
    bad.write_bytes("text\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_labelled(bad)


def test_project_set_is_large_balanced_and_has_neutral():
    frame_rows = (ROOT / "data" / "sentiment_texts.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert len(frame_rows) >= 240
    assert len(set(frame_rows)) == len(frame_rows)
    data = load_project_texts()
    counts = data.counts()
    assert counts["positive"] == counts["negative"] >= 100
    assert data.neutral_dropped >= 20


# ------------------------------------------------------------------------------- proxy mechanics


def test_word_pair_must_be_single_distinct_tokens(tiny):
    assert word_ids(tiny, (" good", " bad")) == (1123, 3309)
    with pytest.raises(UserError, match="single-token"):
        word_ids(tiny, (" good", " unbelievably"))
    with pytest.raises(UserError, match="same token"):
        word_ids(tiny, (" good", " good"))
    with pytest.raises(UserError, match="exactly two"):
        word_ids(tiny, (" good",))


def test_batched_padded_reading_equals_one_text_at_a_time(tiny):
    texts = SHORT[:5]
    batched = read_texts(tiny, texts, layers=[0, tiny.num_layers - 1])
    single = read_texts(tiny, texts, layers=[0, tiny.num_layers - 1], max_rows=1)
    assert len({len(p) for p in tiny.tokenizer([make_prompt(t) for t in texts])["input_ids"]}) > 1  # padding happens
    np.testing.assert_allclose(batched.final, single.final, atol=1e-4)
    for layer in batched.hidden:
        np.testing.assert_allclose(batched.hidden[layer], single.hidden[layer], atol=1e-4)
    # and equals a plain forward of one prompt, read at its last token
    ids = torch.tensor([tiny.tokenizer(make_prompt(texts[2]))["input_ids"]])
    name = tiny.arch.layer_name(tiny.model, 0)
    with torch.no_grad(), Hooks(tiny.model, record=[name]) as hooks:
        logits = tiny.model(input_ids=ids).logits[0, -1]
    np.testing.assert_allclose(batched.hidden[0][2], hooks.outputs[name][0, -1].numpy(), atol=1e-4)
    expected = torch.log_softmax(logits.double(), -1)[[1123, 3309]].numpy()
    np.testing.assert_allclose(batched.feeling(tiny)[2], expected, atol=1e-4)


def test_read_texts_reports_progress_and_rejects_bad_layers(tiny):
    calls = []
    features = read_texts(tiny, SHORT, progress=lambda d, t: calls.append((d, t)), max_rows=3)
    assert calls[0] == (0, len(SHORT)) and calls[-1] == (len(SHORT), len(SHORT))
    assert features.final.shape == (len(SHORT), tiny.hidden_size) and features.hidden == {}
    with pytest.raises(UserError, match="layer 99"):
        read_texts(tiny, SHORT, layers=[99])
    with pytest.raises(UserError, match="no texts"):
        read_texts(tiny, [])


def test_linear_reader_matches_scikit_learn_and_round_trips():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    y = (x[:, 0] - x[:, 2] + 0.3 * rng.normal(size=60) > 0).astype(int)
    reader = LinearReader.fit(x, y)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000)).fit(x, y)
    np.testing.assert_allclose(reader.positive_probability(x), pipe.predict_proba(x)[:, 1], atol=1e-8)
    again = LinearReader.from_dict(json.loads(json.dumps(reader.to_dict())))
    np.testing.assert_allclose(again.decision(x), reader.decision(x))
    with pytest.raises(UserError, match="both positive and negative"):
        LinearReader.fit(x, np.ones(60, dtype=int))


def test_feeling_proxy_metric_from_logits_equals_its_prediction(tiny):
    features = read_texts(tiny, SHORT)
    proxy = FeelingProxy.fit(tiny, features, SHORT_LABELS)
    head = tiny.model.get_submodule(tiny.arch.lm_head)
    with torch.no_grad():
        logits = head(torch.from_numpy(features.final))
    from_logits = proxy.positive_probability_from_logits(logits).numpy()
    np.testing.assert_allclose(from_logits, proxy.reader.positive_probability(features.feeling(tiny)), atol=1e-5)
    again = FeelingProxy.from_dict(json.loads(json.dumps(proxy.to_dict())))
    assert again.word_ids == proxy.word_ids and again.suffix == " I am feeling"
    assert (again.predict(tiny, features) == proxy.predict(tiny, features)).all()


def test_evaluate_reports_on_tiny_models(tiny):
    train, test = labelled(), labelled(SHORT[::-1], SHORT_LABELS[::-1])
    report = evaluate(tiny, train, test, proxy="feeling")
    assert report.n == 8 and report.counts == {"negative": 4, "positive": 4}
    assert np.asarray(report.confusion).sum() == 8 and np.asarray(report.confusion).sum(axis=1).tolist() == [4, 4]
    assert report.accuracy == pytest.approx(np.trace(np.asarray(report.confusion)) / 8)
    assert report.texts_per_second > 0 and report.layer is None
    probe = evaluate(tiny, train, test, proxy="probe")
    assert set(probe.layer_sweep) == set(range(tiny.num_layers)) and probe.layer in probe.layer_sweep
    assert probe.as_dict()["confusion_labels"] == list(CLASSES)
    fixed = evaluate(tiny, train, test, proxy="probe", layer=1)
    assert fixed.layer == 1 and fixed.layer_sweep == {}
    on_train = evaluate(tiny, train, train, proxy="probe", layer=1)  # the train accuracy is the fit's own score
    assert fixed.train_accuracy == pytest.approx(on_train.accuracy)


def test_evaluate_rejects_bad_options(tiny):
    with pytest.raises(UserError, match="unknown proxy"):
        evaluate(tiny, labelled(), labelled(), proxy="vibes")
    with pytest.raises(UserError, match="layer 7 does not exist"):
        evaluate(tiny, labelled(), labelled(), proxy="probe", layer=7)
    with pytest.raises(UserError, match="single-token"):
        evaluate(tiny, labelled(), labelled(), words=(" good", " unbelievably"))
    with pytest.raises(UserError, match="both positive and negative"):
        evaluate(tiny, labelled(SHORT[:2], [1, 1]), labelled())


def test_confusion_rows_are_true_labels():
    assert confusion(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0])) == [[1, 1], [1, 2]]


def test_probe_sweep_finds_the_informative_layer():
    rng = np.random.default_rng(1)
    y = np.tile([0, 1], 30)
    noise = {l: rng.normal(size=(60, 8)).astype(np.float32) for l in range(3)}
    noise[2][:, 0] += 3 * (2 * y - 1)
    from core.sentiment import Features

    sweep = probe_layer_sweep(Features(np.zeros((60, 8), np.float32), noise, 0, 0.0), y)
    assert max(sweep, key=sweep.get) == 2 and sweep[2] > 0.9 > sweep[0]


def test_feature_cache_reuses_reads_and_notices_edits(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("ROME_STUDIO_CACHE", str(tmp_path))
    first = extract_features(tiny, SHORT, layers=[1], cache=True)
    assert not first.cached and first.texts_per_second > 0
    second = extract_features(tiny, SHORT, layers=[1, 2], cache=True)
    assert second.cached and second.seconds == 0.0 and second.texts_per_second is None
    np.testing.assert_array_equal(second.final, first.final)
    np.testing.assert_array_equal(second.hidden[1], first.hidden[1])
    with torch.no_grad():
        tiny.arch.mlp_out_weight(tiny.model, 0)[0, 0] += 1.0  # an edit: the cache must not answer
    assert not extract_features(tiny, SHORT, cache=True).cached


# ------------------------------------------------------------------------------------------- trace


def test_text_token_range_excludes_the_suffix(tokenizer, tiny):
    ids, (start, end) = text_token_range(tiny, "I love this song!")
    tokens = [tokenizer.decode([i]) for i in ids]
    assert tokens[end:] == [" I", " am", " feeling"] and start == 0
    assert "".join(tokens[start:end]) == "I love this song!"


def test_trace_sentiment_on_tiny_models(tiny):
    proxy = FeelingProxy.fit(tiny, read_texts(tiny, SHORT), SHORT_LABELS)
    text = "The soup was cold."
    result = trace_sentiment(tiny, text, proxy, samples=2)
    n = len(result.tokens)
    assert result.tokens[-3:] == [" I", " am", " feeling"]
    assert result.corrupt_range == result.text_range == (0, n - 3)
    assert set(result.scores) == {"hidden", "mlp", "attn"}
    assert all(table.shape == (n, tiny.num_layers) for table in result.scores.values())
    # the clean score is the proxy's own probability for the text
    clean = proxy.reader.positive_probability(read_texts(tiny, [text]).feeling(tiny))[0]
    assert result.clean_score == pytest.approx(clean, abs=1e-5)
    # restoring the last token's final hidden state gives back the clean score
    assert result.scores["hidden"][-1, -1] == pytest.approx(result.clean_score, abs=1e-5)
    assert result.category_effects("mlp").shape == (len(CATEGORIES), tiny.num_layers)
    span = trace_sentiment(tiny, text, proxy, span="cold", kinds=("hidden",), samples=1)
    start, end = span.corrupt_range
    assert "".join(span.tokens[start:end]).strip() == "cold"
    assert np.allclose(span.scores["hidden"][:start], span.corrupted_score)  # noise cannot reach earlier tokens


def test_sentiment_and_fact_json_name_the_scores_alike(tokenizer):
    from core.tiny import tiny_model
    from core.tracing import trace

    lm = tiny_model("gpt2", tokenizer)
    proxy = FeelingProxy.fit(lm, read_texts(lm, SHORT), SHORT_LABELS)
    sentiment = trace_sentiment(lm, "The soup was cold.", proxy, kinds=("hidden",), samples=1)
    fact = trace(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower", kinds=("hidden",), samples=1)
    sentiment_json, fact_json = sentiment.as_dict(), fact.to_json()
    for data, result in ((sentiment_json, sentiment), (fact_json, fact)):
        # the JSON keeps the paper's names: high = the clean run's score, low = the corrupted runs' mean
        assert (data["high_score"], data["low_score"]) == (result.clean_score, result.corrupted_score)
        assert "clean_score" not in data and "corrupted_score" not in data
    assert {k for k in sentiment_json if k.endswith("_score")} == {k for k in fact_json if k.endswith("_score")}
    assert sentiment.clean_score != sentiment.corrupted_score and fact.clean_score != fact.corrupted_score


def test_trace_sentiment_bad_input(tiny):
    proxy = FeelingProxy.fit(tiny, read_texts(tiny, SHORT), SHORT_LABELS)
    with pytest.raises(UserError, match="empty"):
        trace_sentiment(tiny, "   ", proxy)
    with pytest.raises(UserError, match="does not occur"):
        trace_sentiment(tiny, "The soup was cold.", proxy, span="pizza")
    with pytest.raises(UserError, match="capped at 8"):
        trace_sentiment(tiny, "The soup was cold and the bread was stale.", proxy, max_tokens=8)
    with pytest.raises(UserError, match="token range inside"):
        trace_sentiment(tiny, "The soup was cold.", proxy, span=(2, 9))
    other = FeelingProxy.from_dict({**proxy.to_dict(), "model": "another"})
    with pytest.raises(UserError, match="fitted for another"):
        trace_sentiment(tiny, "The soup was cold.", other)


def test_sentiment_estimate_has_no_length_cap_and_one_trace_for_all_kinds(tiny):
    proxy = FeelingProxy.fit(tiny, read_texts(tiny, SHORT), SHORT_LABELS)
    long_text = " ".join(["The soup was cold and the bread was stale."] * 8)
    with pytest.raises(UserError, match="capped at 48"):
        trace_sentiment(tiny, long_text, proxy, samples=1)
    seen = []
    result = trace_sentiment(
        tiny, long_text, proxy, samples=2, engine="estimate", on_kind=lambda trace, kind: seen.append(kind)
    )
    assert seen == ["hidden", "mlp", "attn"] and result.engine == "estimate"
    assert len(result.tokens) > 48
    assert all(((t > 0) & (t < 1)).all() for t in result.scores.values())  # p(positive), read in log-odds
    # beyond the model's context (128 positions for the tiny models): one clear line
    with pytest.raises(UserError, match="reads at most 128"):
        trace_sentiment(tiny, " ".join([long_text] * 3), proxy, samples=1, engine="estimate")
    # the exact engines: the same shapes, the estimate's clean and corrupted scores
    exact = trace_sentiment(tiny, "The soup was cold.", proxy, samples=2)
    estimate = trace_sentiment(tiny, "The soup was cold.", proxy, samples=2, engine="estimate")
    assert estimate.clean_score == exact.clean_score and estimate.corrupted_score == exact.corrupted_score
    assert {k: v.shape for k, v in estimate.scores.items()} == {k: v.shape for k, v in exact.scores.items()}


def test_average_trace_by_category(tiny):
    proxy = FeelingProxy.fit(tiny, read_texts(tiny, SHORT), SHORT_LABELS)
    calls = []
    average = average_sentiment_trace(
        tiny,
        ["I love it!", "The bus was late."],
        proxy,
        kinds=("hidden",),
        samples=1,
        min_gap=0.0,
        progress=lambda d, t: calls.append(d),
    )
    assert average.n + average.skipped == 2 and calls == [1, 2]
    assert average.effects["hidden"].shape == (len(CATEGORIES), tiny.num_layers)
    layer, category, effect = average.peak("hidden")
    assert effect == np.nanmax(average.effects["hidden"])
    assert average.effects["hidden"][CATEGORIES.index(category), layer] == effect
    with pytest.raises(UserError, match="nothing to average"):
        average_sentiment_trace(tiny, ["I love it!"], proxy, kinds=("hidden",), samples=1, min_gap=2.0)


# ------------------------------------------------------------------------------ embedded model


PROBE_LAYER = 20


@pytest.fixture(scope="session")
def project_features(embedded):
    data = load_project_texts()
    return data, read_texts(embedded, data.texts, layers=[PROBE_LAYER])


def _split(features, index):
    from core.sentiment import Features

    return Features(features.final[index], {l: h[index] for l, h in features.hidden.items()}, 0, 0.0)


@pytest.mark.slow
def test_feeling_proxy_beats_chance_on_held_apart_texts(embedded, project_features):
    data, features = project_features
    order = np.random.default_rng(0).permutation(len(data))
    train, test = order[: len(order) * 2 // 3], order[len(order) * 2 // 3 :]
    proxy = FeelingProxy.fit(embedded, _split(features, train), data.labels[train])
    accuracy = (proxy.predict(embedded, _split(features, test)) == data.labels[test]).mean()
    assert accuracy >= 0.85, accuracy
    assert proxy.reader.coef[0] > 0 > proxy.reader.coef[1]  # more " good" -> positive, more " bad" -> negative


@pytest.mark.slow
def test_probe_on_the_embedded_model_beats_chance(embedded, project_features):
    from core.sentiment import HiddenProbe

    data, features = project_features
    order = np.random.default_rng(1).permutation(len(data))
    train, test = order[: len(order) * 2 // 3], order[len(order) * 2 // 3 :]
    probe = HiddenProbe.fit(embedded, _split(features, train), data.labels[train], PROBE_LAYER)
    accuracy = (probe.predict(embedded, _split(features, test)) == data.labels[test]).mean()
    assert accuracy >= 0.9, accuracy


@pytest.mark.slow
def test_sentiment_trace_on_the_embedded_model(embedded):
    proxy = default_proxy(embedded)
    assert proxy.model_name == embedded.name
    result = trace_sentiment(embedded, "I love this song!", proxy, kinds=("hidden",), samples=2)
    assert result.clean_score > 0.5  # the proxy reads the text as positive
    assert abs(result.clean_score - result.corrupted_score) > 0.05
    assert result.scores["hidden"].shape == (len(result.tokens), embedded.num_layers)
    assert result.scores["hidden"][-1, -1] == pytest.approx(result.clean_score, abs=1e-4)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "core", "sentiment", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )


def test_cli_bad_file_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("words\tlabel\nhi\tpositive\n")
    result = _cli("evaluate", "--train", str(bad), "--test", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: the data file {str(bad)!r} needs a header row with columns 'text' and 'label' (found 'words', 'label')"
    ]


@pytest.mark.slow
def test_cli_evaluate_and_trace(tmp_path):
    rows = (ROOT / "data" / "sentiment_texts.tsv").read_text(encoding="utf-8").splitlines()
    (tmp_path / "train.tsv").write_text("\n".join(rows[:41]) + "\n")
    (tmp_path / "test.tsv").write_text("\n".join([rows[0], *rows[41:61]]) + "\n")
    out = tmp_path / "e.json"
    result = _cli(
        "evaluate",
        "--train",
        str(tmp_path / "train.tsv"),
        "--test",
        str(tmp_path / "test.tsv"),
        "--proxy",
        "probe",
        "--layer",
        "15",
        "--no-cache",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["n"] == sum(report["counts"].values()) and report["layer"] == 15
    assert report["texts_per_second"] > 0
    assert report["accuracy"] == pytest.approx(np.trace(np.asarray(report["confusion"])) / report["n"])
    trace_out = tmp_path / "t.json"
    result = _cli(
        "trace", "--text", "What a lovely day!", "--kind", "hidden", "--samples", "1", "--json", str(trace_out)
    )
    assert result.returncode == 0, result.stderr
    traced = json.loads(trace_out.read_text())
    assert traced["tokens"][-1] == " feeling" and traced["high_score"] != traced["low_score"]
    assert np.asarray(traced["scores"]["hidden"]).shape == (len(traced["tokens"]), 30)


@pytest.mark.skipif(not TWEETS.is_dir(), reason="the TweetEval tweets are not at ../shared/data/tweeteval_sentiment")
def test_tweet_files_load_as_binary():
    train = load_labelled(TWEETS / "train.tsv")
    assert len(train) == train.counts()["negative"] + train.counts()["positive"] > 1000
    assert train.neutral_dropped > 0
