"""Configuration: a bad file gets an error naming file:line:column and the key path; a good one
becomes typed values; ``appliance check-config`` says OK or the errors, exit 0/1; a running box
keeps its configuration when a reload is invalid."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from appliance.config import ConfigError, Space, load, loads

from .peers import REPO

GOOD = """\
node:
  ae_title: EDGE
  port: 11112
  allowed_networks: [10.0.0.0/8, 192.168.1.7]
storage:
  path: /srv/appliance
  disk: {min_free: 2GiB, evict_above: 85%}
destinations:
  central:
    ae_title: PACS
    host: pacs.example.org
    port: 104
    retry: {initial_delay: 5s, max_delay: 10m}
routes:
  - send_to: [central]
"""

# (case, YAML text, the exact first error: "line:column: key.path: message start")
BAD = [
    ("port not a number", "node:\n  port: 104a\n", '2:3: node.port: expected an integer 1-65535, got "104a"'),
    ("port out of range", "node:\n  port: 70000\n", '2:3: node.port: expected an integer 1-65535, got "70000"'),
    ("port zero", "node:\n  port: 0\n", '2:3: node.port: expected an integer 1-65535, got "0"'),
    ("port quoted", 'node:\n  port: "104"\n', '2:3: node.port: expected an integer 1-65535, got "104"'),
    ("AE title too long", "node:\n  ae_title: ABCDEFGHIJKLMNOPQ\n",
     '2:3: node.ae_title: expected an AE title (1-16 printable ASCII characters, no backslash), got "ABCDEFGHIJKLMNOPQ"'),
    ("AE title backslash", 'node:\n  ae_title: "A\\\\B"\n',
     '2:3: node.ae_title: expected an AE title (1-16 printable ASCII characters, no backslash), got "A\\B"'),
    ("AE title empty", 'node:\n  ae_title: ""\n', '2:3: node.ae_title: expected an AE title'),
    ("unknown top-level key", "nodes:\n  port: 104\n", "1:1: nodes: unknown key (known keys: node, storage,"),
    ("unknown nested key", "node:\n  ae_title: EDGE\n  prot: 104\n", "3:3: node.prot: unknown key (known keys: ae_title,"),
    ("repeated key", "node:\n  port: 104\n  port: 105\n", "3:3: node.port: repeated key (first at line 2)"),
    ("section not a mapping", "node: 104\n", '1:1: node: expected a mapping, got "104"'),
    ("list instead of scalar", "node:\n  ae_title: [A, B]\n", "2:3: node.ae_title: expected an AE title"),
    ("bad boolean", "node:\n  require_called_ae: yes please\n",
     '2:3: node.require_called_ae: expected true or false, got "yes please"'),
    ("bad duplicate policy", "node:\n  on_duplicate: overwrite\n",
     '2:3: node.on_duplicate: expected one of replace, keep-first, reject, got "overwrite"'),
    ("bad network", "node:\n  allowed_networks: [10.0.0.0/8, 10.0.0.300]\n",
     '2:34: node.allowed_networks[1]: expected an address or network such as "10.0.0.0/8", got "10.0.0.300"'),
    ("bad calling AE in list", "node:\n  allowed_calling_aes:\n    - CT1\n    - THIS_NAME_IS_TOO_LONG\n",
     '4:7: node.allowed_calling_aes[1]: expected an AE title'),
    ("bad bind address", "node:\n  bind_address: everywhere\n",
     '2:3: node.bind_address: expected an IP address to listen on, got "everywhere"'),
    ("bad disk size", "storage:\n  disk:\n    min_free: lots\n",
     '3:5: storage.disk.min_free: expected a size such as "2GiB", "500MB" or a percentage such as "10%", got "lots"'),
    ("percentage over 100", "storage:\n  disk:\n    evict_above: 120%\n",
     '3:5: storage.disk.evict_above: expected a size such as "2GiB"'),
    ("destination port", "destinations:\n  central:\n    ae_title: PACS\n    host: h\n    port: 104a\n",
     '5:5: destinations.central.port: expected an integer 1-65535, got "104a"'),
    # YAML's own typing of unquoted words and numbers, and quotes around a number: said so.
    ("AE title YAML reads as a boolean", "node:\n  ae_title: NO\n",
     '2:3: node.ae_title: expected an AE title (1-16 printable ASCII characters, no backslash), got "NO" (YAML reads'
     ' NO without quotes as a yes/no value: write "NO")'),
    ("AE title YAML reads as a number", "node:\n  ae_title: 1234\n",
     '2:3: node.ae_title: expected an AE title (1-16 printable ASCII characters, no backslash), got "1234" (YAML'
     ' reads 1234 without quotes as a number: write "1234")'),
    ("port in quotes", 'node:\n  port: "4252"\n',
     '2:3: node.port: expected an integer 1-65535, got "4252" (in quotes it is text: write 4252 without them)'),
    ("port in the host", "destinations:\n  c: {ae_title: P, host: '127.0.0.1:4252', port: 4252}\n",
     '2:20: destinations.c.host: expected a host name or IP address, without a port (that is the port key) or'
     ' scheme, got "127.0.0.1:4252"'),
    ("destination missing host", "destinations:\n  central:\n    ae_title: PACS\n    port: 104\n",
     "2:3: destinations.central.host: required key is missing"),
    ("destination bad AE", "destinations:\n  central: {ae_title: 'PACS\\ONE', host: h, port: 104}\n",
     '2:13: destinations.central.ae_title: expected an AE title'),
    ("bad retry duration", "destinations:\n  central:\n    ae_title: PACS\n    host: h\n    port: 104\n"
     "    retry:\n      initial_delay: soon\n",
     '7:7: destinations.central.retry.initial_delay: expected a duration such as "30s", "10m", "7d", got "soon"'),
    ("bad jitter", "destinations:\n  c: {ae_title: P, host: h, port: 1, retry: {jitter: 2}}\n",
     '2:46: destinations.c.retry.jitter: expected a fraction 0-1, got "2"'),
    # durations that must be above zero
    ("timeouts zero", "node:\n  timeouts: {network: 0s, acse: 0s}\n",
     '2:14: node.timeouts.network: expected a duration above zero, such as "30s", got "0s"'),
    ("timeout beyond what a socket takes", "node:\n  timeouts: {dimse: 100000000000000s}\n",
     '2:14: node.timeouts.dimse: expected a timeout of at most 30d, got "100000000000000s"'),
    ("destination timeout zero", "destinations:\n  c: {ae_title: P, host: h, port: 1, timeouts: {connect: 0}}\n",
     '2:49: destinations.c.timeouts.connect: expected a duration above zero, such as "30s", got "0"'),
    ("no backoff", "destinations:\n  c: {ae_title: P, host: h, port: 1, retry: {initial_delay: 0ms}}\n",
     '2:46: destinations.c.retry.initial_delay: expected a duration above zero, such as "10s", got "0ms"'),
    ("no backoff cap", "destinations:\n  c: {ae_title: P, host: h, port: 1, retry: {max_delay: 0s}}\n",
     '2:46: destinations.c.retry.max_delay: expected a duration above zero, such as "10m", got "0s"'),
    ("give up at once", "destinations:\n  c: {ae_title: P, host: h, port: 1, retry: {give_up_after: 0s}}\n",
     '2:46: destinations.c.retry.give_up_after: expected a duration above zero, such as "7d" (0 would give up '
     "at the first failure, the link's included: to give up on an image at the PACS's first failure with it, "
     'write max_attempts: 1), got "0s"'),
    ("cap below the first delay", "destinations:\n  c:\n    ae_title: P\n    host: h\n    port: 1\n"
     "    retry: {initial_delay: 30s, max_delay: 10s}\n",
     "6:33: destinations.c.retry.max_delay: 10 s is shorter than initial_delay (30 s): the wait between attempts "
     "starts at initial_delay and grows up to max_delay"),
    ("first delay above the default cap", "destinations:\n  c:\n    ae_title: P\n    host: h\n    port: 1\n"
     "    retry:\n      initial_delay: 20m\n",
     "7:7: destinations.c.retry.initial_delay: 1200 s is longer than max_delay (600 s, the default): the wait "
     "between attempts starts at initial_delay and grows up to max_delay"),
    ("destinations not a mapping", "destinations: [central]\n",
     "1:1: destinations: expected a mapping of names, got a list"),
    ("unknown destination in route", "destinations:\n  central: {ae_title: PACS, host: h, port: 104}\n"
     "routes:\n  - send_to: [central, archive]\n",
     '4:24: routes[0].send_to[1]: unknown destination "archive" (destinations: central)'),
    ("destination listed twice", "destinations:\n  central: {ae_title: PACS, host: h, port: 104}\n"
     "routes:\n  - send_to: [central, central]\n",
     '4:24: routes[0].send_to[1]: "central" is listed twice (an instance goes to a destination once)'),
    ("route to nothing configured", "routes:\n  - send_to: [central]\n",
     '2:15: routes[0].send_to[0]: unknown destination "central" (destinations: none are configured)'),
    ("routes not a list", "routes: {send_to: central}\n", "1:1: routes: expected a list, got a mapping"),
    ("port clash", "node: {port: 8080}\nweb: {port: 8080}\n", "2:7: web.port: port 8080 is also used by node.port"),
    ("bad log level", "logging:\n  level: verbose\n",
     '2:3: logging.level: expected one of debug, info, warning, error, got "verbose"'),
    ("YAML syntax", "node:\n  port: [104\n", "3:1: YAML syntax error:"),
    ("tab indentation", "node:\n\tport: 104\n", "2:1: YAML syntax error:"),
    # every key has a default: a file with none would be a box that forwards nothing
    ("empty file", "", "1:1: the file has no settings"),
    ("only comments", "# the editor saved this\n# and this\n", "1:1: the file has no settings"),
    ("only document markers", "---\n...\n", "1:1: the file has no settings"),
    ("empty mapping", "{}\n", "1:1: the file has no settings"),
    # merge keys (<<)
    ("merged value wrong", "destinations:\n  a: &a {ae_title: A, host: h, port: 104a}\n  b: {<<: *a, ae_title: B}\n",
     '2:32: destinations.a.port: expected an integer 1-65535, got "104a"'),
    ("merge of a scalar", "destinations:\n  a: {ae_title: A, host: h, port: 104, <<: 5}\n",
     '2:44: destinations.a.<<: expected a mapping (or a list of mappings) to merge, got "5"'),
    ("merge of itself", "destinations:\n  a: &a {ae_title: A, host: h, port: 104, <<: *a}\n",
     "2:43: destinations.a.<<: a mapping cannot merge itself"),
    # characters YAML refuses anywhere: a file cut short by a power cut ends in NUL bytes
    ("NUL bytes at the end", "node:\n  port: 104\n\x00\x00\x00\x00",
     "3:1: the file holds a NUL byte (U+0000), which a YAML file cannot hold, not even in a comment"),
    ("NUL bytes after CRLF lines", "node:\r\n  port: 104\r\n\x00", "3:1: the file holds a NUL byte"),
    ("form feed", "node:\n  port: 104\n\x0c\nweb: {port: 8080}\n", "3:1: the file holds a form feed (U+000C)"),
    ("escape in a value", "node:\n  ae_title: A\x1bB\n", "2:14: the file holds an escape character (U+001B)"),
    ("DEL in a comment", "node:\n  port: 104  # x\x7f\n", "2:17: the file holds a DEL character (U+007F)"),
    ("nested thousands deep", "node: " + "[" * 5000 + "]" * 5000 + "\n",
     "1:1: the file nests lists or mappings too deeply for YAML to read"),
    # tags: one PyYAML has no constructor for, or a value its tag cannot take
    ("unknown tag", "node:\n  port: !foo 104\n", '2:9: node.port: unknown YAML tag "!foo"'),
    ("unknown tag on a mapping", "node: !foo {port: 104}\n", '1:7: node: unknown YAML tag "!foo"'),
    ("!!int of a word", "node:\n  port: !!int abc\n", '2:9: node.port: "abc" is not a valid !!int'),
    ("!!bool of a word", "node:\n  require_called_ae: !!bool maybe\n",
     '2:22: node.require_called_ae: "maybe" is not a valid !!bool'),
    ("!!timestamp of a word", "routes:\n  - name: !!timestamp soon\n",
     '2:11: routes[0].name: "soon" is not a valid !!timestamp'),
    ("date that is none", "routes:\n  - name: 2024-02-30\n", '2:5: routes[0].name: expected a string, got "2024-02-30"'),
    ("merged value wrong tag", "destinations:\n  a: &a {ae_title: A, host: h, port: !!int x}\n  b: {<<: *a, ae_title: B}\n",
     '2:38: destinations.a.port: "x" is not a valid !!int'),
    ("merged key unknown", "destinations:\n  a: &a {ae_title: A, host: h, port: 104}\n"
     "  b:\n    <<: [{prot: 105}, *a]\n    ae_title: B\n",
     "4:11: destinations.b.prot: unknown key (known keys: ae_title, host, port,"),
]


@pytest.mark.parametrize("case, text, expected", BAD, ids=[c[0] for c in BAD])
def test_bad_file_names_line_column_and_key(case: str, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(text, "appliance.yaml")
    first = str(info.value.problems[0])
    assert first.startswith(f"appliance.yaml:{expected}"), first


def test_a_merged_entry_that_fails_is_reported_once_for_each_mapping_that_has_it() -> None:
    with pytest.raises(ConfigError) as info:
        loads(next(c[1] for c in BAD if c[0] == "merged value wrong"), "appliance.yaml")
    assert [(p.line, p.column, p.path) for p in info.value.problems] == [
        (2, 32, "destinations.a.port"), (2, 32, "destinations.b.port")]


MERGED = """\
destinations:
  central: &central
    ae_title: PACS
    host: pacs.example.org
    port: 104
    retry: {initial_delay: 5s, max_delay: 10m}
  backup:
    <<: *central
    ae_title: PACS2
    port: 105
  third:
    <<: [{host: third.example.org, port: 106}, *central]
    ae_title: PACS3
