"""Starting a local Ray on a busy machine: a raylet that misses Ray's fixed 30 s registration wait is started
again instead of ending the run with Ray's traceback (seen in CI under three test workers)."""

import pytest

from orchestrator.runtime import cluster


class FakeRay:
    """Stands in for ``ray``: ``init`` fails with Ray's startup time-out ``failures`` times, then works."""

    def __init__(self, failures: int, message: str = "The current node timed out during startup. ..."):
        self.failures, self.message = failures, message
        self.inits, self.shutdowns, self.started = 0, 0, False

    def is_initialized(self) -> bool:
        return self.started

    def init(self, **kwargs) -> None:
        self.inits += 1
        if self.inits <= self.failures:
            raise Exception(self.message)
        self.started = True

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_a_local_ray_that_times_out_at_startup_is_started_again(monkeypatch, caplog):
    fake = FakeRay(failures=2)
    monkeypatch.setattr(cluster, "ray", fake)
    with caplog.at_level("WARNING", logger=cluster.__name__):
        assert cluster.init_ray(None, 1, 1) is True
    assert (fake.inits, fake.shutdowns) == (3, 2)
    assert [r.getMessage().startswith("the local Ray did not start in time") for r in caplog.records] == [True, True]


def test_the_last_try_and_other_errors_are_raised(monkeypatch):
    fake = FakeRay(failures=cluster.LOCAL_START_TRIES)
    monkeypatch.setattr(cluster, "ray", fake)
    with pytest.raises(Exception, match="timed out during startup"):
        cluster.init_ray(None, 1, 1)
    assert fake.inits == cluster.LOCAL_START_TRIES

    other = FakeRay(failures=1, message="something else")
    monkeypatch.setattr(cluster, "ray", other)
    with pytest.raises(Exception, match="something else"):
        cluster.init_ray(None, None, 1)
    assert other.inits == 1
