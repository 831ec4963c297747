"""What ``--ebpf`` reads or is given, attacked: names that become paths, /proc/self/mountinfo lines,
bpftool's hex bytes. No kernel needed."""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from legation.capture.ebpf import _kernel, _owned
from legation.capture.ebpf.sockmap import _number
from legation.capture.errors import CaptureError

PARENT = Path("/sys/fs/cgroup/unified")


@given(st.text(max_size=80))
def test_a_name_either_is_refused_or_names_a_direct_child_of_the_parent(name: str) -> None:
    try:
        path = _owned.owned_dir(PARENT, name)
    except CaptureError as err:
        assert "must match" in str(err)
        return
    assert path.parent == PARENT and path.name == f"legation-{name}"
    assert ".." not in path.parts and "/" not in name and "\0" not in name


@given(st.lists(st.text(max_size=60), max_size=12))
def test_mountinfo_lines_of_any_shape_never_break_the_parser(lines: list[str]) -> None:
    for point, fstype in _kernel.parse_mountinfo("\n".join(lines)):
        assert isinstance(point, str) and fstype and " " not in fstype


def test_mountinfo_escapes_are_decoded_and_odd_lines_skipped() -> None:
    found = _kernel.parse_mountinfo(
        "35 25 0:30 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw\n"
        "36 25 0:31 / /mnt/with\\040space rw - bpf bpf rw\n"
        "garbage\n"
        "1 2 3 4 5 - \n"
        "1 2 - x\n"
    )
    assert found == [("/sys/fs/cgroup/unified", "cgroup2"), ("/mnt/with space", "bpf")]


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_bpftool_hex_bytes_read_back_as_the_number(value: int) -> None:
    raw = [f"0x{byte:02x}" for byte in value.to_bytes(8, sys.byteorder)]
    assert _number(raw) == value
