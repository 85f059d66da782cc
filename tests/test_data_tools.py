"""Bring-your-own data: ``data check``, ``data convert`` and ``mine`` on real rows."""
import json
import os

import numpy as np
import pytest

from autoregembed.tools.cli import main
from autoregembed.run.config import RESOURCES
from autoregembed.ground.data import load_rows

NLI = os.path.join(RESOURCES, "nli_sample.jsonl")


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_check_reports_rows_negatives_and_token_lengths(tiny_base, capsys):
    from transformers import AutoTokenizer

    assert main(["data", "check", NLI, "--stage", "2", "--tokenizer", tiny_base, "--json",
                 "--set", "data.max_text_len=20", "--set", "data.max_target_len=10"]) == 0
    r = _last_json(capsys)
    rows = load_rows(NLI, 2)
    assert r["rows"] == len(rows) and r["errors"] == 0 and r["duplicates"] == 0
    assert r["negatives_per_row"] == {"min": 1, "median": 1.0, "max": 1}
    tok = AutoTokenizer.from_pretrained(tiny_base)
    lens = np.array([len(tok(x["query"], add_special_tokens=False)["input_ids"]) for x in rows])
    assert r["tokens.query"]["max"] == lens.max() and r["tokens.query"]["p50"] == int(np.percentile(lens, 50))
    assert r["tokens.query"]["truncated_at_max_text_len=20"] == pytest.approx((lens > 20).mean(), abs=1e-4)
    assert set(r["tokens.pos"]) >= {"truncated_at_max_text_len=20", "truncated_at_max_target_len=10"}


