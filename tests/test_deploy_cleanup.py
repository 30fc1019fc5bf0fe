"""A failed deployment cleans up (issue 22): `ensure_apps` deletes the applications this call deployed,
never ones it found running, and says so; when deleting fails it prints the exact command. Serve itself
is monkeypatched here (`serve.run_many`, `serve.delete`, `serve.status` and the module's `running_apps`,
`start_serve`, `build_app` replaced by recorders, the clock by a fake one): no Ray cluster starts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import annotate.serving.apps as apps
from annotate.config import RunConfig, load_config

from bench.harness import TINY_FIELDS


class FakeServe:
    def __init__(self, states: dict[str, str], delete_fails: bool = False, run_fails: bool = False):
        self.states, self.delete_fails, self.run_fails = states, delete_fails, run_fails
        self.deployed, self.deleted = [], []

    def run_many(self, targets, wait_for_applications_running=False):
        if self.run_fails:
            raise RuntimeError("run_many: controller refused the applications")
        self.deployed += [t.name for t in targets]

    def delete(self, name):
        if self.delete_fails:
            raise ConnectionError("controller gone")
        self.deleted.append(name)

    def status(self):
        return SimpleNamespace(applications={n: SimpleNamespace(message="replica raised: no such model folder")
                                             for n in [*self.states, *self.deployed]})


@pytest.fixture
def models():
    cfg = load_config(TINY_FIELDS)
    return {"vlm": cfg.models["vlm"], "llm": cfg.models["llm"],
            "llm2": cfg.models["llm"].model_copy(update={"path": "/nonexistent/model"})}


def install(monkeypatch, fake: FakeServe, models, running: str, failing: str | None, stuck: bool = False):
    """`running` is found RUNNING; the others are deployed; `failing` goes DEPLOY_FAILED, the rest RUNNING
    (or stay DEPLOYING when `stuck`)."""
    from ray import serve

    names = {name: apps.model_app(name, m).app_name for name, m in models.items()}
    fake.states[names[running]] = "RUNNING"

    def running_apps():
        out = dict(fake.states)
        for name, app_name in names.items():
            if app_name in fake.deployed:
                out[app_name] = ("DEPLOY_FAILED" if name == failing else ("DEPLOYING" if stuck else "RUNNING"))
        return out

    clock = iter(range(0, 10_000, 3))
    monkeypatch.setattr(apps, "running_apps", running_apps)
    monkeypatch.setattr(apps, "start_serve", lambda run: None)
    monkeypatch.setattr(apps, "build_app", lambda name, model, run: f"app:{name}")
    monkeypatch.setattr(apps.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(apps.time, "sleep", lambda s: None)
    for attr in ("run_many", "delete", "status"):
        monkeypatch.setattr(serve, attr, getattr(fake, attr))
    return names


def test_a_failed_deployment_removes_what_this_call_deployed_only(monkeypatch, models):
    fake = FakeServe({})
    names = install(monkeypatch, fake, models, running="vlm", failing="llm2")
    events = []
    with pytest.raises(RuntimeError) as err:
        apps.ensure_apps(models, RunConfig(), on_event=events.append)
    assert sorted(fake.deployed) == sorted([names["llm"], names["llm2"]])
    assert sorted(fake.deleted) == sorted(fake.deployed) and names["vlm"] not in fake.deleted
    message = str(err.value)
    assert "'llm2' failed to deploy" in message and "Removed the application(s) this command deployed" in message
    assert names["llm"] in message and names["vlm"] not in message


def test_when_removing_fails_the_exact_command_is_printed(monkeypatch, models):
    fake = FakeServe({}, delete_fails=True)
    names = install(monkeypatch, fake, models, running="vlm", failing="llm2")
    with pytest.raises(RuntimeError) as err:
        apps.ensure_apps(models, RunConfig(), on_event=lambda e: None)
    message = str(err.value)
    assert "Could not remove" in message and "ray.init(address='auto')" in message
    assert f"serve.delete({names['llm']!r})" in message and f"serve.delete({names['llm2']!r})" in message
    assert f"serve.delete({names['vlm']!r})" not in message


def test_a_timeout_and_a_refused_deployment_clean_up_too(monkeypatch, models):
    fake = FakeServe({})
    names = install(monkeypatch, fake, models, running="vlm", failing=None, stuck=True)
    with pytest.raises(TimeoutError, match="Removed the application"):
        apps.ensure_apps(models, RunConfig(), on_event=lambda e: None, timeout_s=30)
    assert sorted(fake.deleted) == sorted([names["llm"], names["llm2"]])

    fake = FakeServe({}, run_fails=True)
    names = install(monkeypatch, fake, models, running="vlm", failing=None)
    with pytest.raises(RuntimeError, match="controller refused"):
        apps.ensure_apps(models, RunConfig(), on_event=lambda e: None)
    assert sorted(fake.deleted) == sorted([names["llm"], names["llm2"]])  # may have been partly created


def test_nothing_is_removed_when_everything_was_running(monkeypatch, models):
    fake = FakeServe({})
    install(monkeypatch, fake, {"vlm": models["vlm"]}, running="vlm", failing=None)
    assert apps.ensure_apps({"vlm": models["vlm"]}, RunConfig(), on_event=lambda e: None)["vlm"].deployed_now is False
    assert fake.deleted == [] and fake.deployed == []
