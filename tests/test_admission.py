"""The driver's CPU admission check (executor/admission.py): a run whose workers cannot get their CPUs
is refused on a local cluster and warned about on a joined one, instead of waiting without end; and
in a real run on the session's cluster, nothing is read or written when it is refused."""

from __future__ import annotations

import pytest

from annotate.config import load_config
from annotate.executor.admission import CpuNeed, NotEnoughCpus, check_cpus, cpu_need

from bench.harness import TINY


def test_the_need_counts_every_chain_worker_sams_worker_and_one_reader():
    cfg = load_config(TINY, {"run": {"chain_worker_cpus": 0.25, "reader_cpus": 0.5}})
    need = cpu_need(cfg, 4, segment_worker=True)
    assert (need.workers, need.total) == (5, 5 * 0.25 + 0.5)
    assert "5 chain and segment workers x 0.25" in need.describe() and "run.reader_cpus" in need.describe()


def test_one_pool_of_chain_workers_per_run():
    """The chain runs in one worker pool, sized by the chain's most replicated model: the tiny chain's
    five stages no longer ask for a pool each."""
    from annotate.executor.runner import chain_worker_count
    from annotate.serving.apps import replicas
    from annotate.stages.chain import chain_of

    cfg = load_config(TINY, {"run": {"chain_workers_per_replica": 2},
                             "models": {"vlm": {"resources": {"replicas": 3}}}})
    chain = chain_of(cfg)
    assert len(chain) >= 4 and max(replicas(cfg.models[cfg.stages[s].model]) for s in chain) == 3
    assert chain_worker_count(cfg, chain) == 2 * 3  # not one pool of 2 x replicas per stage
    text_only = tuple(s for s in chain if cfg.stages[s].model != "vlm")
    assert chain_worker_count(cfg, text_only) == 2 * max(replicas(cfg.models[cfg.stages[s].model]) for s in text_only)


def test_enough_free_cpus_pass_at_once():
    calls = []
    check_cpus(CpuNeed(9, 0.25, 0.5), local=True, others=[], warn=calls.append,
               resources=lambda: (2.75, 4.0), settle_s=0)
    assert calls == []


def test_a_local_shortfall_is_refused_with_what_to_change():
    with pytest.raises(NotEnoughCpus) as err:
        check_cpus(CpuNeed(9, 0.25, 0.5), local=True, others=["longgrit-llm-57cf3754ff"], warn=print,
                   resources=lambda: (0.25, 4.0), settle_s=0)
    text = str(err.value)
    assert "2.75 CPUs" in text and "0.25 of its 4 CPUs free" in text
    assert "longgrit-llm-57cf3754ff" in text and "--stop" in text and "run.num_cpus" in text


def test_a_joined_cluster_is_warned_not_refused():
    warned = []
    check_cpus(CpuNeed(9, 0.25, 0.5), local=False, others=[], warn=warned.append,
               resources=lambda: (1.0, 4.0), settle_s=0)
    assert len(warned) == 1 and "autoscaling" in warned[0] and "add nodes" in warned[0]


def test_cpus_that_come_back_within_the_settling_time_are_waited_for():
    free = iter([0.5, 1.0, 3.0])
    check_cpus(CpuNeed(9, 0.25, 0.5), local=True, others=[], warn=print,
               resources=lambda: (next(free), 4.0), settle_s=5, poll_s=0.01)


@pytest.mark.slow
def test_a_run_that_cannot_fit_is_refused_before_reading_a_shard(ray_session, tmp_path):
    """On the session's local cluster: chain workers asking for more CPUs than the cluster has."""
    from annotate.data.store import FINAL, OutputStore
    from annotate.executor.runner import run_pipeline

    from bench.harness import SAMPLE_SHARDS

    cfg = load_config(TINY, {"run": {"chain_worker_cpus": 64}})
    with pytest.raises(NotEnoughCpus, match="workers x 64"):
        run_pipeline(cfg, SAMPLE_SHARDS, tmp_path, [0], stage="all")
    store = OutputStore(tmp_path)
    assert not list((tmp_path / "data").glob("*.parquet")) and not store.latest(FINAL)
