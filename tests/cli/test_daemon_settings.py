"""``ekko daemon`` settings: flags > EKKO_* environment > TOML > defaults, wrong types as
one-line errors, and the help texts (issue #19)."""

from __future__ import annotations

import argparse

import pytest

from ekko.cli.main import build_parser, main
from ekko.cli.settings import DAEMON_KEYS, REQUIRED_KEYS, daemon_settings, env_name
from ekko.core.config import FIELD_VALUE_TYPES, NodeConfig
from ekko.core.errors import UsageError

parse = build_parser().parse_args


def write(tmp_path, text: str):
    f = tmp_path / "replica.toml"
    f.write_text(text)
    return f


def test_flags_beat_environment_beat_file(tmp_path):
    cfg = write(tmp_path, '[daemon]\nnode_id = "from-file"\ndc = "dc-file"\nlisten = "127.0.0.1:7000"\n'
                          'data_dir = "/tmp/file"\ntorch_threads = 3\n')
    env = {"EKKO_DC": "dc-env", "EKKO_DATA_DIR": "/tmp/env", "EKKO_SEEDS": "127.0.0.1:1, 127.0.0.1:2",
           "EKKO_TORCH_THREADS": "2", "EKKO_PRESET": "wan", "EKKO_NODE_ID": ""}
    settings, config = daemon_settings(parse(["daemon", "--config", str(cfg), "--data-dir", "/tmp/flag"]), env)
    assert settings["node_id"] == "from-file"          # an empty variable counts as unset
    assert settings["dc"] == "dc-env"                  # environment over file
    assert settings["data_dir"] == "/tmp/flag"         # flag over environment
    assert settings["seeds"] == ["127.0.0.1:1", "127.0.0.1:2"] and settings["torch_threads"] == 2
    assert config.preset == "wan"


def test_environment_alone_is_enough():
    env = {env_name(k): v for k, v in zip(REQUIRED_KEYS, ("r1", "dc1", "127.0.0.1:7000", "/tmp/r1"))}
    settings, config = daemon_settings(parse(["daemon"]), env)
    assert [settings[k] for k in REQUIRED_KEYS] == ["r1", "dc1", "127.0.0.1:7000", "/tmp/r1"]
    assert config.preset == "local" and settings["seeds"] == []


def test_every_daemon_key_has_a_variable_and_a_flag():
    p = build_parser()
    daemon = p._subparsers._group_actions[0].choices["daemon"]
    dests = {a.dest for a in daemon._actions}
    assert set(DAEMON_KEYS) <= dests
    text = daemon.format_help()
    for k in DAEMON_KEYS:
        assert env_name(k) in text, k


def test_missing_settings_name_flag_and_variable():
    with pytest.raises(UsageError, match=r"--data-dir \(or EKKO_DATA_DIR\)"):
        daemon_settings(parse(["daemon", "--node-id", "a", "--dc", "d", "--listen", "127.0.0.1:1"]), {})


