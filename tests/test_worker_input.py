"""Per-worker input under MultiWorkerMirroredStrategy: each worker reads its shard.

The cluster tests start two localhost workers (tests/sharded_worker_job.py) and compare their
weights with single-device training on the same global batches; the lockstep agreement and the
sharding rewrite are also tested alone, in this process, with simulated workers.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import _cluster
import numpy as np
import pytest
import sharded_worker_job as job
import tensorflow as tf
from conftest import assert_weights_equal, make_data, make_model, weights_of
from hypothesis import given, settings
from hypothesis import strategies as st

from tfloop import _distribute
from tfloop.data import _lockstep, _pipeline, _sharding
from tfloop.data._source import Piece, pad_steps
from tfloop.errors import DataError

# ------------------------------------------------------------------ lockstep, simulated workers


def _exchange_between(workers: int):
    """An all-gather between ``workers`` threads (each calls the exchange of its index)."""
    barrier = threading.Barrier(workers, timeout=30)
    rows: list = [None] * workers

    def exchange_for(index: int):
        def exchange(row):
            rows[index] = list(row)
            barrier.wait()
            table = np.array(rows, dtype=np.int64)
            barrier.wait()
            return table

        return exchange

    return exchange_for


def _groups(sizes: list[int], k: int, offset: int):
    """Superbatches of K batches of the given sizes, cut into runs of equal size (as
    DatasetSource cuts them); batch j holds the example ids offset + j * 100 + 0..size-1."""
    for start in range(0, len(sizes), k):
        chunk = sizes[start : start + k]
        pieces, run = [], [0]
        for j in range(1, len(chunk) + 1):
            if j == len(chunk) or chunk[j] != chunk[run[0]]:
                batches = [
                    np.arange(size) + offset + (start + i) * 100
                    for i, size in zip(range(run[0], j), chunk[run[0] : j], strict=True)
                ]
                pieces.append(pad_steps(tf.constant(np.stack(batches)), k))
                run = [j]
        yield pieces


def _run_lockstep(per_worker_sizes: list[list[int]], k: int, empty=None):
    """Runs lockstep for every worker in a thread; returns each worker's pieces or error
    (``empty``: a worker short of steps adds empty ones, else uneven shards are an error)."""
    exchange_for = _exchange_between(len(per_worker_sizes))
    layout = _distribute.InputLayout(workers=len(per_worker_sizes))
    results: list = [None] * len(per_worker_sizes)

    def work(index: int) -> None:
        groups = _groups(per_worker_sizes[index], k, offset=index * 10_000)
        try:
            results[index] = [
                p
                for group in _lockstep.lockstep(
                    groups, k, exchange_for(index), layout, "data", empty
                )
                for p in group
            ]
        except DataError as error:
            results[index] = error

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(per_worker_sizes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "lockstep hung"
    return results


@settings(max_examples=25)
@given(
    k=st.integers(1, 5),
    steps=st.integers(1, 12),
    data=st.data(),
)
def test_lockstep_makes_every_worker_cut_alike_and_keeps_every_batch(k, steps, data):
    sizes = st.lists(st.integers(0, 3), min_size=steps, max_size=steps)
    per_worker = [data.draw(sizes), data.draw(sizes)]
    results = _run_lockstep(per_worker, k)
    layouts = [[piece.steps for piece in pieces] for pieces in results]
    assert layouts[0] == layouts[1]  # the same calls, of the same step counts, on every worker
    for index, pieces in enumerate(results):
        shapes = [tuple(piece.data.shape) for piece in pieces]
        assert all(shape[0] == k for shape in shapes)
        batches = [piece.data[i].numpy() for piece in pieces for i in range(piece.steps)]
        expected = [
            np.arange(size) + index * 10_000 + j * 100 for j, size in enumerate(per_worker[index])
        ]
        assert len(batches) == len(expected)
        for got, want in zip(batches, expected, strict=True):
            np.testing.assert_array_equal(got, want)


@settings(max_examples=25)
@given(k=st.integers(1, 5), data=st.data())
def test_lockstep_gives_a_short_worker_empty_steps_and_every_worker_the_same_calls(k, data):
    sizes = st.lists(st.integers(1, 3), min_size=0, max_size=12)
    per_worker = [data.draw(sizes), data.draw(sizes)]
    empty = _lockstep.empty_steps(tf.TensorSpec([None], tf.int64), k)
    results = _run_lockstep(per_worker, k, empty)
    layouts = [[piece.steps for piece in pieces] for pieces in results]
    assert layouts[0] == layouts[1]  # the same calls, of the same step counts
    longest = max(len(sizes) for sizes in per_worker)
    for index, pieces in enumerate(results):
        batches = [piece.data[i].numpy() for piece in pieces for i in range(piece.steps)]
        assert len(batches) == longest
        for j, got in enumerate(batches):
            if j < len(per_worker[index]):
                size = per_worker[index][j]
                np.testing.assert_array_equal(got, np.arange(size) + index * 10_000 + j * 100)
            else:
                assert got.shape == (0,)  # an empty step: no example, no weight


def test_lockstep_stops_every_worker_on_uneven_shards():
    results = _run_lockstep([[2, 2, 2, 2, 1], [2, 2, 2, 2]], k=2)
    for error in results:
        assert isinstance(error, DataError)
        assert "uneven" in str(error) and "worker(s) 1 ran out of batches 1 step(s)" in str(error)


def test_lockstep_stops_every_worker_on_overlapping_shards():
    exchange_for = _exchange_between(2)
    layout = _distribute.InputLayout(workers=2)
    same = [[pad_steps(tf.constant([[1.0, 2.0]]), 2)]]
    results: list = [None, None]

    def work(index: int) -> None:
        try:
            list(_lockstep.lockstep(iter(same), 2, exchange_for(index), layout))
        except DataError as error:
            results[index] = error

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all("same first batch" in str(error) for error in results)


def test_lockstep_reports_a_worker_that_cannot_read_its_shard():
    exchange_for = _exchange_between(2)
    layout = _distribute.InputLayout(workers=2)

    def broken():
        raise tf.errors.InvalidArgumentError(None, None, "not enough files")
        yield  # a generator

    inputs = [broken(), iter([[Piece(tf.zeros([2, 1]), 2)]])]
    results: list = [None, None]

    def work(index: int) -> None:
        try:
            list(_lockstep.lockstep(inputs[index], 2, exchange_for(index), layout))
        except DataError as error:
            results[index] = error

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert "reading this worker's shard failed (not enough files)" in str(results[0])
    assert "worker(s) 0 could not read their shard" in str(results[1])


# ------------------------------------------------------------------------ sharding, alone


def _shards(dataset, workers=2):
    layouts = [_distribute.InputLayout(workers, i, workers, 1) for i in range(workers)]
    return [
        [b.numpy().tolist() for b in _sharding.shard_for_worker(dataset, layout)]
        for layout in layouts
    ]


def test_data_sharding_gives_each_worker_its_share_of_every_global_batch():
    # 20 examples in global batches of 7: the workers' batches together are the global ones.
    w0, w1 = _shards(tf.data.Dataset.range(20).batch(7))
    assert w0 == [[0, 1, 2, 3], [7, 8, 9, 10], [14, 15, 16]]
    assert w1 == [[4, 5, 6], [11, 12, 13], [17, 18, 19]]
    # a batch size the pipeline hides (a map after batch): the legacy rebatch, same shares
    hidden = tf.data.Dataset.range(20).batch(7).map(lambda b: b)
    assert _shards(hidden) == [w0, w1]


def test_file_sharding_gives_each_worker_its_files(tmp_path):
    job.write_files(str(tmp_path))
    dataset = job.file_dataset(str(tmp_path))
    assert _pipeline.reads_files(dataset)
    shards = _shards(dataset.map(lambda x, y: x[:, 0]))
    files = sorted(str(path) for path in tmp_path.glob("*.tfrecord"))
    for index, got in enumerate(shards):
        mine = [x[:, 0].numpy() for x, _ in job._records(files[index::2]).batch(4)]
        np.testing.assert_allclose(np.concatenate(got), np.concatenate(mine))


def test_auto_sharding_off_keeps_the_whole_dataset():
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    dataset = tf.data.Dataset.range(8).batch(4).with_options(options)
    assert _sharding.shard_for_worker(dataset, _distribute.InputLayout(2, 0, 2, 1)) is None


@pytest.fixture
def no_global_seed():
    """No global seed and no op determinism (which forbids unseeded random ops) in the test."""
    from tensorflow.python.framework import config

    deterministic = config.is_op_determinism_enabled()
    config.disable_op_determinism()
    tf.random.set_seed(None)
    yield
    tf.random.set_seed(0)
    if deterministic:
        config.enable_op_determinism()


def test_an_unseeded_shuffle_sharded_by_data_is_a_data_error(no_global_seed):
    dataset = tf.data.Dataset.range(8).shuffle(8).batch(4)  # would differ between workers
    with pytest.raises(DataError, match=r"shuffles without a seed.*seed=\.\.\."):
        _sharding.shard_for_worker(dataset, _distribute.InputLayout(2, 0, 2, 1))
    seeded = tf.data.Dataset.range(8).shuffle(8, seed=1).batch(4)
    assert _sharding.shard_for_worker(seeded, _distribute.InputLayout(2, 0, 2, 1)) is not None


# ---------------------------------------------------------------------- two-worker cluster


def _cluster_run(out: Path, scenario: str, *extra: str, timeout: float = 240):
    workers = _cluster.start_workers("sharded_worker_job.py", [str(out), scenario, *extra])
    return _cluster.finish(workers, timeout)


def _load(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def _single(data):
    result = job.fit(None, data)
    return [np.asarray(w) for w in result["weights"]], result


@pytest.fixture(scope="module")
def cluster_input(tmp_path_factory):
    out = tmp_path_factory.mktemp("worker-input")
    (out / "files").mkdir()
    job.write_files(str(out / "files"))
    for code, output in _cluster_run(out, "input"):
        assert code == 0, output[-3000:]
    return out


@pytest.mark.slow
def test_each_worker_reads_only_its_files(cluster_input):
    examples_per_epoch = job.FILES * job.RECORDS_PER_FILE
    for index in range(2):
        reads = _load(cluster_input, f"file-{index}")["reads"] / job.EPOCHS
        assert reads == examples_per_epoch / 2  # its 2 of the 4 files, nothing else
        # sharding by data reads everything (and keeps its share): the documented cost
        assert _load(cluster_input, f"data-{index}")["reads"] / job.EPOCHS == job.SAMPLES


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["file", "data", "fn", "uneven"])
def test_workers_equal_single_device_on_the_same_global_batches(cluster_input, mode):
    reference = {
        "file": lambda: job.reference_file_dataset(str(cluster_input / "files")),
        "data": job.memory_dataset,
        "fn": job.memory_dataset,  # shuffle, shard, batch by B/2: the same global batches
        # uneven shards: worker 1's empty step adds nothing to the last global batch
        "uneven": lambda: job.memory_dataset(job.UNEVEN),
    }[mode]()
    single, result = _single(reference)
    for index in range(2):
        worker = _load(cluster_input, f"{mode}-{index}")
        assert worker["iterations"] == result["iterations"]
        assert_weights_equal(
            [np.asarray(w) for w in worker["weights"]], single, rtol=1e-5, atol=1e-7
        )
        np.testing.assert_allclose(worker["loss"], result["loss"], rtol=1e-5)


@pytest.mark.slow
def test_overlapping_shards_stop_every_worker_with_a_data_error(cluster_input):
    for index in range(2):
        assert "same first batch" in _load(cluster_input, f"overlap-{index}")["error"]


@pytest.mark.slow
def test_a_killed_worker_resumes_its_own_shard_exactly(tmp_path):
    (tmp_path / "files").mkdir()
    job.write_files(str(tmp_path / "files"))
    # worker 1 dies after update 5; the saves at updates 2 and 4 were made by both workers
    (chief_code, chief_output), (dead_code, _) = _cluster_run(tmp_path, "resume", "5")
    assert dead_code == 3 and chief_code != 0, chief_output[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert Path(tf.train.latest_checkpoint(str(checkpoints))).name == "ckpt-4"
    for worker in ("worker-0", "worker-1"):  # each worker's own iterator state
        assert (checkpoints / "workers" / worker / "ckpt-4.index").exists()
    for code, output in _cluster_run(tmp_path, "resume"):
        assert code == 0, output[-3000:]
    single, result = _single(job.reference_file_dataset(str(tmp_path / "files")))
    for index in range(2):
        worker = _load(tmp_path, f"resume-{index}")
        assert worker["first_step"] == 4  # restored, not started afresh
        assert worker["iterations"] == result["iterations"]
        assert_weights_equal(
            [np.asarray(w) for w in worker["weights"]], single, rtol=1e-5, atol=1e-7
        )


# --------------------------------------------------------------------- dataset functions


def _fit_function_or_dataset(strategy, data, epochs=2):
    import tfloop

    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        model = make_model()
    trainer = tfloop.Trainer(
        model, "adam", "categorical_crossentropy", accumulate_steps=2, strategy=strategy, seed=0
    )
    history = trainer.fit(data, epochs=epochs, verbose=0, steps_per_epoch=None)
    return trainer, history


def _examples(n=37):
    x, y = make_data(n)
    return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(n, seed=3)


def test_a_dataset_function_trains_evaluates_and_predicts_like_its_dataset():
    contexts = []

    def dataset_fn(context):
        contexts.append(
            (context.num_input_pipelines, context.input_pipeline_id, context.num_replicas_in_sync)
        )
        return _examples().batch(context.get_per_replica_batch_size(8))

    by_function, function_history = _fit_function_or_dataset(None, dataset_fn)
    by_dataset, dataset_history = _fit_function_or_dataset(None, _examples().batch(8))
    assert contexts == [(1, 0, 1)]  # once per fit, one pipeline of global batches
    assert_weights_equal(weights_of(by_function.model), weights_of(by_dataset.model))
    assert function_history.history == dataset_history.history
    assert by_function.evaluate(dataset_fn) == by_dataset.evaluate(_examples().batch(8))
    assert by_function.predict(dataset_fn).shape == (37, 3)


def test_a_dataset_function_under_mirrored_strategy_equals_single_device():
    from test_distribute import mirrored

    contexts = []

    def dataset_fn(context):
        contexts.append((context.num_input_pipelines, context.num_replicas_in_sync))
        # per-replica batches of 4: every 2 of them make one global batch of 8
        return _examples().batch(context.get_per_replica_batch_size(8))

    multi, multi_history = _fit_function_or_dataset(mirrored(), dataset_fn)
    single, single_history = _fit_function_or_dataset(None, _examples().batch(8))
    assert contexts == [(1, 2)]
    assert int(multi.optimizer.iterations.numpy()) == int(single.optimizer.iterations.numpy())
    assert_weights_equal(weights_of(multi.model), weights_of(single.model), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        multi_history.history["loss"], single_history.history["loss"], rtol=1e-5
    )


def test_bad_dataset_functions_are_data_errors():
    from tfloop.data import adapt

    with pytest.raises(DataError, match=r"returned a list, not a tf\.data\.Dataset"):
        adapt(lambda context: [1, 2, 3])
    with pytest.raises(DataError, match=r"def dataset_fn\(context\)"):
        adapt(lambda: tf.data.Dataset.range(3).batch(2))
    layout = _distribute.InputLayout(replicas=2, local_replicas=2)
    hidden = tf.data.Dataset.range(8).batch(2).map(lambda b: b)  # no static batch size
    with pytest.raises(DataError, match="per-replica batch size"):
        from tfloop.data._functions import merge_replica_batches

        merge_replica_batches(hidden, layout.local_replicas, "data")
