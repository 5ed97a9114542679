"""The last configuration file that was valid, kept so that a box started with a broken one
goes on as it ran before instead of refusing every image.

A running box keeps its configuration when a reload finds the file broken (``app.py``). A box
that starts — after a power cut, days after a technician saved a file with a slip in it, or
with a file cut short on the boot partition (FAT, pulled out of a laptop too soon) — has no
running configuration to keep: without this copy it would stop receiving until someone
mends the file. So each time the box starts or reloads with a valid file, the file's bytes are
kept here (written durably: a power cut leaves the old copy or the new one); and when the file
it is given cannot be used, the box starts with this copy, says so at ERROR in the journal
(every problem of the file, with its line) and in systemd's status line, and takes the mended
file on the next reload (SIGHUP) or start.

The copy lives in the service's state directory (``$STATE_DIRECTORY``, which systemd sets from
the unit's ``StateDirectory=``; ``$APPLIANCE_STATE_DIR`` elsewhere): the data directory cannot
hold it, since where that is comes from the very file that may be broken. Without either, no
copy is kept and a broken file stops the start, as it always did. Paths in the copy (a relative
``storage.path``) are read as relative to the configuration file's own directory, as the file
itself is.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .config import Config, ConfigError, loads
from .durable import durable_file

log = logging.getLogger(__name__)

FILE_NAME = "last-good.yaml"


def state_dir() -> Path | None:
    """Where the copy is kept, if anywhere (see the module docstring)."""
    # systemd joins several StateDirectory= paths with ':'; the unit names one
    value = os.environ.get("STATE_DIRECTORY", "").split(":")[0] or os.environ.get("APPLIANCE_STATE_DIR", "")
    return Path(value) if value else None


def keep(config: Config) -> None:
    """Keep the text of ``config`` — read from its file, and valid — as the last good
    configuration. A failure to write is logged, never raised: the box runs on whether or not
    it can keep a copy."""
    where = state_dir()
    if where is None:
        return
    target = where / FILE_NAME
    data = config.text.encode("utf-8")
    try:
        if target.exists() and target.read_bytes() == data:
            return
        with durable_file(target) as out:
            out.write(data)
    except OSError as exc:
        log.warning("cannot keep a copy of the configuration in %s: %s", where, exc)


def load_last_good(config_path: Path) -> tuple[Config, float] | None:
    """The last good configuration and when it was kept (the wall clock's), or None."""
    where = state_dir()
    if where is None:
        return None
    path = where / FILE_NAME
    try:
        data = path.read_bytes()
        kept_at = path.stat().st_mtime
        # Read as the file it is a copy of: children and reloads go by the file's name and place.
        config = loads(data.decode("utf-8"), str(config_path), base_dir=config_path.resolve().parent)
    except FileNotFoundError:
        return None
    except (OSError, ConfigError, UnicodeDecodeError) as exc:
        log.error("the last good configuration %s cannot be used either: %s", path, exc)
        return None
    return config, kept_at


def describe_age(kept_at: float) -> str:
    """When a copy was kept, for the journal: its local time."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(kept_at))
