"""The benchmarks' own code: bench/quality.py's bookkeeping (merging runs made on separate seeds, its scratch
folder's lock, seeds run side by side) and bench/throughput.py's measured step."""
import json
import os
import shutil

import pytest

from autoregembed.run.runlock import RunLockError
from helpers import ROOT, bench_module, run_child

quality_record = bench_module("quality_record")
quality_jobs = bench_module("quality_jobs")
quality_stage_cache = bench_module("quality_stage_cache")

B, C, D = "(b) contrastive (InfoNCE)", "(c) stage 1 only", "(d) stage 1 + stage 2"

SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
needs_shared_data = pytest.mark.skipif(  # the benchmark's own files (NLI, STS-B, the retrieval collections)
    not os.path.isdir(os.path.join(SHARED_DATA, "nli")),
    reason="../shared/data (the benchmark's NLI, STS-B and retrieval files) is not beside the checkout")


def _record(tmp_path, name, seeds, arms, scores, deepspeed="ds_configs/zero2.json", **settings):
    """A run record as bench/quality.py writes it; ``scores``: arm -> {seed: spearman}."""
    record = {"model": "m", "split": "report", "date": "2026-11-26", "commit": name, "command": f"run {name}",
              "settings": {"seeds": seeds, "arms": arms, "deepspeed": deepspeed, "stage1_steps": 50, **settings},
              "spearman_x100": quality_record.summary(scores),
              "mean_pairwise_cosine": {n: {s: 0.5 for s in v} for n, v in scores.items()},
              "loss_first_last": {f"{name}": [1.0, 0.5]}, "seconds": {f"train {name}": 1.0},
              "info_gap": {f"stage1 {name}": {"step": 50, "nats_per_token": 0.3, "nats_per_text": 4.0}}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(record))
    return str(path)


def test_merge_pools_seeds_and_recomputes_mean_and_spread(tmp_path):
    one = _record(tmp_path, "r1", "42,1", "abc", {B: {"42": 78.0, "1": 80.0}, C: {"42": 60.0, "1": 50.0}})
    two = _record(tmp_path, "r2", "2", "bc", {B: {"2": 79.0}, C: {"2": 70.0}},
                  deepspeed=os.path.join(ROOT, "ds_configs", "zero2.json"))  # the same file, named absolutely
    merged = quality_record.merge_records([one, two])
    assert merged["spearman_x100"][B] == {"mean": 79.0, "std": 1.0, "per_seed": {"42": 78.0, "1": 80.0, "2": 79.0}}
    assert merged["spearman_x100"][C]["mean"] == 60.0 and merged["spearman_x100"][C]["std"] == 10.0
    assert merged["settings"]["seeds"] == "42,1,2" and merged["settings"]["arms"] == "abc"
    assert merged["commit"] == "r1,r2" and set(merged["seconds"]) == {"train r1", "train r2"}
    assert set(merged["info_gap"]) == {"stage1 r1", "stage1 r2"}
    assert list(merged["spearman_x100"]) == [B, C]  # the table's arm order


