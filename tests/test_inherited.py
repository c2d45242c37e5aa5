"""The environment contract between processes (inherited): what a child is given is what it reads back."""

from __future__ import annotations

from graceful_http.inherited import OURS, Inherited, Role


def test_nothing_inherited_is_a_first_main():
    environ = {"HOME": "/root"}
    inherited = Inherited.from_environ(environ)
    assert inherited == Inherited()
    assert inherited.role is Role.FIRST_MAIN and inherited.generation == 1
    assert environ == {"HOME": "/root"}


def test_a_new_generation_reads_back_what_its_predecessor_wrote_and_the_app_sees_none_of_it():
    parent = Inherited(generation=4, carried_metrics="3 1 0.200000 12.500000")
    child = parent.for_new_generation(5).with_channel(7)
    environ = child.to_environ({"HOME": "/root", "GRACEFUL_HTTP_WORKER_FD": "9"})
    read = Inherited.from_environ(environ)
    assert read == Inherited(generation=5, handoff_fd=7, carried_metrics="3 1 0.200000 12.500000")
    assert read.role is Role.NEW_GENERATION
    assert environ == {"HOME": "/root"}


def test_new_counts_replace_the_carried_ones():
    assert Inherited(carried_metrics="1 0 0 0").for_new_generation(2, "2 0 0.1 5.0").carried_metrics == "2 0 0.1 5.0"


def test_a_worker_reads_back_its_index_channel_and_version():
    child = Inherited(generation=3, handoff_fd=5).for_worker(2, "0.1.0").with_channel(8)
    environ = child.to_environ({"PROMETHEUS_MULTIPROC_DIR": "/tmp/shared"})
    read = Inherited.from_environ(environ)
    assert read.role is Role.WORKER
    assert (read.generation, read.worker_index, read.worker_fd, read.main_version) == (3, 2, 8, "0.1.0")
    assert read.handoff_fd is None, "the handoff channel is the main's alone"
    assert read.metrics_shared_dir == "/tmp/shared"
    assert not set(OURS) & set(environ)