def test_wrong_type_in_toml_is_one_line_exit_2(tmp_path, capsys):
    cfg = write(tmp_path, '[node]\nae_interval = "fast"\n')
    argv = ["daemon", "--config", str(cfg), "--node-id", "a", "--dc", "d", "--listen", "127.0.0.1:1",
            "--data-dir", str(tmp_path / "d")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert str(cfg) in err and "ae_interval" in err and "float" in err and "'fast'" in err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("text, words", [
    ('[node]\npush = 1\n', ("push", "bool")),
    ('[node]\nqueue_rows = 1.5\n', ("queue_rows", "int")),
    ('[node]\ndc_links = [["a"]]\n', ("dc_links",)),
    ('[node]\npreset = 3\n', ("preset",)),
    ('[daemon]\ntorch_threads = "many"\n', ("torch_threads", "integer")),
    ('[daemon]\nseeds = "127.0.0.1:1"\n', ("seeds", "list")),
    ('[daemon]\ndevice = "gpu"\n', ("device", "cpu")),
    ('[daemon]\nopen_metrics = "yes"\n', ("open_metrics", "true or false")),
    ('node = 3\n', ("node",)),
])
def test_wrong_types_name_key_type_and_file(tmp_path, text, words):
    cfg = write(tmp_path, text)
    argv = ["daemon", "--config", str(cfg), "--node-id", "a", "--dc", "d", "--listen", "127.0.0.1:1",
            "--data-dir", "/tmp/a"]
    with pytest.raises(UsageError) as e:
        daemon_settings(parse(argv), {})
    assert str(cfg) in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_wrong_environment_value_names_the_variable():
    base = ["daemon", "--node-id", "a", "--dc", "d", "--listen", "127.0.0.1:1", "--data-dir", "/tmp/a"]
    for env, word in (({"EKKO_TORCH_THREADS": "two"}, "EKKO_TORCH_THREADS"), ({"EKKO_DEVICE": "tpu"}, "EKKO_DEVICE")):
        with pytest.raises(UsageError, match=word):
            daemon_settings(parse(base), env)


def test_open_metrics_is_off_unless_a_flag_variable_or_file_says_on(tmp_path):
    base = ["daemon", "--node-id", "a", "--dc", "d", "--listen", "127.0.0.1:1", "--data-dir", "/tmp/a"]

    def open_metrics(argv=(), env=None) -> bool:
        return daemon_settings(parse([*base, *argv]), env or {})[0]["open_metrics"]

    assert open_metrics() is False
    assert open_metrics(["--open-metrics"]) is True
    for word, want in (("1", True), ("true", True), ("ON", True), ("0", False), ("false", False), ("off", False)):
        assert open_metrics(env={"EKKO_OPEN_METRICS": word}) is want, word
    assert open_metrics(["--no-open-metrics"], {"EKKO_OPEN_METRICS": "1"}) is False      # flag over environment
    cfg = write(tmp_path, "[daemon]\nopen_metrics = true\n")
    assert open_metrics(["--config", str(cfg)]) is True
    assert open_metrics(["--config", str(cfg)], {"EKKO_OPEN_METRICS": "0"}) is False    # environment over file
    with pytest.raises(UsageError, match="EKKO_OPEN_METRICS"):
        open_metrics(env={"EKKO_OPEN_METRICS": "maybe"})


def test_every_node_field_type_is_checked():
    for f in NodeConfig.__dataclass_fields__.values():
        assert str(f.type) in FIELD_VALUE_TYPES, f.name


def _subcommand(name: str) -> argparse.ArgumentParser:
    return build_parser()._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize("name", ["cut", "cuts", "rollback", "baseline", "status", "members", "daemon"])
def test_every_option_has_help(name):
    for action in _subcommand(name)._actions:
        assert action.help and action.help != argparse.SUPPRESS, (name, action.option_strings)


def test_daemon_help_says_what_is_required():
    text = _subcommand("daemon").format_help()
    assert "Required: --node-id, --dc, --listen, --data-dir" in text
    assert "Precedence: flags > environment > config file > defaults" in text


def test_sim_run_help_lists_the_systems():
    from simulator.scenario import ALL_SYSTEMS
    sim = _subcommand("sim")
    run = sim._subparsers._group_actions[0].choices["run"]
    systems = next(a for a in run._actions if a.dest == "systems")
    for s in ALL_SYSTEMS:
        assert s in systems.help


def test_event_loop_setting_and_its_factory(monkeypatch):
    """``--event-loop`` / ``EKKO_EVENT_LOOP`` / ``event_loop`` in the file: uvloop's loop
    where asked for or (auto) installed, asyncio's own otherwise; asking for uvloop
    where it is missing is a clear error, not a fallback."""
    import sys

    from ekko.cli.main import event_loop_factory
    base = ["daemon", "--node-id", "a", "--dc", "d", "--listen", "127.0.0.1:1", "--data-dir", "/tmp/a"]
    assert daemon_settings(parse([*base, "--event-loop", "asyncio"]), {})[0]["event_loop"] == "asyncio"
    assert daemon_settings(parse(base), {"EKKO_EVENT_LOOP": "uvloop"})[0]["event_loop"] == "uvloop"
    with pytest.raises(UsageError, match="EKKO_EVENT_LOOP"):
        daemon_settings(parse(base), {"EKKO_EVENT_LOOP": "tokio"})
    assert event_loop_factory("asyncio") is None
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is not None:
        assert event_loop_factory("auto") is uvloop.new_event_loop
        assert event_loop_factory("uvloop") is uvloop.new_event_loop
    monkeypatch.setitem(sys.modules, "uvloop", None)      # as if it were not installed
    assert event_loop_factory("auto") is None
    with pytest.raises(UsageError, match="not installed"):
        event_loop_factory("uvloop")