def test_the_merge_command_publishes_the_pooled_table(tmp_path):
    """``python bench/quality.py --merge`` end to end (the script and the modules it is split into): the
    pooled table is printed, and a report without every arm (a)-(e) writes no quality.json."""
    one = _record(tmp_path, "r1", "42,1", "bc", {B: {"42": 78.0, "1": 80.0}, C: {"42": 60.0, "1": 50.0}})
    two = _record(tmp_path, "r2", "2", "bc", {B: {"2": 79.0}, C: {"2": 70.0}})
    results = tmp_path / "results"
    results.mkdir()
    r = run_child([os.path.join(ROOT, "bench", "quality.py"), "--merge", one, two, "--results", str(results)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "(b) contrastive (InfoNCE)           79.00 ± 1.00   (42: 78.00, 1: 80.00, 2: 79.00)" in r.stdout
    assert "without arm(s) a, d, e: results not written" in r.stdout and os.listdir(results) == []


def test_an_unknown_arm_is_refused_in_one_line_before_anything_runs(tmp_path):
    r = run_child([os.path.join(ROOT, "bench", "quality.py"), "--arms", "bz", "--out", str(tmp_path / "out")])
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == "--arms bz: no arm z (arms: abcdefg)"
    assert not (tmp_path / "out").exists()


def test_retrieval_is_summarised_per_collection_with_their_mean_and_merged_across_runs(tmp_path):
    ir = lambda a, b: {"cranfield": {"ndcg@10": a, "recall@100": 0.5}, "cisi": {"ndcg@10": b, "recall@100": 0.7}}  # noqa: E731
    table = quality_record.retrieval_summary({B: {"42": ir(0.2, 0.4), "1": ir(0.3, 0.5)}, "(a) BM25 (lexical)": {"None": ir(0.33, 0.35)}})
    assert table["ndcg@10"]["cranfield"][B] == {"mean": 0.25, "std": 0.0707, "per_seed": {"42": 0.2, "1": 0.3}}
    assert table["ndcg@10"]["mean"][B]["per_seed"] == {"42": 0.3, "1": 0.4}  # the two collections' mean per seed
    assert table["recall@100"]["cisi"]["(a) BM25 (lexical)"]["mean"] == 0.7
    one = _record(tmp_path, "r1", "42", "b", {B: {"42": 78.0}})
    two = _record(tmp_path, "r2", "1", "b", {B: {"1": 80.0}})
    for path, seed, x in ((one, "42", ir(0.2, 0.4)), (two, "1", ir(0.3, 0.5))):
        record = json.load(open(path))
        record["retrieval"] = quality_record.retrieval_summary({B: {seed: x}})
        open(path, "w").write(json.dumps(record))
    merged = quality_record.merge_records([one, two])["retrieval"]
    assert merged["ndcg@10"]["mean"][B] == {"mean": 0.35, "std": 0.0707, "per_seed": {"42": 0.3, "1": 0.4}}


def test_a_record_written_between_an_arms_sts_and_its_retrieval_keeps_both_seeds_sts(tmp_path):
    """bench/quality.py writes its record after each arm's STS and again after its retrieval: a seed
    scored on STS alone sits beside one with retrieval (a run stopped mid-retrieval keeps its STS)."""
    import argparse

    args = argparse.Namespace(deepspeed=os.path.join(ROOT, "ds_configs", "zero2.json"), base=None, split="report",
                              seeds="42,1", arms="b")
    ir = {"cranfield": {"ndcg@10": 0.2, "recall@100": 0.5}}
    scores = {B: {42: {"spearman": 78.0, "mean_cosine": 0.1, "retrieval": ir}, 1: {"spearman": 80.0, "mean_cosine": 0.2}}}
    record = quality_record.run_record(args, "m", "c0ffee", scores, {}, {}, {})
    assert record["spearman_x100"][B]["per_seed"] == {"42": 78.0, "1": 80.0}
    assert record["retrieval"]["ndcg@10"]["cranfield"][B]["per_seed"] == {"42": 0.2}


def test_bm25_ranks_by_shared_words_rare_words_first():
    """BM25 on five documents: the one holding both query words first, then the one holding the rarer word,
    then the one holding the commoner; the words lowercased and split at punctuation."""
    qr = bench_module("quality_retrieval")
    corpus = {"both": "Wing flutter, at high speed.", "rare": "flutter of panels", "common": "wing loads and wing tips",
              "c2": "wing design", "none": "heat transfer in a boundary layer"}
    data = qr.RetrievalSet("t", {"q": "WING flutter?"}, corpus, {"q": {"both": 3, "rare": 2, "common": 1}})
    assert qr.bm25(data) == {"ndcg@10": 1.0, "mrr@10": 1.0, "recall@100": 1.0, "queries": 1}
    swapped = qr.RetrievalSet("t", data.queries, corpus, {"q": {"both": 3, "rare": 1, "common": 2}})
    assert qr.bm25(swapped)["ndcg@10"] < 1.0


def test_merge_refuses_other_settings_and_a_seed_that_scores_differently_twice(tmp_path):
    one = _record(tmp_path, "r1", "42", "b", {B: {"42": 78.0}})
    other = _record(tmp_path, "r2", "1", "b", {B: {"1": 78.0}}, stage1_steps=60)
    with pytest.raises(SystemExit, match="r2.json: not the same model, split and settings"):
        quality_record.merge_records([one, other])
    again = _record(tmp_path, "r3", "42", "b", {B: {"42": 77.5}})
    with pytest.raises(SystemExit, match=r"r3.json: \(b\) contrastive \(InfoNCE\) seed 42 is 77.5, 78.0"):
        quality_record.merge_records([one, again])
    same = _record(tmp_path, "r4", "42", "b", {B: {"42": 78.0}})  # a rerun that reproduces is pooled
    assert quality_record.merge_records([one, same])["spearman_x100"][B]["per_seed"] == {"42": 78.0}


@pytest.mark.parametrize("field, words", [("package_code", "trained by different package code"),
                                           ("data", "measured on different data")])
def test_merge_refuses_seeds_trained_by_other_package_code_or_measured_on_other_data(tmp_path, field, words):
    """Records carry the digests of the code that trained them and of the data they read
    (harness.package_code_digest, data_digest); seeds from two codes or two data are not pooled into one
    table, records made before the digest was kept are."""
    def with_digest(name, seed, value):
        path = _record(tmp_path, name, seed, "b", {B: {seed: 78.0}})
        record = json.load(open(path))
        record[field] = value
        open(path, "w").write(json.dumps(record))
        return path

    one, two, old = with_digest("r1", "42", "aaaa"), with_digest("r2", "1", "bbbb"), with_digest("r3", "2", None)
    with pytest.raises(SystemExit, match=rf"{words}, not merged: aaaa: \S*r1.json; bbbb: \S*r2.json"):
        quality_record.merge_records([one, two, old])
    assert quality_record.merge_records([one, old])["spearman_x100"][B]["per_seed"] == {"42": 78.0, "2": 78.0}
    harness = bench_module("harness")
    assert len(harness.package_code_digest()) == 16 and harness.package_code_digest() == harness.package_code_digest()
    data = harness.data_digest()  # None in a checkout without ../shared/data: its records pool as undigested
    assert data == harness.data_digest() and (len(data) == 16 if os.path.isdir(SHARED_DATA) else data is None)


def test_scratch_is_emptied_under_a_lock_a_second_run_cannot_take(tmp_path):
    out = tmp_path / "quality"
    (out / "seed42" / "stage1").mkdir(parents=True)
    (out / "stage1.jsonl").write_text("{}\n")
    lock = quality_jobs.fresh_scratch(str(out))
    try:
        assert os.listdir(out) == [".lock"]
        (out / "seed1").mkdir()  # the first run's work
        with pytest.raises(RunLockError, match="is in use by PID"):
            quality_jobs.fresh_scratch(str(out))
        assert (out / "seed1").is_dir()  # the refused run deleted nothing
    finally:
        lock.release()
    quality_jobs.fresh_scratch(str(out)).release()  # free again once the first run ends
    assert os.listdir(out) == [".lock"]


def test_a_second_run_on_a_held_scratch_folder_is_refused_in_one_line(tmp_path, tiny_base):
    """The script itself, not only its helper: a concurrent run exits 2 with the holder named, no traceback."""
    out = tmp_path / "quality"
    lock = quality_jobs.fresh_scratch(str(out))
    try:
        r = run_child(["bench/quality.py", "--split", "report", "--arms", "a", "--no-retrieval", "--base", tiny_base,
                       "--out", str(out), "--results", str(tmp_path / "results")])
    finally:
        lock.release()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"quality.py: error: {out} is in use by PID {os.getpid()}")


FAKE_RUN = """
import json, os, sys, time
args = sys.argv[1:]
opt = lambda name: args[args.index(name) + 1]
start = time.time()
if opt("--seeds") == "13":
    sys.exit(5)  # a seed that fails
time.sleep(60 if opt("--seeds") == "99" else 1.5)  # 99: a seed still running when another fails
os.makedirs(os.path.join(opt("--results"), "quality_runs"), exist_ok=True)
with open(os.path.join(opt("--results"), "quality_runs", "report-x-%d.json" % os.getpid()), "w") as f:
    json.dump({"argv": args, "threads": os.environ["OMP_NUM_THREADS"], "span": [start, time.time()]}, f)
"""


def test_points_left_are_the_asked_arms_no_record_holds_and_a_process_each(tmp_path):
    """points_left: per seed the arms not measured, (a) once without a seed; plan_jobs: a process per
    point whose command line bench/quality.py parses back to that point, a seed's stage-1 arms after
    the first of them (which trains or reads its stage 1), (a) last."""
    quality = bench_module("quality")
    done = {("b", "1"), ("c", "1"), ("a", "42")}  # ("a", "42") is not arm (a)'s point: it has no seed
    plan = quality_jobs.points_left("abcde", [1, 2], done)
    assert plan == {None: "a", 1: "de", 2: "bcde"}
    assert quality_jobs.points_left("bd", [1], {("b", "1"), ("d", "1")}) == {}
    argv = ["--split", "report", "--arms", "abcde", "--seeds", "1,2", "--jobs", "2", "--stage1-lr", "1e-4"]
    jobs = quality_jobs.plan_jobs(plan, argv, "out")
    assert [(j.name, j.after) for j in jobs] == [
        ("(d) seed 1", None), ("(e) seed 1", "(d) seed 1"),
        ("(c) seed 2", None), ("(b) seed 2", None), ("(e) seed 2", "(c) seed 2"), ("(d) seed 2", "(c) seed 2"),
        ("(a)", None)]
    for job in jobs:
        a = quality.parser().parse_args(job.argv)
        assert (a.arms, a.seeds, a.out, a.stage1_lr, a.job_of_jobs, a.jobs) == (
            job.name[1], job.name.split("seed ")[1] if "seed" in job.name else "", job.out, 1e-4, True, 1)


def test_jobs_run_side_by_side_after_the_job_they_wait_for_and_a_failure_stops_them(tmp_path, monkeypatch):
    """run_apart: at most ``parallel`` processes with cores/parallel threads each; a job waits for its
    ``after`` job even with a slot free, which a job without one takes meanwhile; each job's record is
    returned; a failing job ends the run naming its log and stops the others."""
    fake = tmp_path / "fake_quality.py"
    fake.write_text(FAKE_RUN)
    monkeypatch.setattr(quality_jobs, "QUALITY", str(fake))
    monkeypatch.setattr(quality_jobs.os, "cpu_count", lambda: 4)
    results, out = str(tmp_path / "results"), tmp_path / "out"
    out.mkdir()

    def job(name, seed, after=None):
        return quality_jobs.Job(name, ["--seeds", seed, "--results", results, "--out", name], str(out / name), after)

    records = quality_jobs.run_apart([job("d1", "1"), job("e1", "1", after="d1"), job("b1", "1")], 2, results, "report")
    got = {r["argv"][-1]: r for r in (json.load(open(p)) for p in records)}
    assert set(got) == {"d1", "e1", "b1"} and {r["threads"] for r in got.values()} == {"2"}
    assert got["e1"]["span"][0] >= got["d1"]["span"][1]  # after d1, not beside it
    assert got["b1"]["span"][0] < got["d1"]["span"][1]  # b1 took the free slot meanwhile
    spawned = []
    real_popen = __import__("subprocess").Popen
    monkeypatch.setattr("subprocess.Popen", lambda *a, **kw: spawned.append(real_popen(*a, **kw)) or spawned[-1])
    with pytest.raises(SystemExit, match=r"s13 failed \(exit 5\): see .*s13.log"):
        quality_jobs.run_apart([job("s13", "13"), job("s99", "99")], 2, results, "report")
    assert [p.wait(timeout=10) for p in spawned] == [5, -15]  # the other job was stopped, not left running


def test_job_argv_replaces_only_the_per_child_options():
    argv = ["--out=x", "--seeds", "1,2", "--stage1-lr", "3e-4", "--arms=abc", "--jobs", "3", "--base", "m"]
    assert quality_jobs.job_argv(argv, 2, "bc", "o") == ["--stage1-lr", "3e-4", "--base", "m", "--seeds", "2",
                                                    "--arms", "bc", "--out", "o", "--job-of-jobs"]


@pytest.mark.distributed
def test_the_throughput_benchmarks_step_is_the_trainers_and_its_arms_score_alike(tiny_base):
    """bench/throughput.py's measured step, each arm in its own process on the tiny base: the trainer's
    session and optimizer step (ZeRO-3 as users run it), the naive arm only replacing the model's scorer
    by full logits, so both arms' first loss is the same number and only naive holds the logits; a change
    to the model's methods must not stop the benchmark (it once did, silently)."""
    got = {}
    for arm in ("ours", "naive"):
        r = run_child([os.path.join(ROOT, "bench", "throughput.py"), "--child", arm, tiny_base, "2", "2", "1"])
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        got[arm] = json.loads(r.stdout.strip().splitlines()[-1])
        assert got[arm]["step_s"] > 0 and got[arm]["peak_allocated_loss_backward_bytes"] > 0
        assert got[arm]["zero_stage"] == 3 and got[arm]["decoder_tokens"] > 0 and got[arm]["vocab"] == 2000
    assert got["ours"]["first_loss"] == pytest.approx(got["naive"]["first_loss"], rel=1e-5)
    assert got["naive"]["peak_allocated_loss_backward_bytes"] > got["ours"]["peak_allocated_loss_backward_bytes"]


CACHE_SCRIPT = """
import sys, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {root!r} + "/bench")
import quality_stage_cache
from autoregembed.ground import distributed as D
from autoregembed.run.config import load_config
out, base, cache, lr, stage, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:]
cfg = load_config(None, ["output_dir=" + out, "model.base=" + base, f"{{stage}}.max_steps=2", f"{{stage}}.micro_batch_size=4",
                         f"{{stage}}.learning_rate=" + lr, f"{{stage}}.log_every=1", *extra])
D.init_distributed()
ds = {root!r} + "/ds_configs/zero2.json"
if stage == "stage1":
    artifact, entry = quality_stage_cache.cached_stage1(cfg, ds, base, cache)
else:
    artifact, entry = quality_stage_cache.cached_stage(cfg, stage, ds, cache)
print("ARTIFACT", artifact, "ENTRY", entry)
D.shutdown()
"""


def _files(folder: str) -> dict:
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


@pytest.mark.distributed
def test_stage1_cache_hands_a_finished_stage_1_to_a_later_run_and_only_that(tmp_path, default_tiny_base):
    """The report split reuses the tuning split's stage 1 (it reads no STS-B half): a second run with
    the same key trains nothing and gets the same model and metrics; another learning rate trains."""
    script = tmp_path / "run.py"
    script.write_text(CACHE_SCRIPT.format(root=ROOT))
    cache = str(tmp_path / "cache")
    runs = {}
    for name, lr in (("first", "1e-4"), ("second", "1e-4"), ("other", "2e-4")):
        out = str(tmp_path / name)
        r = run_child([script, out, default_tiny_base, cache, lr, "stage1"])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
        runs[name] = (r.stdout + r.stderr, os.path.join(out, "stage1"))
    assert "stage1 from the cache" not in runs["first"][0] and "step 2/2" in runs["first"][0]
    assert "stage1 from the cache" in runs["second"][0] and "step 2/2" not in runs["second"][0]
    assert "stage1 from the cache" not in runs["other"][0]
    assert len(os.listdir(cache)) == 2  # one entry per key, no temporary folders left
    entries = {n: runs[n][0].split("ENTRY ")[1].split()[0] for n in runs}  # what the record names
    assert entries["first"] == entries["second"] != entries["other"] and os.path.dirname(entries["first"]) == cache
    first, second = (_files(runs[n][1]) for n in ("first", "second"))
    assert first["metrics.jsonl"] == second["metrics.jsonl"] and not any(k.startswith("checkpoints") for k in second)
    model = {k: v for k, v in first.items() if k.startswith("model" + os.sep)}
    assert model and model == {k: v for k, v in second.items() if k.startswith("model" + os.sep)}


INFONCE = ["loss.kind=infonce", "model.lora_rank=0"]  # (b)'s stage 2, from the base (paths.stage1_model below)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_a_stage_stopped_mid_way_resumes_in_the_cache_and_keeps_the_uninterrupted_model(tmp_path, default_tiny_base,
                                                                                         stage):
    """A run that ends mid-stage (a session's end, a stop request) loses only the steps since its last
    checkpoint: the next run of the key resumes in ``<entry>.partial``, keeps the model an uninterrupted
    run keeps under the same key, and leaves no partial folder behind; stage 1 by its own key, (b)'s
    InfoNCE stage by its run's config."""
    script = tmp_path / "run.py"
    script.write_text(CACHE_SCRIPT.format(root=ROOT))
    inputs = [] if stage == "stage1" else [*INFONCE, f"paths.stage1_model={default_tiny_base}"]

    def run(cache, *extra, rc=0):
        r = run_child([script, str(tmp_path / "out"), default_tiny_base, str(tmp_path / cache), "1e-3", stage,
                       f"{stage}.max_steps=4", *inputs, *extra])
        assert r.returncode == rc, r.stdout[-3000:] + r.stderr[-4000:]
        return r.stdout + r.stderr

    run("a")
    stopped = run("b", f"{stage}.save_every=1", f"{stage}.stop_after=2", rc=1)
    (partial,) = os.listdir(tmp_path / "b")
    (key,) = os.listdir(tmp_path / "a")
    assert partial == key + ".partial" and "ENTRY" not in stopped
    assert f"[quality] {stage} stopped before its end (stopped); the same command resumes it" in stopped
    resumed = run("b", f"{stage}.save_every=1")
    assert "(step 2)" in resumed and "step 1/4" not in resumed  # loaded step 2's checkpoint, trained 3 and 4
    assert os.listdir(tmp_path / "b") == [key]  # the same key; the partial removed
    again = run("b")
    assert f"{stage} from the cache" in again and "step 1/4" not in again
    straight, resumed = (_files(tmp_path / c / key) for c in ("a", "b"))
    weights = [{k: v for k, v in f.items() if k.endswith(".safetensors")} for f in (straight, resumed)]  # not the card
    assert weights[0] and weights[0] == weights[1]
    losses = [[json.loads(line)["loss"] for line in f["metrics.jsonl"].decode().splitlines()]
              for f in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_run_key_follows_the_whole_config_and_the_files_it_names(tmp_path):
    """Every trained stage but stage 1 is kept by its run's whole config: any setting, or the content of
    a file or folder it names (rows, the model it starts from), makes another key; its output folder and
    when it checkpoints do not."""
    from autoregembed.run.config import load_config

    rows, start = tmp_path / "rows.jsonl", tmp_path / "start"
    rows.write_text('{"query": "q", "pos": "p", "neg": "n"}\n')
    start.mkdir()
    (start / "w.bin").write_bytes(b"1")
    ds = os.path.join(ROOT, "ds_configs", "zero2.json")

    def key(*extra, out="a"):
        cfg = load_config(None, [f"data.stage2={rows}", f"paths.stage1_model={start}", f"output_dir={tmp_path / out}",
                                 *extra])
        return quality_stage_cache.run_key(cfg, "stage2", ds)

    same = key()
    assert key(out="b") == same and key("stage2.save_every=5", "stage2.keep_last=1", "stage2.stop_after=2") == same
    assert key("eval.instruction=x") != same and key("seed=7") != same and key("stage2.learning_rate=0.5") != same
    # a bare word is a name, not a path, even where a folder of that name sits in the working directory
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "f.py").write_text("1")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        named = key("monitor.wandb_project=proj")
        (tmp_path / "proj" / "f.py").write_text("2")
        assert key("monitor.wandb_project=proj") == named
    finally:
        os.chdir(cwd)
    rows.write_text('{"query": "q", "pos": "p", "neg": "m"}\n')
    changed_rows = key()
    (start / "w.bin").write_bytes(b"2")
    assert len({same, changed_rows, key()}) == 3
    # the model it starts from inside the output folder (the benchmark's stage 1): its content, not its path
    for out in ("a", "b"):
        (tmp_path / out / "stage1").mkdir(parents=True)
        shutil.copytree(start, tmp_path / out / "stage1" / "model")
    inside = [key(f"paths.stage1_model={tmp_path / out / 'stage1' / 'model'}", out=out) for out in "ab"]
    assert inside[0] == inside[1] != key()
    (tmp_path / "b" / "stage1" / "model" / "w.bin").write_bytes(b"3")
    assert key(f"paths.stage1_model={tmp_path / 'b' / 'stage1' / 'model'}", out="b") != inside[0]


