"""The schedule clock: the time that retries, stable-study timers and give-up ages are kept in.

It is not the wall clock. A box without a battery-backed clock (a Raspberry Pi) boots at the
time it last saved, and the wall clock steps forward when NTP first answers — by as long as the
box was off, days for a field unit, and only once the VPN is up. An admin may also set it back.
Kept in wall-clock time, a step back would stall every retry and every stable-study timer by the
size of the step, and a step forward would make a queue look days old and give it up at its
next failure.

The schedule clock is the time since boot (``CLOCK_BOOTTIME``: it never steps, and it counts a
suspend) plus a base chosen once per boot and kept in the database, so that every process of the
appliance, and every restart within a boot, reads the same clock. A new boot resumes from the
last time the previous one was seen running (:meth:`Database.schedule_base`): the time the box
was off does not count, so a week on a shelf neither gives up a queue nor skips a timer. On a
database's first boot the clock starts at the wall clock's time, so its values read as dates
until the wall clock is first stepped.
"""

from __future__ import annotations

import time
from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# How often a running appliance records that it is running (the point a next boot resumes
# from): a power cut loses at most this much of the schedule clock, so a retry or timer due then
# waits at most this much longer. On an idle box this is the only periodic write to the SD card.
SEEN_EVERY = 60.0


def boot_id() -> str:
    """This boot's identity (a random UUID the kernel makes at every boot)."""
    return BOOT_ID.read_text().strip()


def since_boot() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)