def test_check_lists_every_bad_row_by_line_and_exits_nonzero(tmp_path, capsys):
    good = {"query": "a", "pos": "b", "neg": ["c", "d"], "instruction": "i"}
    lines = [json.dumps({**good, "pos": ""}), "not json", json.dumps(good), json.dumps({"query": "a"}), json.dumps(good)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert main(["data", "check", str(path), "--stage", "2"]) == 1
    out = capsys.readouterr().out
    assert f"{path}:1: field 'pos' is empty" in out
    assert f"{path}:2: bad JSON" in out
    assert f"{path}:4: missing field" in out
    assert f"duplicate: {path}:5 repeats {path}:3" in out
    assert "5 rows (stage 2), 3 errors, 1 duplicate rows" in out


def test_convert_simcse_flagembedding_authors_and_text(tmp_path, capsys):
    simcse = tmp_path / "nli.csv"
    simcse.write_text('sent0,sent1,hard_neg\n"A man, outside.",A person is out.,Nobody is out.\n')
    flag = tmp_path / "flag.jsonl"
    flag.write_text(json.dumps({"query": "q", "pos": ["p1", "p2"], "neg": ["n1", "n2", "n3"], "prompt": "Find it."}) + "\n")
    authors = tmp_path / "authors.jsonl"
    authors.write_text(json.dumps({"query": "q", "pos": ["p1", "p2"], "neg": "n1"}) + "\n")
    text = tmp_path / "corpus.txt"
    text.write_text("first text\n\nsecond text\n")
    expected = {
        "simcse-csv": (simcse, 2, [{"query": "A man, outside.", "pos": "A person is out.", "neg": ["Nobody is out."]}]),
        "flagembedding": (flag, 2, [{"query": "q", "pos": "p1", "neg": ["n1", "n2", "n3"], "instruction": "Find it."},
                                    {"query": "q", "pos": "p2", "neg": ["n1", "n2", "n3"], "instruction": "Find it."}]),
        "authors": (authors, 2, [{"query": "q", "pos": "p1", "neg": ["n1"], "instruction": "Mine."}]),
        "text": (text, 1, [{"context": "first text", "output": "first text"}, {"context": "second text", "output": "second text"}]),
    }
    for kind, (src, stage, want) in expected.items():
        out = tmp_path / f"{kind}.out.jsonl"
        args = ["data", "convert", "--from", kind, str(src), str(out)] + (["--instruction", "Mine."] if kind == "authors" else [])
        assert main(args) == 0, kind
        assert _last_json(capsys)["rows"] == len(want)
        got = load_rows(str(out), stage)  # what training reads
        assert [{k: r[k] for k in w} for r, w in zip(got, want)] == want, kind


def test_convert_refuses_a_csv_without_the_simcse_header(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["data", "convert", "--from", "simcse-csv", str(bad), str(tmp_path / "o.jsonl")]) == 2
    assert f"{bad}:1: expected a header with columns sent0, sent1, hard_neg" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_mine_takes_the_closest_passages_that_are_not_the_positive(tiny_export, tmp_path, capsys):
    from autoregembed.release.encoder import Encoder

    out = tmp_path / "mined.jsonl"
    assert main(["mine", "--model", tiny_export, "--queries", NLI, "--negatives", "3",
                 "--max-similarity", "0.999", "--output", str(out)]) == 0
    report = _last_json(capsys)
    rows, mined = load_rows(NLI, 2), load_rows(str(out), 2)
    assert report["rows"] == len(mined) == len(rows)
    corpus = list(dict.fromkeys(t for r in rows for t in [r["pos"], *r["neg"]]))
    enc = Encoder.from_pretrained(tiny_export, device="cpu")
    inst = rows[0]["instruction"]
    c = enc.encode(corpus, instruction=inst).astype(np.float64)
    for r, m in list(zip(rows, mined))[:20]:
        assert (m["query"], m["pos"]) == (r["query"], r["pos"]) and 1 <= len(m["neg"]) <= 3
        assert r["pos"] not in m["neg"] and r["query"] not in m["neg"]
        q, p = (enc.encode([t], instruction=inst).astype(np.float64)[0] for t in (r["query"], r["pos"]))
        allowed = [j for j in np.argsort(-(c @ q), kind="stable")
                   if corpus[j] not in (r["query"], r["pos"]) and c[j] @ p < 0.999]
        assert m["neg"] == [corpus[j] for j in allowed[:3]]  # fewer where the threshold leaves fewer


def test_convert_gives_retrieval_data_no_instruction_it_did_not_ask_for(tmp_path, capsys):
    src = tmp_path / "authors.jsonl"
    src.write_text(json.dumps({"query": "q", "pos": ["p1"], "neg": "n1"}) + "\n")
    out = tmp_path / "o.jsonl"
    assert main(["data", "convert", "--from", "authors", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert "converted row 1 carries no instruction and --from authors has no default" in err and "--instruction" in err
    assert not out.exists()


def test_mining_in_query_chunks_with_a_widening_pool_equals_the_full_sort(monkeypatch):
    """Memory is chunk x corpus: a few queries at a time against the corpus, each walking a pool of its
    top passages that is widened when the filters empty it; the result is the full ranking's."""
    from autoregembed.release import mining as mine

    rng = np.random.default_rng(0)
    corpus = [f"passage {i}" for i in range(300)]
    vectors = {t: v / np.linalg.norm(v) for t, v in zip(corpus + [f"q{i}" for i in range(10)] + [f"p{i}" for i in range(10)],
                                                        rng.normal(size=(320, 8)))}
    vectors.update({corpus[i]: vectors[corpus[i - 1]] for i in range(1, 300, 7)})  # exact ties

    class Fixed:
        def encode(self, texts, **kw):
            return np.stack([vectors[t] for t in texts]).astype(np.float32)

    rows = [{"query": f"q{i}", "pos": f"p{i}", "neg": ["x"], "instruction": "i"} for i in range(10)]
    monkeypatch.setattr(mine, "QUERY_CHUNK", 3)
    got = mine.mine_negatives(Fixed(), rows, corpus, negatives=5, skip_top=2, max_similarity=0.2)
    c = Fixed().encode(corpus).astype(np.float64)
    for r, m in zip(rows, got):
        q, p = (Fixed().encode([t]).astype(np.float64)[0] for t in (r["query"], r["pos"]))
        order = np.argsort(-(c @ q), kind="stable")
        want = [corpus[j] for rank, j in enumerate(order) if rank >= 2 and c[j] @ p < 0.2][:5]
        assert m["neg"] == want


def test_mining_searches_the_corpus_embeddings_the_encoder_returned_without_a_copy(monkeypatch):
    """The corpus is rank 0's largest array (1M x 4096 float32: 16 GB): mining searches the encoder's own
    float32 array, and faiss is handed it as is, never a float64 or contiguous copy."""
    from autoregembed.release import mining as mine

    encoder, corpus, rows = _random_world(passages=50, queries=4, dim=8)
    encoded = encoder.encode(corpus)
    encoder.encode = lambda texts, **kw: encoded if texts == corpus else _random_world(50, 4, 8)[0].encode(texts)
    searched = []
    real = mine.corpus_search
    monkeypatch.setattr(mine, "corpus_search", lambda c, *a: searched.append(c) or real(c, *a))
    got = mine.mine_negatives(encoder, rows, corpus, negatives=2)
    assert searched[0] is encoded and len(got) == len(rows)
    assert np.ascontiguousarray(encoded, dtype=np.float32) is encoded  # what FaissSearch does with it


def test_sharded_encoding_reports_one_progress_line_over_all_its_chunks(monkeypatch, tmp_path):
    """The mine stage's named progress line counts rank 0's share of the corpus once, chunk after chunk
    (it restarted at 0 with every 1,024 texts), and the chunks' own encodes draw none."""
    import functools

    from autoregembed.ground import monitor
    from autoregembed.run import sharded_encoding

    lines, asked = [], []

    class Fixed:
        def encode(self, texts, show_progress_bar=False, **kw):
            asked.append(show_progress_bar)
            return np.ones((len(texts), 3), np.float32)

    monkeypatch.setattr(sharded_encoding, "Progress", functools.partial(monitor.Progress, log=lines.append, every_s=0))
    monkeypatch.setattr(sharded_encoding.ShardedEncoder, "CHUNK", 4)
    out = sharded_encoding.ShardedEncoder(Fixed(), str(tmp_path)).encode([f"t{i}" for i in range(10)],
                                                                         show_progress_bar="mine: encoding")
    assert out.shape == (10, 3) and asked == [False, False, False]
    assert [line.split(" (")[0] for line in lines] == [f"mine: encoding: {n}/10 texts" for n in (4, 8, 10)]


def _random_world(passages: int, queries: int, dim: int):
    """(an encoder of fixed random unit vectors, the corpus, rows q_i -> p_i): mining without a model."""
    rng = np.random.default_rng(1)
    corpus = [f"passage {i}" for i in range(passages)]
    names = corpus + [f"q{i}" for i in range(queries)] + [f"p{i}" for i in range(queries)]
    vectors = {t: v / np.linalg.norm(v) for t, v in zip(names, rng.normal(size=(len(names), dim)))}

    class Fixed:
        def encode(self, texts, **kw):
            return np.stack([vectors[t] for t in texts]).astype(np.float32)

    rows = [{"query": f"q{i}", "pos": f"p{i}", "neg": ["x"], "instruction": "i"} for i in range(queries)]
    return Fixed(), corpus, rows


@pytest.mark.parametrize("index", [dict(index="faiss"), dict(index="faiss", index_lists=16, index_probe=16)])
def test_mining_through_a_faiss_index_that_reads_every_list_equals_exact_mining(monkeypatch, index):
    """faiss' flat index (a small corpus) and an inverted-file index probing all its lists see every
    passage: the mined rows are exact mining's, with the filters, a widening pool and random sampling."""
    from autoregembed.release import mining as mine

    encoder, corpus, rows = _random_world(passages=400, queries=12, dim=8)
    monkeypatch.setattr(mine, "QUERY_CHUNK", 5)
    for settings in (dict(negatives=5, skip_top=2, max_similarity=0.2), dict(negatives=4, relative_margin=0.1),
                     dict(negatives=3, sampling="random", range_max=60, seed=3)):
        want = mine.mine_negatives(encoder, rows, corpus, **settings)
        assert mine.mine_negatives(encoder, rows, corpus, **settings, **index) == want, settings


def test_the_faiss_index_finds_most_of_the_exact_neighbours_of_clustered_embeddings():
    """At its defaults (4 x sqrt(passages) lists, 32 probed) on 40,000 clustered unit vectors, the index's
    top 10 holds at least 95% of the exact top 10 (bench/mining_index.py measures it at 1M x 768)."""
    from autoregembed.release.mining import ExactSearch, FaissSearch

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(200, 32))
    x = centres[rng.integers(0, 200, 40_000)] + 0.6 * rng.normal(size=(40_000, 32))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(40_000, 300, replace=False)] + 0.1 * rng.normal(size=(300, 32))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = [set(ids[:10]) for ids, _ in ExactSearch(x).top(q, 10)]
    index = FaissSearch(x)
    assert index.index.nlist == int(4 * 40_000 ** 0.5) and index.index.nprobe == 32
    recall = np.mean([len(e & set(ids[:10])) / 10 for e, (ids, _) in zip(exact, index.top(q, 10))])
    assert recall >= 0.95, recall


@pytest.mark.parametrize("settings", [dict(range_max=40), dict(absolute_margin=0.1), dict(relative_margin=0.2),
                                      dict(range_max=60, absolute_margin=0.05, skip_top=3),
                                      dict(sampling="random", range_max=50), dict(sampling="random", relative_margin=0.1)])
def test_range_margins_and_random_sampling_against_a_brute_force_reference(monkeypatch, settings):
    """Every candidate rule applied to the full ranking by hand: ranks in [skip_top, range_max), not the
    query or positive, cosine to the positive below max_similarity, cosine to the query at most
    cos(q, pos) - absolute_margin or cos(q, pos) x (1 - relative_margin); top takes the first, random
    draws among all of them (the same draw for the same seed, another for another seed)."""
    from autoregembed.release import mining as mine

    encoder, corpus, rows = _random_world(passages=200, queries=8, dim=6)
    monkeypatch.setattr(mine, "QUERY_CHUNK", 3)
    kw = {"skip_top": 0, **settings}
    got = mine.mine_negatives(encoder, rows, corpus, negatives=4, max_similarity=0.9, seed=5, **kw)
    c = encoder.encode(corpus).astype(np.float64)
    by_query = {m["query"]: m for m in got}  # a row with nothing left to take is left out
    for r in rows:
        q, p = (encoder.encode([t]).astype(np.float64)[0] for t in (r["query"], r["pos"]))
        s_pos, sims = float(q @ p), c @ q
        ceiling = min(s_pos - kw["absolute_margin"] if "absolute_margin" in kw else np.inf,
                      s_pos * (1 - kw["relative_margin"]) if "relative_margin" in kw else np.inf)
        order = np.argsort(-sims, kind="stable")[: kw.get("range_max") or len(corpus)]
        allowed = [corpus[j] for rank, j in enumerate(order)
                   if rank >= kw["skip_top"] and c[j] @ p < 0.9 and sims[j] <= ceiling]
        mined = by_query[r["query"]]["neg"] if r["query"] in by_query else []
        if kw.get("sampling") == "random":
            assert set(mined) <= set(allowed) and len(mined) == min(4, len(allowed))
        else:
            assert mined == allowed[:4]
    assert len(by_query) >= 4  # the rules leave most rows something
    if settings.get("sampling") == "random":
        again = mine.mine_negatives(encoder, rows, corpus, negatives=4, max_similarity=0.9, seed=5, **kw)
        other = mine.mine_negatives(encoder, rows, corpus, negatives=4, max_similarity=0.9, seed=6, **kw)
        assert again == got and other != got
        closest = {r["query"]: [corpus[j] for j in np.argsort(-(c @ encoder.encode([r["query"]])[0]), kind="stable")]
                   for r in rows}
        assert any(m["neg"] != closest[m["query"]][:4] for m in got)  # not simply the closest


def test_mining_fingerprint_follows_the_model_rows_and_settings(tiny_export, tiny_base):
    from autoregembed.release.mining import mining_fingerprint

    rows = load_rows(os.path.join(RESOURCES, "nli_sample.jsonl"), stage=2)[:8]
    settings = {"negatives": 2, "skip_top": 0}
    a = mining_fingerprint(tiny_export, rows, settings)
    assert a == mining_fingerprint(tiny_export, [dict(r) for r in rows], dict(settings))
    assert a != mining_fingerprint(tiny_export, rows[:7], settings)
    assert a != mining_fingerprint(tiny_export, [{**rows[0], "pos": rows[0]["pos"] + "!"}] + rows[1:], settings)
    assert a != mining_fingerprint(tiny_export, rows, {**settings, "skip_top": 1})
    assert a != mining_fingerprint(tiny_base, rows, settings)


@pytest.mark.parametrize("flag,value,rule", [("--max-similarity", "nan", "a cosine in"),
                                             ("--max-similarity", "1.5", "a cosine in"),
                                             ("--negatives", "-3", ">= 1"), ("--batch-size", "0", ">= 1"),
                                             ("--skip-top", "-1", ">= 0"), ("--range-max", "-2", "0 (no limit) or above"),
                                             ("--absolute-margin", "nan", "a cosine difference"),
                                             ("--relative-margin", "1.5", "in [0, 1)"), ("--sampling", "best", "top or random"),
                                             ("--index", "hnsw", "exact or faiss"), ("--index-probe", "0", ">= 1"),
                                             ("--index-lists", "-1", ">= 0")])
def test_mine_refuses_bad_flags_before_the_model_loads(tmp_path, capsys, flag, value, rule):
    """NaN or 1.5 used to turn the near-duplicate filter off in silence; the others failed after loading."""
    missing = str(tmp_path / "no-such-model")  # never read: the flags are checked first
    assert main(["mine", "--model", missing, "--queries", NLI, "--output", str(tmp_path / "o.jsonl"),
                 flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"autoregembed: error: {flag} must be {rule}") and "\n" not in err
    assert err.endswith(f"got {value}")
    assert not (tmp_path / "o.jsonl").exists()