def test_stage1_key_follows_what_decides_stage_1_and_nothing_else(tmp_path):
    from autoregembed.run.config import load_config

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"context": "a b", "instruction": "i", "output": "a b"}\n')
    ds = os.path.join(ROOT, "ds_configs", "zero2.json")

    def key(*extra, data=str(rows)):
        return quality_stage_cache.stage1_key(load_config(None, [f"data.stage1={data}", *extra]), ds, "tiny")

    same = key()
    assert key("output_dir=elsewhere", "stage2.learning_rate=0.5", "eval.instruction=x") == same
    assert key("stage1.save_every=25", "stage1.keep_last=1", "stage1.stop_after=3") == same  # a resume retraces the run
    assert key("stage1.learning_rate=0.5") != same and key("seed=7") != same
    assert key("model.shared_prefix=2") != same and key("stage1_loss.contrast=1.0") != same
    copy = tmp_path / "copy.jsonl"
    copy.write_text(rows.read_text())
    assert key(data=str(copy)) == same  # the rows' content, not their path
    copy.write_text(rows.read_text().replace("a b", "a c"))
    assert key(data=str(copy)) != same


def test_pooling_benchmark_reads_the_states_the_encoder_pools(tiny_export):
    """bench/pooling.py's per-position states, mean-pooled and normalised, are the Encoder's embedding
    (it swaps the Encoder's pooling for one call only)."""
    import torch
    import torch.nn.functional as F

    from autoregembed.release.encoder import Encoder

    pooling = bench_module("pooling")
    enc = Encoder.from_pretrained(tiny_export)
    texts = ["a cat sat on the mat", "two dogs", "the weather is nice today"]
    states = pooling.states(enc, texts)
    assert states.shape == (3, enc.k, enc.model.config.hidden_size)
    ours = enc.encode(texts, convert_to_numpy=False).double()
    assert torch.allclose(F.normalize(states.mean(1), dim=-1), ours, atol=1e-5)