routes:
  - &ct {when: {Modality: CT}, send_to: [central]}
  - {<<: *ct, send_to: [backup, third]}
"""

SPELLED_OUT = """\
destinations:
  central: {ae_title: PACS, host: pacs.example.org, port: 104, retry: {initial_delay: 5s, max_delay: 10m}}
  backup: {ae_title: PACS2, host: pacs.example.org, port: 105, retry: {initial_delay: 5s, max_delay: 10m}}
  third: {ae_title: PACS3, host: third.example.org, port: 106, retry: {initial_delay: 5s, max_delay: 10m}}
routes:
  - {when: {Modality: CT}, send_to: [central]}
  - {when: {Modality: CT}, send_to: [backup, third]}
"""


def test_merge_keys_read_as_the_settings_spelled_out() -> None:
    """A mapping takes from ``<<`` what it does not set itself; of a list of merged mappings the
    first that has a key gives it (YAML's merge key type)."""
    assert loads(MERGED, "appliance.yaml") == loads(SPELLED_OUT, "appliance.yaml")


def test_every_problem_is_reported_not_just_the_first() -> None:
    text = "node:\n  port: 104a\n  ae_title: ABCDEFGHIJKLMNOPQRSTU\n  bogus: 1\n"
    with pytest.raises(ConfigError) as info:
        loads(text, "appliance.yaml")
    paths = [p.path for p in info.value.problems]
    assert paths == ["node.port", "node.ae_title", "node.bogus"]
    assert [p.line for p in info.value.problems] == [2, 3, 4]


def test_good_file_becomes_typed_values(tmp_path: Path) -> None:
    path = tmp_path / "appliance.yaml"
    path.write_text(GOOD)
    config = load(path)
    assert config.node.ae_title == "EDGE" and config.node.port == 11112
    assert [str(n) for n in config.node.allowed_networks] == ["10.0.0.0/8", "192.168.1.7/32"]
    assert config.storage.disk.min_free == Space(bytes=2 * 2**30)
    assert config.storage.disk.evict_above == Space(percent=85.0)
    central = config.destinations["central"]
    assert (central.ae_title, central.host, central.port) == ("PACS", "pacs.example.org", 104)
    assert central.retry.initial_delay == 5.0 and central.retry.max_delay == 600.0
    assert central.retry.give_up_after == 7 * 86400  # defaults suit a VPN link: never before 7 days
    assert config.routes[0].send_to == ("central",)
    with pytest.raises(AttributeError):
        config.node.port = 1  # type: ignore[misc]


def test_a_retention_of_zero_means_once_delivered() -> None:
    """``keep_delivered_for: 0s`` evicts an instance once every destination has it, and
    ``keep_history_for: 0s`` forgets its records once it is evicted: both are wishes, not slips."""
    config = loads("retention: {keep_delivered_for: 0s, keep_history_for: 0s}\n")
    assert (config.retention.keep_delivered_for, config.retention.keep_history_for) == (0.0, 0.0)
    retry = loads("destinations: {c: {ae_title: P, host: h, port: 1, retry: {initial_delay: 10m}}}\n"
                  ).destinations["c"].retry
    assert retry.initial_delay == retry.max_delay == 600.0  # equal is fine: a constant wait


def test_relative_storage_path_is_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "appliance.yaml"
    path.parent.mkdir()
    path.write_text("storage:\n  path: ../data\n")
    assert load(path).storage.path == str(tmp_path / "data")


def test_bundled_default_config_is_valid() -> None:
    config = load(REPO / "config" / "appliance.yaml")
    assert config.node.port == 11112  # unprivileged, for `make run`
    assert config.storage.path == str(REPO / "var")


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "check-config", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_check_config_command(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text(textwrap.dedent("""\
        node:
          ae_title: EDGE
        destinations:
          central:
            ae_title: PACS
            host: 10.0.0.5
            port: 104a
        """))
    ok = check_config(good)
    assert ok.returncode == 0 and ok.stdout.strip() == f"{good}: OK"
    fail = check_config(bad)
    assert fail.returncode == 1
    assert fail.stdout.strip() == f'{bad}:7:5: destinations.central.port: expected an integer 1-65535, got "104a"'
    missing = check_config(tmp_path / "nope.yaml")
    assert missing.returncode == 1 and "cannot read the file" in missing.stdout
    blank = tmp_path / "blank.yaml"
    blank.write_text("# to be filled in\n")
    empty = check_config(blank)
    assert empty.returncode == 1 and empty.stdout.strip() == f"{blank}:1:1: the file has no settings"
    # As every command that reads the configuration: --config, else $APPLIANCE_CONFIG.
    named = subprocess.run([sys.executable, "-m", "appliance", "check-config", "--config", str(bad)],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert named.returncode == 1 and named.stdout.startswith(f"{bad}:7:5: "), named.stdout + named.stderr
    from_env = subprocess.run([sys.executable, "-m", "appliance", "check-config"], cwd=REPO, capture_output=True,
                              text=True, timeout=60, env={**os.environ, "APPLIANCE_CONFIG": str(good)})
    assert from_env.returncode == 0 and from_env.stdout.strip() == f"{good}: OK", from_env.stdout + from_env.stderr


def test_valid_but_unlikely_meant_is_a_warning_at_its_line(tmp_path: Path) -> None:
    """A destination no rule sends to, and rules below a rule that matches everything and stops
    there: the box runs with the file (exit 0), and check-config and the journal say what is
    likely a slip, at its line."""
    path = tmp_path / "slips.yaml"
    path.write_text(textwrap.dedent("""\
        destinations:
          central: {ae_title: PACS, host: 127.0.0.1, port: 4242}
          archive: {ae_title: ARCH, host: 127.0.0.1, port: 4243}
        routes:
          - name: everything
            send_to: [central]
          - name: mammo to the archive
            when: {Modality: MG}
            send_to: [central]
        """))
    config = load(path)
    assert [a.as_warning() for a in config.advice] == [
        f"{path}:3:3: warning: destinations.archive: no rule sends to it: only `appliance send --to archive` will",
        f"{path}:7:5: warning: routes[1]: never evaluated: routes[0] above has no `when`, so it matches every"
        " instance, and it has no `continue: true`",
    ]
    checked = check_config(path)
    assert checked.returncode == 0, checked.stdout
    assert checked.stdout.splitlines() == [a.as_warning() for a in config.advice] + [f"{path}: OK"]
    # A catch-all that goes on, or one placed last, is what an admin means by a default rule.
    fine = loads(textwrap.dedent("""\
        destinations:
          central: {ae_title: PACS, host: 127.0.0.1, port: 4242}
        routes:
          - {send_to: [central], continue: true}
          - {when: {Modality: MG}, send_to: [central]}
          - {send_to: [central]}
        """))
    assert fine.advice == ()


def test_check_config_names_the_place_of_what_yaml_itself_refuses(tmp_path: Path) -> None:
    """A control character, an unknown tag or a value its tag cannot take is an error at its line
    and column, never a traceback (the running box reads its file on SIGHUP the same way)."""
    files = {
        # a FAT boot partition after a power cut: the tail of the file is NUL bytes
        "cut.yaml": (GOOD.encode() + b"\0" * 512, "16:1: the file holds a NUL byte (U+0000)"),
        "pagebreak.yaml": (GOOD.replace("routes:", "\froutes:").encode(), "14:1: the file holds a form feed"),
        "tag.yaml": (GOOD.replace("port: 104", "port: !foo 104").encode(),
                     '12:11: destinations.central.port: unknown YAML tag "!foo"'),
        "int.yaml": (GOOD.replace("port: 11112", "port: !!int abc").encode(),
                     '3:9: node.port: "abc" is not a valid !!int'),
    }
    for name, (data, expected) in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ConfigError) as info:
            load(path)
        assert str(info.value.problems[0]).startswith(f"{path}:{expected}"), info.value
        result = check_config(path)
        assert result.returncode == 1 and result.stderr == "", result.stderr
        assert result.stdout.startswith(f"{path}:{expected}"), result.stdout


def test_a_file_not_in_utf8_names_the_line_and_column_of_the_first_byte_that_is_not(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    text = GOOD.replace("host: pacs.example.org", "host: pacs.example.org  # Héloïse's PACS")
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:11:32: the file must be UTF-8, and byte 0xE9 here is not part of a UTF-8 character"
        " (an editor that saved it as Latin-1 or Windows-1252? save it as UTF-8)"]
    # a character before it on the line counts once, however many bytes it takes
    path.write_bytes("node: {ae_title: EDGE}  # ü\n# é ".encode() + "é".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert (info.value.problems[0].line, info.value.problems[0].column) == (2, 5)


def test_invalid_reload_keeps_the_running_config(appliance_factory) -> None:
    """SIGHUP with a broken file: logged, nothing changes, the box keeps receiving."""
    from .peers import require_tool
    from .test_receiver import echoscu

    require_tool("echoscu")
    box = appliance_factory({"node": {"allowed_calling_aes": ["CT1"]}})
    text = box.config_path.read_text()
    box.config_path.write_text(text + "node_typo: 1\n")
    box.reload()
    deadline = time.monotonic() + 10
    while "reload refused" not in box.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "reload refused, keeping the running configuration" in box.log()
    assert "node_typo: unknown key" in box.log()
    assert echoscu(box.port, "CT1", "EDGE").returncode == 0
    assert echoscu(box.port, "OTHER", "EDGE").returncode != 0

    # A file blanked by an editor or cut short: all defaults would forward nothing.
    box.config_path.write_text("# nothing here yet\n")
    box.reload()
    deadline = time.monotonic() + 10
    while "the file has no settings" not in box.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"reload refused, keeping the running configuration: {box.config_path}:1:1: the file has no settings" \
        in box.log()
    assert echoscu(box.port, "CT1", "EDGE").returncode == 0
    assert echoscu(box.port, "OTHER", "EDGE").returncode != 0

    # A valid change applies to new associations without a restart.
    box.config_path.write_text(text.replace("- CT1", "- OTHER"))
    box.reload()
    deadline = time.monotonic() + 10
    while "configuration reloaded" not in box.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert echoscu(box.port, "OTHER", "EDGE").returncode == 0
    assert echoscu(box.port, "CT1", "EDGE").returncode != 0


def test_the_journal_warns_of_a_slip_at_start_and_at_each_reload(appliance_factory) -> None:
    spare = {"ae_title": "SPARE", "host": "127.0.0.1", "port": 4243}
    box = appliance_factory({"destinations": {"spare": spare}})
    warning = "warning: destinations.spare: no rule sends to it"
    assert box.log().count(warning) == 1, box.log()
    box.config_path.write_text(box.config_path.read_text() + "# edited\n")
    box.reload()
    deadline = time.monotonic() + 10
    while "configuration reloaded" not in box.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "configuration reloaded" in box.log() and box.log().count(warning) == 2, box.log()
    assert f"WARNING appliance.app: {box.config_path}:" in box.log()


def test_a_reload_keeps_what_applies_after_a_restart_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """The settings bound to a socket, the data directory or the Print SCP keep their running
    values through a reload, each named in the journal; the rest of the file applies."""
    from appliance.app import keeping_restart_only, warn_restart_needed

    running = loads("node: {port: 11112}\nstorage: {path: /data}\ndestinations: {a: {ae_title: A, host: h, port: 1}}\n")
    new = loads("node: {port: 11113}\nstorage: {path: /elsewhere}\nprint: {enabled: true}\n"
                "destinations: {a: {ae_title: A, host: h, port: 2}}\n")
    with caplog.at_level("WARNING"):
        warn_restart_needed(running, new)
    assert sorted(r.getMessage() for r in caplog.records) == [
        "node.port changed: it applies after a restart",
        "print.enabled changed: it applies after a restart",
        "storage.path changed: it applies after a restart",
    ]
    applied = keeping_restart_only(running, new)
    assert (applied.node.port, applied.storage.path, applied.print.enabled) == (11112, "/data", False)
    assert applied.destinations["a"].port == 2