def test_pooling_benchmarks_subsets_are_the_trainers_poolings(tiny_export, monkeypatch, capsys):
    """bench/pooling.py --subsets scores every subset of positions under its e_i names, and the subset
    e_1..e_4 it averages is the embedding of an export with eval.pooling=all_but_last."""
    import torch
    import torch.nn.functional as F

    from autoregembed.release.encoder import Encoder

    pooling = bench_module("pooling")
    sts = os.path.join(ROOT, "autoregembed", "resources", "sts_dev_sample.csv")
    monkeypatch.setattr("sys.argv", ["pooling.py", "--model", tiny_export, "--sts", sts, "--subsets"])
    pooling.main()
    out = json.loads(capsys.readouterr().out)
    subsets = out["subsets (Spearman x100)"]
    assert len(subsets) == 31 and subsets["3"] == out["e_3 alone"]["spearman_x100"]
    assert subsets["12345"] == out["mean of e_1..e_k (the method's embedding)"]["spearman_x100"]
    texts = ["a cat sat on the mat", "two dogs", "the weather is nice today"]
    states = pooling.states(Encoder.from_pretrained(tiny_export, device="cpu"), texts)
    four = Encoder.from_pretrained(tiny_export, device="cpu", pooling="all_but_last").encode(texts, convert_to_numpy=False)
    assert torch.allclose(F.normalize(states[:, :4].mean(1), dim=-1), four.double(), atol=1e-5)
    assert not torch.allclose(F.normalize(states.mean(1), dim=-1), four.double(), atol=1e-5)


def test_without_gguf_the_model_conversion_says_what_to_install_in_one_line(tmp_path):
    """The SmolLM2 benchmarks convert the model once from GGUF: without the gguf package that is one
    line naming the extra, before anything is downloaded (gguf is made unimportable for the child)."""
    (tmp_path / "shadow" / "gguf").mkdir(parents=True)
    (tmp_path / "shadow" / "gguf" / "__init__.py").write_text("raise ImportError('no gguf here')\n")
    env = {**os.environ, "AUTOREGEMBED_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path / "shadow")}
    r = run_child([os.path.join(ROOT, "bench", "harness.py")], env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("the SmolLM2 model is converted once from its GGUF file, which needs the gguf "
                                "package: pip install -e '.[bench]' (or pip install gguf)")
    assert not (tmp_path / "cache").exists()


def _default_record(folder, name, seed, scores, code=None, retrieval=True, **options):
    """A report record as bench/quality.py writes it in ``folder``/quality_runs at its default settings
    but for ``options`` (e.g. nli_rows): ``scores`` arm name -> STS x100 on ``seed``, retrieval on two
    collections (x/400 and x/300) when ``retrieval``, package code this checkout's unless ``code``."""
    cli = ["--split", "report"] + [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    arms = "".join(sorted({n[1] for n in scores}))
    os.makedirs(folder / "quality_runs", exist_ok=True)
    path = _record(folder / "quality_runs", f"report-{name}", seed, arms,
                   {n: {seed: x} for n, x in scores.items() if n not in quality_record.RETRIEVAL_ONLY})
    r = json.loads(open(path).read())
    r["model"] = "SmolLM2-135M-Instruct"
    r["settings"] = {**quality_record._settings(vars(bench_module("quality").parser().parse_args(cli))),
                     "seeds": seed, "arms": arms}
    r["package_code"] = code or bench_module("harness").package_code_digest()
    if retrieval:
        r["retrieval"] = quality_record.retrieval_summary(
            {n: {seed: {"Cranfield": {"ndcg@10": x / 400, "recall@100": 0.5},
                        "CISI": {"ndcg@10": x / 300, "recall@100": 0.5}}} for n, x in scores.items()})
    open(path, "w").write(json.dumps(r))
    return path


def test_learning_curve_pools_each_sizes_seeds_and_says_where_b_at_2n_reaches_d_at_n(tmp_path):
    """bench/learning_curve.py --plot-only on records as bench/quality.py writes them: per size, the seeds
    pooled (mean ± std) whichever records hold them (the table's (b) and (d) are the curve's 240),
    records of other settings or package code left out, and the crossing stated."""
    for name, size, seed, b, d, other in (
            ("a", 120, "42", 70.0, 75.0, {}), ("b", 120, "1", 72.0, 77.0, {}),
            ("c", 240, "42", 76.0, None, {}), ("c2", 240, "42", None, 80.0, {}), ("d", 240, "1", 76.0, 82.0, {}),
            ("e", 240, "2", 10.0, 10.0, {"stage2_steps": 99}),  # not this curve's step count
            ("f", 240, "7", 12.0, 12.0, {"code": "another"})):  # trained by other code
        scores = {n: x for n, x in ((B, b), (D, d)) if x is not None}
        _default_record(tmp_path, name, seed, scores, nli_rows=size,
                        stage2_steps=other.get("stage2_steps", size // 8), code=other.get("code"))
    r = run_child([os.path.join(ROOT, "bench", "learning_curve.py"), "--plot-only", "--sizes", "120,240",
                   "--results", str(tmp_path)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    curve = json.loads((tmp_path / "learning_curve.json").read_text())
    assert curve["sizes"]["240"]["b"]["sts"] == {"mean": 76.0, "std": 0.0, "per_seed": {"42": 76.0, "1": 76.0}}
    assert curve["sizes"]["240"]["d"]["ndcg@10"]["per_seed"] == {"42": round((80 / 400 + 80 / 300) / 2, 4),
                                                                   "1": round((82 / 400 + 82 / 300) / 2, 4)}
    assert curve["sizes"]["120"]["d"]["sts"]["mean"] == 76.0
    assert curve["crossings"][0] == "sts: (b) at 240 = 76.0 ± 0.0 (2 seeds) reaches (d) at 120 = 76.0 ± 1.41 (2 seeds)"
    assert (tmp_path / "learning_curve.png").stat().st_size > 0


def test_a_point_is_measured_once_a_record_holds_its_sts_and_its_retrieval_on_every_collection(tmp_path, monkeypatch):
    """quality_record.measured: a point stopped between its STS and its retrieval is not measured; BM25 needs
    no STS; arm (a) is measured once all three of its rows are, under seed "None"."""
    A = quality_record.ARM_NAMES["a"]
    one = _default_record(tmp_path, "one", "42", {B: 70.0, D: 75.0})
    sts_only = _default_record(tmp_path, "two", "1", {B: 72.0}, retrieval=False)
    a_part = _default_record(tmp_path, "three", "None", {A[0]: 30.0, A[2]: 100.0})
    assert quality_record.measured([one, sts_only, a_part], retrieval=True) == {("b", "42"), ("d", "42")}
    assert ("b", "1") in quality_record.measured([sts_only], retrieval=False)
    a_rest = _default_record(tmp_path, "four", "None", {A[1]: 60.0})
    assert quality_record.measured([a_part, a_rest], retrieval=True) == {("a", "None")}
    monkeypatch.chdir(tmp_path / "quality_runs")  # records name their DeepSpeed config from the checkout
    harness = bench_module("harness")
    runs = tmp_path / "quality_runs"
    for name, data in (("one", "ours"), ("two", None), ("five", "other data")):  # "two": from before records named it
        r = json.loads((runs / f"report-{'one' if name == 'five' else name}.json").read_text())
        (runs / f"report-{name}.json").write_text(json.dumps({**r, "data": data}))
    kept = quality_record.kept_records(str(tmp_path), "report", "SmolLM2-135M-Instruct",
                                       vars(bench_module("quality").parser().parse_args(["--split", "report"])),
                                       harness.package_code_digest(), "ours")
    assert sorted(map(os.path.basename, kept)) == [f"report-{n}.json" for n in ("four", "one", "three", "two")]


def test_only_a_complete_table_at_the_default_settings_is_the_canonical_quality_json(tmp_path):
    """bench/quality.py --merge of records holding arms (a)-(e): at the benchmark's defaults they become
    quality.json; the same table at another setting is printed and its records stay where they are."""
    A = quality_record.ARM_NAMES["a"]
    arms = {A[0]: 30.0, A[1]: 60.0, A[2]: 100.0, B: 78.0, C: 74.0, D: 77.0, quality_record.ARM_NAMES["e"][0]: 77.5}
    for folder, options in ((tmp_path / "default", {}), (tmp_path / "other", {"stage2_lr": 3e-4})):
        paths = [_default_record(folder, f"r{i}", "None" if n in A else "42", {n: x}, **options)
                 for i, (n, x) in enumerate(arms.items())]
        r = run_child([os.path.join(ROOT, "bench", "quality.py"), "--merge", *paths, "--results", str(folder)])
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert (folder / "quality.json").exists() == (not options), r.stdout[-1000:]
    assert json.loads((tmp_path / "default" / "quality.json").read_text())["spearman_x100"][D]["mean"] == 77.0
    table = (tmp_path / "default" / "quality.md").read_text().splitlines()
    assert table[0] == "| arm | STS-B x100 | nDCG@10 Cranfield | nDCG@10 CISI | nDCG@10 mean |"
    free = " (no training)"
    assert table[3] == f"| {A[1]} | 60.00{free} | 0.1500{free} | 0.2000{free} | 0.1750{free} |"
    assert table[4] == f"| {A[2]} | — | 0.2500{free} | 0.3333{free} | 0.2917{free} |"  # BM25: retrieval only
    one = " (n=1)"
    assert table[7] == (f"| {D} | 77.00 ± 0.00{one} | 0.1925 ± 0.0000{one} | 0.2567 ± 0.0000{one} | "
                        f"0.2246 ± 0.0000{one} |")
    assert not (tmp_path / "other" / "quality.md").exists()
    assert "settings other than the defaults: quality.json (the canonical table) not written" in r.stdout


def test_domain_adaptation_sets_each_adapted_arm_beside_its_twin_and_pairs_the_gains_by_seed(tmp_path):
    """bench/domain_adaptation.py --table-only on records as bench/quality.py writes them: the defaults' (b),
    (c), (d) and BM25 beside --stage1-corpus general+ir's (c), (d), (g); each gain is the difference of one
    seed's two models, over the seeds both hold; records of other settings or code are left out."""
    A, G = quality_record.ARM_NAMES["a"], quality_record.ARM_NAMES["g"][0]
    for name, seed, scores, options in (
            ("p42", "42", {B: 76.0, C: 70.0, D: 74.0}, {}), ("p1", "1", {B: 78.0, C: 72.0, D: 76.0}, {}),
            ("bm25", "None", {A[2]: 100.0}, {}),
            ("a42", "42", {C: 71.0, D: 78.0, G: 77.0}, {"stage1_corpus": "general+ir"}),
            ("a1", "1", {C: 73.0, D: 79.0}, {"stage1_corpus": "general+ir"}),  # (g) not yet run on seed 1
            ("x", "2", {D: 10.0}, {"stage1_corpus": "general+ir", "stage2_lr": 1.0})):  # other settings
        path = _default_record(tmp_path, name, seed, scores, **options)
        r = json.loads(open(path).read())
        gap = 1.5 + 0.25 * ("stage1_corpus" in options) + 0.01 * (seed == "1")
        r["info_gap"] = {f"stage1 seed {seed}": {"step": 150, "nats_per_token": gap}} if C in scores else {}
        open(path, "w").write(json.dumps(r))
    r = run_child([os.path.join(ROOT, "bench", "domain_adaptation.py"), "--table-only", "--results", str(tmp_path)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    t = json.loads((tmp_path / "domain_adaptation.json").read_text())
    gain = t["gains"]["stage 1 on the documents: adapted (d) - (d)"]
    assert gain["sts"] == {"mean": 3.5, "std": 0.71, "n": 2, "per_seed": {"42": 4.0, "1": 3.0}}
    assert gain["ndcg@10 mean"]["per_seed"]["42"] == round((78 - 74) / 400 / 2 + (78 - 74) / 300 / 2, 4)
    assert t["gains"]["InfoNCE on the documents: (g) - (b)"]["sts"]["per_seed"] == {"42": 1.0}
    assert t["rows"]["(d) adapted (c) + stage 2"]["sts"]["per_seed"] == {"42": 78.0, "1": 79.0}
    assert t["rows"]["BM25 (lexical floor)"]["ndcg@10 Cranfield"]["mean"] == 0.25
    md = (tmp_path / "domain_adaptation.md").read_text().splitlines()
    assert md[0] == "| arm | nDCG@10 Cranfield | nDCG@10 CISI | nDCG@10 mean | STS-B x100 |"
    assert md[9] == ("| stage 1 on the documents: adapted (d) - (d) | +0.0088 ± 0.0018 (n=2) | "
                     "+0.0117 ± 0.0023 (n=2) | +0.0102 ± 0.0021 (n=2) | +3.50 ± 0.71 (n=2) |")
    assert t["info_gap"] == {"plain": {"42": 1.5, "1": 1.51}, "adapted": {"42": 1.75, "1": 1.76}}
    assert md[-1] == ("Stage 1's information gap at its last step, on its own probe rows (the adapted run's are "
                      "documents too), nats/token: plain: seed 1 1.510, seed 42 1.500; "
                      "adapted: seed 1 1.760, seed 42 1.750")


@needs_shared_data
def test_learning_curve_trains_each_point_once_and_a_seeds_later_sizes_read_its_stage_1(tmp_path, default_tiny_base):
    """bench/learning_curve.py end to end on the tiny base, two points side by side: every (size, arm)
    of the seed is trained and recorded, (d) at the second size reads stage 1 from the cache the first
    filled, and a second call finds every point measured and trains nothing."""
    results, out = tmp_path / "curve", tmp_path / "out"
    cmd = [os.path.join(ROOT, "bench", "learning_curve.py"), "--sizes", "8,16", "--seeds", "1", "--jobs", "2",
           "--results", str(results), "--out", str(out), "--base", default_tiny_base,
           "--stage1-steps", "2", "--no-retrieval", "--stage1-cache", str(tmp_path / "cache")]
    r = run_child(cmd, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    curve = json.loads((results / "learning_curve.json").read_text())
    assert set(curve["sizes"]) == {"8", "16"}
    assert all(set(curve["sizes"][n][a]["sts"]["per_seed"]) == {"1"} for n in ("8", "16") for a in "bd")
    logs = {n: (out / n / "job-d-seed1.log").read_text() for n in ("n8", "n16")}
    assert ["stage1 from the cache" in log for log in logs.values()] == [False, True]
    records = [json.loads(p.read_text()) for p in (results / "quality_runs").glob("*")]
    named = {r["stage1_cache"].get("stage1 seed 1") for r in records}
    (entry,) = named - {None}  # the (d) records name the one entry both sizes read; (b) has no stage 1
    kept = os.listdir(tmp_path / "cache")
    assert [n for n in kept if n.startswith("seed")] == [os.path.basename(entry)]
    assert len([n for n in kept if n.startswith("stage2-seed1-")]) == 4  # (b) and (d)'s stage 2 at each size
    again = run_child(cmd, timeout=120)
    assert again.returncode == 0 and again.stdout.count("left to run: nothing") == 2, again.stdout[-2000:]
    assert "seed 1: " not in again.stdout  # no job started


@needs_shared_data
def test_stage_2_on_negatives_mined_by_the_stage_1_model(tmp_path, default_tiny_base):
    """--stage2-negatives mined: (d) trains on the NLI rows with negatives (c)'s model mined among the rows'
    own positives and negatives (never the row's positive), its reference scores computed on those rows
    (stage 2 refuses rows without them), and the record says so."""
    out, results = tmp_path / "out", tmp_path / "results"
    r = run_child([os.path.join(ROOT, "bench", "quality.py"), "--split", "tune", "--arms", "d", "--seeds", "1",
                   "--base", default_tiny_base, "--stage1-steps", "2", "--stage2-steps", "2", "--no-retrieval",
                   "--nli-rows", "16", "--stage2-negatives", "mined", "--mined-negatives", "2",
                   "--out", str(out), "--results", str(results), "--stage1-cache", ""], timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    nli = [json.loads(line) for line in (out / "stage2.jsonl").read_text().splitlines()]
    mined = [json.loads(line) for line in (out / "seed1" / "stage2-mined.jsonl").read_text().splitlines()]
    assert [m["query"] for m in mined] == [n["query"] for n in nli]
    negs = [n["neg"] if isinstance(n["neg"], list) else [n["neg"]] for n in nli]
    pool = {n["pos"] for n in nli} | {t for ts in negs for t in ts}
    assert all(len(m["neg"]) == 2 and m["pos"] not in m["neg"] and set(m["neg"]) <= pool for m in mined)
    assert any(m["neg"] != own for m, own in zip(mined, negs))  # mined, not the rows' own negatives
    (path,) = (results / "quality_runs").glob("tune-*.json")
    record = json.loads(path.read_text())
    assert (record["settings"]["stage2_negatives"], record["settings"]["mined_negatives"]) == ("mined", 2)
    assert D in record["spearman_x100"] and "mine negatives seed 1" in record["seconds"]


def test_stage1_on_the_collections_documents_adds_them_as_autoencoding_rows_and_nothing_else(tmp_path, monkeypatch):
    """--stage1-corpus general+ir (stage 1 as domain adaptation): every document becomes an autoencoding
    row beside the NLI sentences (a blank one left out: a row needs text); no query and no judgment
    enters; without documents it refuses."""
    qd = bench_module("quality_data")
    monkeypatch.setattr(qd, "_nli_rows", lambda: [{"query": "q1", "pos": "p1", "neg": ["n1"], "instruction": "i"}])
    path = qd.stage1_file(str(tmp_path / "s1.jsonl"), "general+ir", False, documents=["doc one", " ", "doc two", "p1"])
    rows = [json.loads(line) for line in open(path)]
    assert [r["output"] for r in rows] == ["doc one", "doc two", "p1", "q1", "n1"]  # each text once
    assert all(r["context"] == r["output"] and r["instruction"] == qd.AUTOENCODE for r in rows)
    assert [r["output"] for r in map(json.loads, open(qd.stage1_file(str(tmp_path / "g.jsonl"), "general", False,
                                                                     documents=["doc one"])))] == ["q1", "p1", "n1"]
    with pytest.raises(SystemExit, match="general\\+ir: no retrieval collection"):
        qd.stage1_file(str(tmp_path / "none.jsonl"), "general+ir", False)


def test_crop_pairs_are_two_spans_of_one_text_and_a_span_of_another(tmp_path):
    """Arm (g)'s unsupervised rows: query and positive are contiguous word spans of the same stage-1 text
    (10-50% of its words, 5 at least), the negative a span of a different text; as many rows as asked,
    every text used before any repeats, and the same file for the same seed."""
    qd = bench_module("quality_data")
    texts = [" ".join(f"t{i}w{j}" for j in range(n)) for i, n in enumerate((40, 3, 100, 12))]
    s1 = tmp_path / "s1.jsonl"
    s1.write_text("".join(json.dumps({"context": t, "instruction": "r", "output": t}) + "\n" for t in texts))
    rows = [json.loads(line) for line in open(qd.crop_pairs_file(str(tmp_path / "c.jsonl"), str(s1), 10, seed=3))]
    assert len(rows) == 10 and {r["instruction"] for r in rows} == {qd.INSTRUCTION}

    def source(span):
        (i,) = {w.split("w")[0] for w in span.split()}  # one text's words only
        words = texts[int(i[1:])].split()
        start = words.index(span.split()[0])
        assert span.split() == words[start : start + len(span.split())]  # contiguous
        n = len(span.split())
        assert min(len(words), 5) <= n <= max(5, round(0.5 * len(words))), (span, len(words))
        return int(i[1:])

    sources = [source(r["query"]) for r in rows]
    assert sources == [source(r["pos"]) for r in rows]
    assert all(source(r["neg"][0]) != s for r, s in zip(rows, sources))
    assert sorted(sources[:4]) == [0, 1, 2, 3]  # a cycle through every text before any repeats
    assert any(len(r["query"].split()) >= 10 for r in rows)  # long texts give long views
    again = qd.crop_pairs_file(str(tmp_path / "again.jsonl"), str(s1), 10, seed=3)
    assert open(again).read() == open(tmp_path / "c.jsonl").read()
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"context": "x", "instruction": "r", "output": "x"}) + "\n")
    with pytest.raises(SystemExit, match="at least two stage-1 texts"):
        qd.crop_pairs_file(str(tmp_path / "no.jsonl"), str(one), 3, seed=0)


@needs_shared_data
def test_the_quality_benchmark_scores_the_arms_asked_and_g_starts_from_its_crops_phase(tmp_path, default_tiny_base):
    """bench/quality.py end to end on the tiny base: arms (b), (d), (g) train through the trainer and are
    scored; (c) is trained for (d) but not scored (its retrieval costs ~15 min an arm); (g)'s InfoNCE
    phase starts from its crops phase's model, so its first losses differ from (b)'s on the same rows.
    Asked again, it finds the points in the record and only prints their table."""
    out, results = tmp_path / "out", tmp_path / "results"
    r = run_child([os.path.join(ROOT, "bench", "quality.py"), "--split", "report", "--arms", "bdg", "--seeds", "1",
                   "--base", default_tiny_base, "--stage1-steps", "2", "--stage2-steps", "2", "--no-retrieval",
                   "--out", str(out), "--results", str(results), "--stage1-cache", ""], timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (path,) = (results / "quality_runs").glob("report-*.json")
    record = json.loads(path.read_text())
    assert set(record["spearman_x100"]) == {B, "(d) stage 1 + stage 2", quality_record.ARM_NAMES["g"][0]}
    losses = record["loss_first_last"]
    assert {"(b) seed 1", "(g) unsupervised seed 1", "(g) seed 1", "stage1 seed 1"} <= set(losses)
    assert losses["(g) seed 1"][0] != losses["(b) seed 1"][0]
    assert (out / "crops-seed1.jsonl").read_text().count("\n") == 2 * 8  # stage 1's steps x (b)'s triplets a step
    again = run_child([os.path.join(ROOT, "bench", "quality.py"), "--split", "report", "--arms", "bd", "--seeds", "1",
                       "--base", default_tiny_base, "--stage1-steps", "2", "--stage2-steps", "2", "--no-retrieval",
                       "--out", str(out), "--results", str(results), "--stage1-cache", ""], timeout=120)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "1 record(s) of this code and these settings" in again.stdout and "left to run: nothing" in again.stdout
    assert f"{B:<34} {record['spearman_x100'][B]['mean']:6.2f}" in again.stdout
    assert len(list((results / "quality_runs").glob("report-*.json"))) == 1  # nothing trained, nothing recorded


def test_an_alias_makes_the_current_code_name_the_earlier_one_in_records_and_cache_keys(tmp_path, monkeypatch):
    """bench/results/code_aliases.json (bench/code_alias.py): when the current package code has an alias, the
    records' digest and the cache keys' code are the earlier code's, so its records and stages keep pooling;
    without one, the current files'."""
    import harness

    from autoregembed.run.config import load_config

    current = harness.current_code_file_hashes()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"context": "a b", "instruction": "i", "output": "a b"}\n')
    ds = os.path.join(ROOT, "ds_configs", "zero2.json")
    key = lambda: quality_stage_cache.stage1_key(load_config(None, [f"data.stage1={rows}"]), ds, "tiny")  # noqa: E731
    monkeypatch.setattr(harness, "CODE_ALIASES", str(tmp_path / "aliases.json"))
    mine, my_key = harness.package_code_digest(), key()
    assert mine == harness.code_digest(current)
    earlier = [(rel, "00" * 32) if i == 0 else (rel, sha) for i, (rel, sha) in enumerate(current)]
    (tmp_path / "aliases.json").write_text(json.dumps({"aliases": [
        {"code": harness.code_digest(earlier), "same_as": "x", "files": dict(current)}]}))  # an alias of other code
    assert harness.package_code_digest() == mine and key() == my_key
    (tmp_path / "aliases.json").write_text(json.dumps({"aliases": [
        {"code": mine, "same_as": harness.code_digest(earlier), "files": dict(earlier)}]}))
    aliased = key()
    assert harness.package_code_digest() == harness.code_digest(earlier) != mine and aliased != my_key
    (tmp_path / "aliases.json").unlink()
    monkeypatch.setattr(harness, "current_code_file_hashes", lambda: earlier)  # the earlier code itself
    assert key() == aliased and harness.package_code_digest() == harness.code_digest(earlier)


def test_a_record_of_code_aliased_after_it_was_written_pools_under_the_earlier_code(tmp_path, monkeypatch):
    """A run started before bench/code_alias.py aliased its code names the new code in its record; once the
    alias exists the record pools (kept_records, merge_records) with the earlier code's, and with no other."""
    import harness

    monkeypatch.setattr(harness, "CODE_ALIASES", str(tmp_path / "aliases.json"))
    results = tmp_path / "results"
    (results / "quality_runs").mkdir(parents=True)
    settings = {"seeds": "42", "arms": "b", "deepspeed": "ds_configs/zero2.json"}
    for name, code, seed in (("r1", "old0", "42"), ("r2", "new1", "1"), ("r3", "other", "2")):
        (results / "quality_runs" / f"report-{name}.json").write_text(json.dumps({
            "split": "report", "model": "m", "package_code": code, "data": "d", "settings": {**settings, "seeds": seed},
            "spearman_x100": {B: {"mean": 78.0, "std": 0.0, "per_seed": {seed: 78.0}}}, "commit": name,
            "date": "2026-12-07", "command": "c", "retrieval": {}, "mean_pairwise_cosine": {B: {seed: 0.5}}}))
    kept = lambda: [os.path.basename(p) for p in quality_record.kept_records(  # noqa: E731
        str(results), "report", "m", settings, "old0", "d")]
    assert kept() == ["report-r1.json"]
    (tmp_path / "aliases.json").write_text(json.dumps({"aliases": [{"code": "new1", "same_as": "old0", "files": {}}]}))
    assert kept() == ["report-r1.json", "report-r2.json"]
    paths = [str(results / "quality_runs" / f"report-{n}.json") for n in ("r1", "r2")]
    merged = quality_record.merge_records(paths)
    assert merged["package_code"] == "old0" and merged["spearman_x100"][B]["per_seed"] == {"42": 78.0, "1": 78.0}
    with pytest.raises(SystemExit, match="different package code"):
        quality_record.merge_records(paths + [str(results / "quality_runs" / "report-r3.json")])


def test_code_alias_lists_every_measured_value_that_moved():
    code_alias = bench_module("code_alias")
    was = {"arms": {"spearman_x100": {"(b)": {"mean": 70.0, "per_seed": {"1": 70.0}}}, "info_gap": {}}}
    assert code_alias.differences(was, json.loads(json.dumps(was))) == []
    now = {"arms": {"spearman_x100": {"(b)": {"mean": 70.01, "per_seed": {"1": 70.01}}}, "info_gap": {"x": 1}}}
    assert code_alias.differences(was, now) == ["/arms/info_gap/x: None != 1",
                                                "/arms/spearman_x100/(b)/mean: 70.0 != 70.01",
                                                "/arms/spearman_x100/(b)/per_seed/1: 70.0 != 70.01"]


@needs_shared_data
def test_doc_gap_scores_each_set_per_export_as_reconstruct_does_and_pools_over_exports(tiny_export, tiny_base,
                                                                                      tmp_path):
    """bench/doc_gap.py: the report collections' documents and stage 1's texts, drawn the same way every run;
    each export's gap and accuracy per set are reconstruct's summary of those texts; two copies of one export
    pool to that value with no spread."""
    import shutil

    import torch

    doc_gap = bench_module("doc_gap")
    from autoregembed.release.encoder import Encoder
    from autoregembed.release.meta import ExportMeta
    from autoregembed.release.reconstruct import load_decoder, reconstruct, summary

    texts = doc_gap.sample_texts("report", 3)
    assert set(texts) == {"cranfield", "cisi", "stage1"} and all(len(t) == 3 and all(x.strip() for x in t)
                                                                  for t in texts.values())
    assert doc_gap.sample_texts("report", 3) == texts
    copies = [shutil.copytree(tiny_export, tmp_path / name) for name in ("seed1", "seed2")]
    out = tmp_path / "gap.json"
    doc_gap.main(["--models", *map(str, copies), "--n", "3", "--decoder", tiny_base, "--out", str(out)])
    result = json.loads(out.read_text())
    encoder = Encoder.from_pretrained(tiny_export, dtype=torch.float32)
    want = summary(reconstruct(encoder, load_decoder(tiny_base, "cpu"), texts["cisi"], doc_gap.AUTOENCODE,
                               ExportMeta.read(tiny_export).decoder_bos, max_new_tokens=1))
    gap = result["sets"]["cisi"]["info_gap"]
    assert gap["mean"] == pytest.approx(want["info_gap"], abs=1e-4) and gap["std"] == 0 and len(gap["per_model"]) == 2
    assert result["texts_per_set"] == {"cranfield": 3, "cisi": 3, "stage1": 3}
    with pytest.raises(SystemExit, match="not an export"):
        doc_gap.main(["--models", str(tmp_path), "--out", str(out)])


def test_cache_keys_ignore_settings_at_their_defaults_and_find_entries_of_the_earlier_key(tmp_path, monkeypatch):
    """A config field added at its default keeps every key (only values that differ from the defaults are
    hashed), and a stage-1 entry made under the earlier key (every setting hashed) is still found."""
    from autoregembed.run import config as config_module
    from autoregembed.run.config import load_config

    assert quality_stage_cache._non_default({"a": 1, "b": {"c": 2, "d": 3}, "e": {"f": 0}},
                                            {"a": 1, "b": {"c": 0}, "e": {"f": 0}}) == {"b": {"c": 2, "d": 3}}
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"context": "a b", "instruction": "i", "output": "a b"}\n')
    ds = os.path.join(ROOT, "ds_configs", "zero2.json")
    cfg = load_config(None, [f"data.stage1={rows}", "stage1.learning_rate=0.5"])
    new, earlier = quality_stage_cache.stage1_keys(cfg, ds, "tiny")
    assert new != earlier and quality_stage_cache.run_key(cfg, "stage2", ds).startswith("stage2-seed42-")
    run_key = quality_stage_cache.run_key(cfg, "stage2", ds)
    real_asdict = config_module.dataclasses.asdict

    def with_a_new_field(obj):  # as if ModelConfig had gained a field, at its default, in this config and Config()
        out = real_asdict(obj)
        if "model" in out:
            out["model"]["a_new_option"] = True
        return out

    monkeypatch.setattr(quality_stage_cache.dataclasses, "asdict", with_a_new_field)
    assert quality_stage_cache.stage1_keys(cfg, ds, "tiny")[0] == new
    assert quality_stage_cache.run_key(cfg, "stage2", ds) == run_key
    monkeypatch.undo()
    cache = tmp_path / "cache"
    (cache / earlier).mkdir(parents=True)
    assert quality_stage_cache._pick(str(cache), [new, earlier]) == str(cache / earlier)
    (cache / (new + ".partial")).mkdir()
    assert quality_stage_cache._pick(str(cache), [new, earlier]) == str(cache / earlier)  # finished first
    assert quality_stage_cache._pick(str(tmp_path / "empty"), [new, earlier]) == str(tmp_path / "empty" / new)
